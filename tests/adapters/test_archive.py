"""Archive unpacking refuses traversal, links, bombs and pickles; good archives unpack."""

from __future__ import annotations

from pathlib import Path

import pytest
from adapter_files import write_lora
from archive_files import peft_members, tar_gz, tar_with_link, zip_bomb, zip_file

from loraplex.adapters.archive import extract_adapter
from loraplex.adapters.errors import InvalidAdapter, UnsafeArchive, UploadTooLarge


def unpack(archive: Path, dest: Path, max_bytes: int = 10 << 20) -> Path:
    dest.mkdir()
    extract_adapter(archive, dest, max_members=16, max_bytes=max_bytes)
    return dest


@pytest.fixture
def members(tmp_path: Path) -> dict[str, bytes]:
    return peft_members(write_lora(tmp_path / "src"))


@pytest.mark.parametrize("prefix", ["", "my-adapter/", "./"])
def test_tar_gz_unpacks(tmp_path: Path, members: dict[str, bytes], prefix: str) -> None:
    out = unpack(tar_gz(tmp_path / "a.tar.gz", members, prefix=prefix), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(members)


def test_zip_unpacks(tmp_path: Path, members: dict[str, bytes]) -> None:
    members["README.md"] = b"hello"
    out = unpack(zip_file(tmp_path / "a.zip", members), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize("evil", ["../adapter_config.json", "a/../../x", "/etc/passwd"])
def test_traversal_refused(tmp_path: Path, members: dict[str, bytes], evil: str) -> None:
    members[evil] = b"x"
    with pytest.raises(UnsafeArchive):
        unpack(tar_gz(tmp_path / "a.tar.gz", members), tmp_path / "out")
    with pytest.raises(UnsafeArchive):
        unpack(zip_file(tmp_path / "a.zip", members), tmp_path / "out2")


def test_symlink_refused(tmp_path: Path, members: dict[str, bytes]) -> None:
    archive = tar_with_link(tmp_path / "a.tar.gz", members, "evil", "/etc/passwd")
    with pytest.raises(UnsafeArchive, match="link"):
        unpack(archive, tmp_path / "out")


def test_zip_bomb_refused_while_inflating(tmp_path: Path, members: dict[str, bytes]) -> None:
    bomb = zip_bomb(tmp_path / "bomb.zip", members["adapter_config.json"], 64 << 20)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UploadTooLarge, match="zip bomb"):
        unpack(bomb, tmp_path / "out", max_bytes=8 << 20)


def test_too_many_members(tmp_path: Path, members: dict[str, bytes]) -> None:
    members.update({f"junk/{i}.txt": b"" for i in range(40)})
    with pytest.raises(UnsafeArchive, match="more than 16 members"):
        unpack(tar_gz(tmp_path / "a.tar.gz", members), tmp_path / "out")


def test_pickle_member_refused(tmp_path: Path, members: dict[str, bytes]) -> None:
    members["adapter_model.bin"] = b"\x80\x04"
    with pytest.raises(InvalidAdapter, match="pickle"):
        unpack(tar_gz(tmp_path / "a.tar.gz", members), tmp_path / "out")


def test_truncated_archive(tmp_path: Path, members: dict[str, bytes]) -> None:
    archive = tar_gz(tmp_path / "a.tar.gz", members)
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(InvalidAdapter, match="corrupt or truncated"):
        unpack(archive, tmp_path / "out")

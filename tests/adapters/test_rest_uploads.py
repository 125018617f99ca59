"""Uploads through the admin REST API: good ones land in S3 and the registry; each bad one
is a 4xx that names the problem and leaves nothing listed, stored, or in the bucket."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import torch
from adapter_files import TINY, lora_config, lora_tensors, write_lora
from archive_files import peft_members, tar_gz, tar_with_link, zip_bomb, zip_file
from moto_proc import MotoServer
from rest import PREFIX, AdapterServer, adapter_server, make_tenant, peft_files, upload

MAX_BODY = 2 << 20  # archives may expand to twice this


@pytest.fixture(scope="module")
def server(
    moto: MotoServer, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdapterServer]:
    with adapter_server(
        moto,
        tiny_llama_dir,
        tmp_path_factory.mktemp("cache"),
        max_lora_rank=8,
        adapter_upload_max_bytes=MAX_BODY,
    ) as srv:
        yield srv


@pytest.fixture
def admin(server: AdapterServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def test_upload_versions_list_detail_alias_delete(
    server: AdapterServer, admin: httpx.Client, make_peft_adapter, tiny_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    tenant, _ = make_tenant(admin)
    first = make_peft_adapter(tiny_llama_dir, rank=4, targets=["q_proj", "v_proj", "down_proj"])
    r = upload(admin, tenant, "support", peft_files(first))
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert {k: v1[k] for k in ("name", "version", "rank", "target_modules")} == {
        "name": "support",
        "version": 1,
        "rank": 4,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
    }
    assert len(v1["sha256"]) == 64 and v1["bytes"] > 0
    assert f"{PREFIX}/blobs/{v1['sha256'][:2]}/{v1['sha256']}.tar" in server.bucket_keys()

    second = make_peft_adapter(tiny_llama_dir, rank=2, seed=1)
    v2 = upload(admin, tenant, "support", peft_files(second)).json()
    assert v2["version"] == 2 and v2["sha256"] != v1["sha256"]

    listed = admin.get(f"/admin/v1/tenants/{tenant}/adapters").json()["data"]
    assert [(a["name"], a["current_version"]) for a in listed] == [("support", 2)]
    r = admin.put(f"/admin/v1/tenants/{tenant}/adapters/support/aliases/prod", json={"version": 1})
    assert r.status_code == 200 and r.json() == {"alias": "prod", "name": "support", "version": 1}
    detail = admin.get(f"/admin/v1/tenants/{tenant}/adapters/support").json()
    assert [v["version"] for v in detail["versions"]] == [1, 2] and detail["aliases"] == {"prod": 1}
    r = admin.put(f"/admin/v1/tenants/{tenant}/adapters/support/aliases/prod", json={"version": 7})
    assert r.status_code == 404 and "support@7" in r.json()["error"]["message"]

    assert admin.delete(f"/admin/v1/tenants/{tenant}/adapters/support").status_code == 200
    r = admin.get(f"/admin/v1/tenants/{tenant}/adapters/support")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert admin.get(f"/admin/v1/tenants/{tenant}/adapters").json()["data"] == []


def test_text_bin_is_not_called_a_pickle(admin: httpx.Client, tmp_path: Path) -> None:
    tenant, _ = make_tenant(admin)
    r = upload(admin, tenant, "bad", bad_text_bin(tmp_path))
    assert r.status_code == 400 and "pickled checkpoint" not in r.json()["error"]["message"]


def test_upload_with_the_readme_save_pretrained_writes(
    admin: httpx.Client, make_peft_adapter, tiny_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """save_pretrained writes a README.md (model card) beside the two files: a multipart
    upload of the whole directory is accepted (the card is dropped), as the CLI's is."""
    tenant, _ = make_tenant(admin)
    adapter = make_peft_adapter(tiny_llama_dir, rank=4)
    files = [*peft_files(adapter), ("files", ("README.md", b"---\nlibrary_name: peft\n---\n"))]
    r = upload(admin, tenant, "with-card", files)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_upload(admin: httpx.Client, tmp_path: Path, kind: str) -> None:
    tenant, _ = make_tenant(admin)
    members = peft_members(write_lora(tmp_path / "src", TINY, rank=3))
    if kind == "zip":
        archive = zip_file(tmp_path / "a.zip", members)
    else:
        archive = tar_gz(tmp_path / "a.tar.gz", members, prefix="my-lora/")
    r = upload(admin, tenant, "packed", [("files", (archive.name, archive.read_bytes()))])
    assert r.status_code == 201, r.text
    assert r.json()["rank"] == 3


def test_tenant_key_scopes(server: AdapterServer, admin: httpx.Client, tmp_path: Path) -> None:
    tenant, writer = make_tenant(admin, "adapters:write")
    _, reader = make_tenant(admin, "adapters:read")
    files = peft_files(write_lora(tmp_path / "a"))
    with server.client(writer) as c:
        r = upload(c, tenant, "mine", files)
        assert r.status_code == 201, r.text
        assert c.get(f"/admin/v1/tenants/{tenant}/adapters").json()["data"][0]["name"] == "mine"
    with server.client(reader) as c:  # a key of another tenant, read scope only
        assert c.get(f"/admin/v1/tenants/{tenant}/adapters").status_code == 403


# ---- bad uploads ---------------------------------------------------------------------------

Files = list[tuple[str, tuple[str, bytes]]]


def _files(d: Path) -> Files:
    return peft_files(d)


def _write(tmp: Path, **kw) -> Path:  # type: ignore[no-untyped-def]
    return write_lora(tmp / "bad", TINY, **kw)


def _tensors_with(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    t = lora_tensors(TINY, 2)
    t[name] = value
    return t


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def bad_pickle(tmp: Path) -> Files:
    buf = io.BytesIO()
    torch.save(lora_tensors(TINY, 2), buf)
    cfg = json.dumps(lora_config(2)).encode()
    return [
        ("files", ("adapter_config.json", cfg)),
        ("files", ("adapter_model.bin", buf.getvalue())),
    ]


def bad_text_bin(tmp: Path) -> Files:
    return [*_files(_write(tmp))[:1], ("files", ("adapter_model.bin", b"hi\n"))]


def bad_pickle_disguised(tmp: Path) -> Files:
    d = _write(tmp)
    torch.save(lora_tensors(TINY, 2), d / "adapter_model.safetensors")
    return _files(d)


def bad_truncated(tmp: Path) -> Files:
    d = _write(tmp)
    p = d / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-64])
    return _files(d)


def bad_shape(tmp: Path) -> Files:
    return _files(_write(tmp, tensors=_tensors_with(f"{Q0}.lora_A.weight", torch.zeros(2, 32))))


def bad_module(tmp: Path) -> Files:
    t = _tensors_with(
        "base_model.model.model.layers.0.mlp.experts.lora_A.weight", torch.zeros(2, 64)
    )
    return _files(_write(tmp, tensors=t))


def bad_rank(tmp: Path) -> Files:
    return _files(_write(tmp, rank=16))


def bad_nan(tmp: Path) -> Files:
    t = lora_tensors(TINY, 2)
    t[f"{Q0}.lora_B.weight"][5, 1] = float("nan")
    return _files(_write(tmp, tensors=t))


def bad_dora(tmp: Path) -> Files:
    return _files(_write(tmp, config=lora_config(2, use_dora=True)))


def bad_peft_type(tmp: Path) -> Files:
    return _files(_write(tmp, config=lora_config(2, peft_type="IA3")))


def bad_dtype(tmp: Path) -> Files:
    return _files(_write(tmp, tensors=lora_tensors(TINY, 2, dtype=torch.int8)))


def bad_missing_config(tmp: Path) -> Files:
    return [f for f in _files(_write(tmp)) if f[1][0] != "adapter_config.json"]


def _members(tmp: Path) -> dict[str, bytes]:
    return peft_members(_write(tmp))


def bad_traversal_tar(tmp: Path) -> Files:
    m = _members(tmp)
    m["../../etc/cron.d/evil"] = b"* * * * * root sh"
    return [("files", ("a.tar.gz", tar_gz(tmp / "a.tar.gz", m).read_bytes()))]


def bad_symlink_tar(tmp: Path) -> Files:
    archive = tar_with_link(tmp / "a.tar.gz", _members(tmp), "adapter_extra", "/etc/shadow")
    return [("files", ("a.tar.gz", archive.read_bytes()))]


def bad_zip_bomb(tmp: Path) -> Files:
    bomb = zip_bomb(tmp / "b.zip", json.dumps(lora_config(2)).encode(), 16 << 20)
    return [("files", ("b.zip", bomb.read_bytes()))]


def bad_oversize(tmp: Path) -> Files:
    return [("files", ("adapter_model.safetensors", b"\0" * (MAX_BODY + 1024)))]


def bad_corrupt_tar(tmp: Path) -> Files:
    data = tar_gz(tmp / "a.tar.gz", _members(tmp)).read_bytes()
    return [("files", ("a.tar.gz", data[: len(data) // 2]))]


def bad_extra_file(tmp: Path) -> Files:
    return [*_files(_write(tmp)), ("files", ("train.py", b"print(1)"))]


BAD: dict[str, tuple[Callable[[Path], Files], int, str]] = {
    "pickle .bin": (bad_pickle, 400, "is a pickled checkpoint (torch.save)"),
    "3-byte text .bin": (bad_text_bin, 400, "'adapter_model.bin' is not an adapter file"),
    "pickle named .safetensors": (bad_pickle_disguised, 400, "pickle"),
    "truncated safetensors": (bad_truncated, 400, "truncated"),
    "wrong shape": (bad_shape, 400, "needs [2, 64]"),
    "unknown module": (bad_module, 400, "mlp.experts"),
    "rank over max": (bad_rank, 400, "exceeds the maximum rank 8"),
    "NaN weights": (bad_nan, 400, "NaN or infinite"),
    "DoRA": (bad_dora, 400, "DoRA"),
    "non-LoRA peft type": (bad_peft_type, 400, "'IA3' is not supported"),
    "bad dtype": (bad_dtype, 400, "dtype I8"),
    "missing config": (bad_missing_config, 400, "adapter_config.json is missing"),
    "path traversal tar": (bad_traversal_tar, 400, "path traversal"),
    "symlink in tar": (bad_symlink_tar, 400, "link"),
    "zip bomb": (bad_zip_bomb, 413, "zip bomb"),
    "oversize body": (bad_oversize, 413, "exceeds"),
    "corrupt archive": (bad_corrupt_tar, 400, "corrupt or truncated"),
    "unexpected file": (bad_extra_file, 400, "unexpected file 'train.py'"),
}


def _nothing_left(
    server: AdapterServer, admin: httpx.Client, tenant: str, before: list[str]
) -> None:
    assert admin.get(f"/admin/v1/tenants/{tenant}/adapters").json()["data"] == []
    assert server.bucket_keys() == before
    pg = server.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(pg) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM adapters a JOIN tenants t ON t.id = a.tenant_id "
            "WHERE t.name = %s",
            (tenant,),
        ).fetchone()
    assert rows == (0,)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_upload_refused_and_nothing_left(
    server: AdapterServer, admin: httpx.Client, tmp_path: Path, case: str
) -> None:
    make, status, words = BAD[case]
    tenant, _ = make_tenant(admin)
    before = server.bucket_keys()
    r = upload(admin, tenant, "bad", make(tmp_path))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    _nothing_left(server, admin, tenant, before)


@pytest.mark.parametrize("name", ["", "bad/name", "x@3", "-dash", "a" * 65, "sp ace"])
def test_bad_name(server: AdapterServer, admin: httpx.Client, tmp_path: Path, name: str) -> None:
    tenant, _ = make_tenant(admin)
    before = server.bucket_keys()
    r = upload(admin, tenant, name, _files(_write(tmp_path)))
    assert r.status_code == 400, r.text
    assert "name" in r.json()["error"]["message"]
    _nothing_left(server, admin, tenant, before)


def test_wrong_tenant_key_and_missing_scope(
    server: AdapterServer, admin: httpx.Client, tmp_path: Path
) -> None:
    victim, _ = make_tenant(admin)
    _, other_key = make_tenant(admin, "adapters:write")
    own, infer_key = make_tenant(admin, "inference")
    before = server.bucket_keys()
    files = _files(_write(tmp_path))
    with server.client(other_key) as c:
        r = upload(c, victim, "steal", files)
    assert r.status_code == 403 and "another tenant" in r.json()["error"]["message"]
    with server.client(infer_key) as c:
        r = upload(c, own, "nope", files)
    assert r.status_code == 403 and "adapters:write" in r.json()["error"]["message"]
    with httpx.Client(base_url=server.url) as anon:
        r = upload(anon, victim, "anon", files)
    assert r.status_code == 401
    r = upload(admin, "no-such-tenant", "x", files)
    assert r.status_code == 404 and "no-such-tenant" in r.json()["error"]["message"]
    _nothing_left(server, admin, victim, before)
    _nothing_left(server, admin, own, before)


def test_oversize_streamed_without_length(server: AdapterServer, admin: httpx.Client) -> None:
    """A chunked body (no Content-Length) is cut off once it passes the cap."""
    tenant, _ = make_tenant(admin)
    before = server.bucket_keys()
    boundary = "lpxboundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="adapter_model.safetensors"\r\n\r\n'
        ).encode()
        for _ in range(MAX_BODY // (256 << 10) + 4):
            yield b"\0" * (256 << 10)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = admin.post(
        f"/admin/v1/tenants/{tenant}/adapters",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text
    _nothing_left(server, admin, tenant, before)


def test_tar_member_names_cannot_smuggle_pickles(admin: httpx.Client, tmp_path: Path) -> None:
    tenant, _ = make_tenant(admin)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in {**_members(tmp_path), "adapter_model.pt": b"\x80\x04"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    r = upload(admin, tenant, "p", [("files", ("a.tgz", buf.getvalue()))])
    assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]


def test_cli_upload_with_progress(
    server: AdapterServer, admin: httpx.Client, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from loraplex.main import app

    tenant, _ = make_tenant(admin)
    src = write_lora(tmp_path / "peft", TINY, rank=2)
    base = ["admin", "--url", server.url, "--token", server.admin_token, "--json", "adapter"]
    result = CliRunner().invoke(app, [*base, "upload", tenant, "cli-lora", str(src)])
    assert result.exit_code == 0, result.output
    assert '"version": 1' in result.output and '"rank": 2' in result.output
    archive = tar_gz(tmp_path / "a.tar.gz", peft_members(src))
    result = CliRunner().invoke(app, [*base, "upload", tenant, "cli-lora", str(archive)])
    assert result.exit_code == 0 and '"version": 2' in result.output, result.output
    result = CliRunner().invoke(app, [*base, "alias", tenant, "cli-lora", "stable", "1"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*base, "upload", tenant, "bad", str(tmp_path / "nope")])
    assert result.exit_code != 0
    bad = tmp_path / "bad"
    write_lora(bad, TINY, rank=16)
    result = CliRunner().invoke(app, [*base, "upload", tenant, "bad", str(bad)])
    assert result.exit_code == 1 and "maximum rank" in result.output


def test_gc_collects_deleted_bytes(
    server: AdapterServer, admin: httpx.Client, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from loraplex.main import app

    tenant, key = make_tenant(admin, "adapters:write")
    v = upload(admin, tenant, "temp", _files(write_lora(tmp_path / "x", TINY, seed=99))).json()
    obj = f"{PREFIX}/blobs/{v['sha256'][:2]}/{v['sha256']}.tar"
    assert obj in server.bucket_keys()
    with server.client(key) as c:  # a tenant key may not run GC
        assert c.post("/admin/v1/adapters/gc", json={"grace_s": 0}).status_code == 401
    assert admin.post("/admin/v1/adapters/gc", json={"grace_s": 0}).status_code == 200
    assert obj in server.bucket_keys()  # still used
    assert admin.delete(f"/admin/v1/tenants/{tenant}/adapters/temp").status_code == 200
    assert obj in server.bucket_keys()  # collected later, not at delete
    base = ["admin", "--url", server.url, "--token", server.admin_token, "--json", "adapter"]
    result = CliRunner().invoke(app, [*base, "gc", "--grace-s", "0"])
    assert result.exit_code == 0, result.output
    assert obj not in server.bucket_keys()


def test_cli_upload_streams_a_peft_dir_and_reports_errors(
    server: AdapterServer, admin: httpx.Client, make_peft_adapter, tiny_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """`loraplex admin adapter upload` over the same REST: a PEFT directory lands as a new
    version; an upload the server refuses exits 1 with the server's message."""
    from typer.testing import CliRunner

    from loraplex.admin_cli import app

    tenant, _ = make_tenant(admin)
    base = ["--url", server.url, "--token", server.admin_token]
    peft_dir = make_peft_adapter(tiny_llama_dir, rank=2, targets=["q_proj"])
    result = CliRunner().invoke(
        app, [*base, "--json", "adapter", "upload", tenant, "cli", str(peft_dir)]
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown["name"], shown["version"], shown["rank"]) == ("cli", 1, 2)
    assert f"{PREFIX}/blobs/{shown['sha256'][:2]}/{shown['sha256']}.tar" in server.bucket_keys()

    bad = peft_dir.parent / "bad-cli-adapter"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    result = CliRunner().invoke(app, [*base, "adapter", "upload", tenant, "cli", str(bad)])
    assert result.exit_code != 0 and ("pickle" in result.output or "safetensors" in result.output)
    listed = admin.get(f"/admin/v1/tenants/{tenant}/adapters/cli").json()
    assert [v["version"] for v in listed["versions"]] == [1]

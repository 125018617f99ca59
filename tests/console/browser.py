"""Headless Chromium for the console tests, driven by Selenium through chromedriver.

Found in this order: ``LORAPLEX_CHROMIUM`` and ``LORAPLEX_CHROMEDRIVER`` (paths); Debian's
``chromium`` and ``chromedriver`` on the PATH (``.ci/run`` installs them where it may use
root); else Debian's packages unpacked without root into ``<repo>/.tools/chromium``
(git-ignored): ``apt-get download`` of chromium, chromium-driver and the libraries this
system lacks (as ``apt-get -s install`` lists them), then ``dpkg -x``, run with
``LD_LIBRARY_PATH`` pointing into the unpacked tree. Selenium's own driver download is
never used (the runtime has no internet)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "chromium"
PACKAGES = ["chromium", "chromium-driver"]


@dataclass(frozen=True)
class Chromium:
    binary: str
    driver: str
    env: dict[str, str] = field(default_factory=dict)


def _unpacked(root: Path) -> Chromium | None:
    binary = root / "usr/lib/chromium/chromium"
    driver = root / "usr/lib/chromium/chromedriver"
    if not (binary.exists() and driver.exists()):
        return None
    libs = [root / "usr/lib/x86_64-linux-gnu", root / "usr/lib/x86_64-linux-gnu/pulseaudio"]
    libs += [root / "usr/lib/aarch64-linux-gnu", root / "usr/lib/chromium"]
    paths = [str(p) for p in libs if p.exists()]
    if os.environ.get("LD_LIBRARY_PATH"):
        paths.append(os.environ["LD_LIBRARY_PATH"])
    return Chromium(str(binary), str(driver), {"LD_LIBRARY_PATH": ":".join(paths)})


def _unpack(root: Path) -> None:
    """Debian's chromium and what it needs that is not installed, unpacked under ``root``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(
            "the console tests need Chromium: install Debian's chromium and chromium-driver, "
            "or set LORAPLEX_CHROMIUM and LORAPLEX_CHROMEDRIVER"
        )
    plan = subprocess.run(
        ["apt-get", "-s", "install", "--no-install-recommends", *PACKAGES],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = [line.split()[1] for line in plan.splitlines() if line.startswith("Inst ")]
    if not names:
        raise RuntimeError(f"apt-get lists nothing to install for {PACKAGES}:\n{plan}")
    with tempfile.TemporaryDirectory(prefix="lpx-chromium-") as tmp:
        subprocess.run(["apt-get", "download", *names], cwd=tmp, check=True, capture_output=True)
        staging = root.with_name(root.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)  # whole or not at all


def find_chromium() -> Chromium:
    binary, driver = os.environ.get("LORAPLEX_CHROMIUM"), os.environ.get("LORAPLEX_CHROMEDRIVER")
    if binary and driver:
        return Chromium(binary, driver)
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary and driver:
        return Chromium(binary, driver)
    found = _unpacked(TOOLS / "root")
    if found is None:
        TOOLS.mkdir(parents=True, exist_ok=True)
        _unpack(TOOLS / "root")
        found = _unpacked(TOOLS / "root")
    if found is None:
        raise RuntimeError(f"no chromium under {TOOLS / 'root'} after unpacking")
    return found


def start_browser(chromium: Chromium, downloads: Path):  # type: ignore[no-untyped-def]
    """A headless Chrome WebDriver session (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium.binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # containers and root: the sandbox needs namespaces
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
        "--no-first-run",
        "--password-store=basic",
    ):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    env = {**os.environ, **chromium.env}
    service = Service(executable_path=chromium.driver, env=env)
    return webdriver.Chrome(options=options, service=service)

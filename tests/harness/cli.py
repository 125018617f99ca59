"""Running the real ``loraplex`` entry point in a subprocess, with a clean environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# A production-grade secret for tests that set a database URL (placeholders are refused).
SECRET = "0123456789abcdef0123456789abcdef"


def loraplex_argv() -> list[str]:
    """The installed console script, else the module (a checkout without ``pip install``)."""
    script = Path(sys.executable).with_name("loraplex")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loraplex.main"]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without LORAPLEX_* settings, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    return {**base, **(extra or {})}

"""Console test fixtures: ``console_server`` (console_live.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from console_live import console_server  # the fixture

__all__ = ["console_server"]

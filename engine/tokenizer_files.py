"""The served model's tokenizer as files, so a client in another process (the gateway, with
no torch and maybe no model files) tokenizes and detokenizes exactly as the engine would.

The engine side saves its transformers tokenizer with ``save_pretrained`` (``tokenizer.json``,
``tokenizer_config.json``, the chat template...); the client side writes those files to a
private temporary directory and loads them with ``AutoTokenizer.from_pretrained``: the
library's own round trip, so special tokens, the chat template and added tokens survive.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 64 * 1024 * 1024
# transformers' lazy imports are not thread safe: two clients of one process (a router's,
# one per engine replica) loading at once could see "cannot import name 'AutoTokenizer'".
_LOAD_LOCK = threading.Lock()


def export_tokenizer(tokenizer: Any) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="loraplex-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def load_tokenizer(files: dict[str, bytes]) -> Any:
    with _LOAD_LOCK:
        return _load(files)


def _load(files: dict[str, bytes]) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="loraplex-tok-") as tmp:
        for name, data in files.items():
            if Path(name).name != name or name.startswith(".") or len(data) > MAX_FILE_BYTES:
                raise ValueError(f"refusing tokenizer file {name!r}")
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)

"""Adapter and alias names: what a tenant may put in the OpenAI ``model`` field."""

from __future__ import annotations

import re

from loraplex.adapters.errors import InvalidAdapter

# No '@' (name@version), '/' or ':' (reserved for base models and routing).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" passes a trailing newline


def check_name(name: str, *, param: str = "name") -> str:
    if not name:
        raise InvalidAdapter(f"{param} is empty", param=param)
    if not NAME_RE.match(name):
        raise InvalidAdapter(
            f"{param} {name[:80]!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param=param,
        )
    return name


def split_model(model: str) -> tuple[str, int | None]:
    """``"support@3"`` -> ``("support", 3)``; ``"support"`` -> ``("support", None)``."""
    name, sep, ver = model.rpartition("@")
    if sep and ver.isdigit() and name:
        return name, int(ver)
    return model, None

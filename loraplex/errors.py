"""Turn configuration and connection failures into one line naming the setting.

``loraplex`` never shows a traceback for bad configuration: it prints
``error: LORAPLEX_X: what is wrong`` on stderr and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from pydantic import ValidationError
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from loraplex.tenancy.settings import ConfigError

EXIT_CONFIG = 2


def fail(setting: str, message: str) -> NoReturn:
    print(f"error: {setting}: {message}", file=sys.stderr)
    raise typer.Exit(EXIT_CONFIG)


def _from_validation(exc: ValidationError, env_prefix: str) -> tuple[str, str]:
    err = exc.errors()[0]
    original = (err.get("ctx") or {}).get("error")
    if isinstance(original, ConfigError):
        return original.setting, str(original).split(": ", 1)[-1]
    loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
    setting = env_prefix + (loc[0].upper() if loc else "SETTINGS")
    value = err.get("input")
    shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
    return setting, f"{err['msg']}{shown}"


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while getattr(seen, "orig", None) is not None:
        seen = seen.orig  # type: ignore[attr-defined]
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return seen


def describe_connection_error(exc: BaseException) -> str:
    cause = _root_cause(exc)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


@contextmanager
def config_errors(database_setting: str = "LORAPLEX_DATABASE_URL") -> Iterator[None]:
    """Map what bad configuration raises to ``fail(setting, message)``."""
    try:
        yield
    except ConfigError as exc:
        fail(exc.setting, str(exc).split(": ", 1)[-1])
    except ValidationError as exc:
        fail(*_from_validation(exc, "LORAPLEX_"))
    except (ArgumentError, NoSuchModuleError) as exc:
        fail(database_setting, f"not a valid database URL ({exc})")
    except (DBAPIError, OSError, TimeoutError) as exc:
        fail(database_setting, f"cannot connect to the database: {describe_connection_error(exc)}")

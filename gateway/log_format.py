"""How every loraplex process logs (``LORAPLEX_LOG_FORMAT``): ``text`` lines
(``2026-12-03 10:32:36 INFO loraplex.request: ...``) or ``json``, one object a line with
``ts``, ``level``, ``logger`` and ``message``, plus the fields a record carries (the
request line's ``request_id``, ``tenant``, ``model``, ``status``, tokens, ``latency_ms``).

``logging_config`` is a ``logging.config.dictConfig`` dict: uvicorn applies it in each
gateway worker (``log_config=``); the supervisor and the engine process apply it
themselves (``configure``).
"""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def logging_config(fmt: LogFormat) -> dict[str, Any]:
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"}
        if fmt == "json"
        else {"format": TEXT, "datefmt": "%Y-%m-%d %H:%M:%S"}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": {
            "loraplex": {"handlers": ["main"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["main"], "level": "INFO", "propagate": False},
            # loraplex.request writes the line per request (LORAPLEX_ACCESS_LOG)
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["main"], "level": "WARNING"},
    }


def configure(fmt: LogFormat) -> None:
    logging.config.dictConfig(logging_config(fmt))

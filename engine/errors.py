"""Typed engine errors. The gateway maps each to an HTTP status exactly once."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. ``param`` names the offending request field where there is one."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(EngineError):
    """The request itself is bad (maps to 400)."""


class PromptTooLong(InvalidRequest):
    """Prompt plus max_tokens does not fit the model's context (maps to 400)."""


class AdapterIncompatible(InvalidRequest):
    """The adapter's modules, shapes or rank do not fit the served base model (400)."""


class AdapterLoadError(EngineError):
    """The adapter could not be fetched or read (maps to 503; retried later)."""


class EngineOverloaded(EngineError):
    """The engine refuses new work for now (maps to 503)."""


class EngineDead(EngineError):
    """The step loop died; nothing more will be served (maps to 500)."""

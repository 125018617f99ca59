"""Typed engine errors. The gateway maps each to an HTTP status exactly once.

Errors cross the engine's process boundary as :class:`engine.api.ErrorInfo` (the class
name, message and param) and become the same typed error on the client side
(:func:`error_from_info`).
"""

from __future__ import annotations

from loraplex.engine.api import ErrorInfo


class EngineError(Exception):
    """Base class. ``param`` names the offending request field where there is one."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(type(self).__name__, self.message, self.param)


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
    """The engine is gone (step loop died, process exited, unreachable): 503 until it is
    back."""


class RunnerFailed(EngineDead):
    """A part of the model runner is gone (a tensor-parallel rank died or a collective
    failed): the engine cannot step again; its process exits and is restarted."""


class RequestFailed(EngineError):
    """The engine failed this request alone while serving it (maps to 500)."""


_KINDS: dict[str, type[EngineError]] = {
    cls.__name__: cls
    for cls in (
        EngineError,
        InvalidRequest,
        PromptTooLong,
        AdapterIncompatible,
        AdapterLoadError,
        EngineOverloaded,
        EngineDead,
        RunnerFailed,
        RequestFailed,
    )
}


def error_from_info(info: ErrorInfo) -> EngineError:
    """The typed error an :class:`ErrorInfo` describes (unknown kinds: ``EngineError``)."""
    return _KINDS.get(info.kind, EngineError)(info.message, param=info.param)


def as_engine_error(exc: BaseException) -> EngineError:
    """``exc`` itself when typed, else a :class:`RequestFailed` that says what it was."""
    if isinstance(exc, EngineError):
        return exc
    return RequestFailed(f"the engine failed this request ({type(exc).__name__}; see its log)")

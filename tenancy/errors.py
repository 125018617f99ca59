"""Typed domain errors. Services raise these; ``gateway.errors`` maps them once to the
OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations


class DomainError(Exception):
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidInput(DomainError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class Unauthenticated(DomainError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(DomainError):
    status, type, code = 403, "permission_error", "insufficient_scope"


class NotFound(DomainError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(DomainError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(DomainError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class RateLimited(DomainError):
    """429. ``retry_after`` seconds and ``headers`` (x-ratelimit-*) go on the response."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.headers = headers or {}


class QuotaExceeded(RateLimited):
    code = "insufficient_quota"


class Unavailable(DomainError):
    """503. ``retry_after`` seconds go on the response as ``Retry-After``."""

    status, type, code = 503, "service_unavailable", "service_unavailable"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class DatabaseUnavailable(Unavailable):
    """The database refused, timed out, or its circuit breaker is open."""

    code = "database_unavailable"

"""Adapter errors: each says what is wrong in words a tenant can act on."""

from __future__ import annotations

from loraplex.tenancy.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, Unavailable


class InvalidAdapter(InvalidInput):
    """The upload is not a PEFT LoRA adapter that fits the served base model (400)."""

    code = "invalid_adapter"


class UnsafeArchive(InvalidAdapter):
    """An archive with path traversal, links, too many members or too many bytes (400)."""

    code = "unsafe_archive"


class UploadTooLarge(PayloadTooLarge):
    """The request body or an archive's expanded contents exceed the configured cap (413)."""


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class AdapterConflict(Conflict):
    code = "adapter_conflict"


class StoreUnavailable(Unavailable):
    """The object store did not answer or refused; nothing was registered (503)."""

    code = "object_store_unavailable"


class AdapterFetchError(Exception):
    """Raised by a fetch callback: the adapter's bytes could not be brought to local disk.

    The engine turns any exception from ``AdapterRef.fetch`` into a 503 for the requests
    that need this adapter; ``retry_after`` says when the fetcher will try the store again.
    """

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

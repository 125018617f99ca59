"""An object store behind the object store's circuit breaker.

Every call asks the breaker first: while it is open the call fails at once with a
:class:`StoreError` whose ``retry_after`` says when a probe may run, so a black-holed
store costs callers (uploads, cold adapter fetches, GC, ``/ready``) milliseconds instead
of a timeout each. A ``StoreError`` is a failure; an answer, ``ObjectMissing`` included,
is a success. Methods block like the wrapped store's: call them from a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from loraplex.adapters.storage import ObjectInfo, ObjectMissing, ObjectStore, StoreError
from loraplex.tenancy.breaker import CircuitBreaker, CircuitOpen

T = TypeVar("T")


class GuardedStore:
    def __init__(self, store: ObjectStore, breaker: CircuitBreaker) -> None:
        self.store = store
        self.breaker = breaker

    def _admit(self) -> bool:
        try:
            return self.breaker.before_call()
        except CircuitOpen as exc:
            raise StoreError(str(exc), retry_after=exc.retry_after) from None

    def _failed(self, exc: StoreError) -> None:
        self.breaker.record_failure()
        exc.retry_after = self.breaker.retry_after()

    def _call(self, fn: Callable[[], T]) -> T:
        probe = self._admit()
        try:
            result = fn()
        except ObjectMissing:
            self.breaker.record_success()
            raise
        except StoreError as exc:
            self._failed(exc)
            raise
        except BaseException:
            if probe:
                self.breaker.release_probe()
            raise
        self.breaker.record_success()
        return result

    def put_file(self, key: str, path: Path) -> None:
        self._call(lambda: self.store.put_file(key, path))

    def get_file(self, key: str, dest: Path) -> None:
        self._call(lambda: self.store.get_file(key, dest))

    def delete(self, key: str) -> None:
        self._call(lambda: self.store.delete(key))

    def cleanup_incomplete(self, older_than: datetime) -> int:
        return self._call(lambda: self.store.cleanup_incomplete(older_than))

    def list(self) -> Iterator[ObjectInfo]:
        probe = self._admit()
        answered = False
        try:
            for info in self.store.list():
                if not answered:
                    answered = True
                    self.breaker.record_success()
                yield info
        except StoreError as exc:
            self._failed(exc)
            raise
        except BaseException:  # GeneratorExit too: the caller stopped before an answer
            if probe and not answered:
                self.breaker.release_probe()
            raise
        if not answered:  # an empty listing is an answer
            self.breaker.record_success()

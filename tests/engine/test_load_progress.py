"""A model load shows how far it is: log lines at each quarter when stderr is no terminal
(a bar when it is; rich draws it)."""

from __future__ import annotations

import logging

import pytest

from loraplex.engine.model.progress import LoadProgress


def test_quarters_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loraplex.engine.load")
    with LoadProgress("reading model.gguf", 10, bar=False) as p:
        for _ in range(10):
            p.advance()
        p.advance(5)  # past the end: nothing more
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "reading model.gguf: 25% (3 of 10)",
        "reading model.gguf: 50% (5 of 10)",
        "reading model.gguf: 75% (8 of 10)",
        "reading model.gguf: 100% (10 of 10)",
    ]


def test_a_bar_runs_to_the_end() -> None:
    with LoadProgress("reading", 4, bar=True) as p:
        for _ in range(4):
            p.advance()
        assert p.done == 4 and p._bar is not None
    assert p._bar is None

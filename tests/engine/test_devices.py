"""configure_pinned_memory: the engine's pinned-allocator settings, unless the operator's."""

import pytest

from loraplex.engine.devices import PINNED_ALLOC_SETTINGS, configure_pinned_memory


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_operator_pinned_settings_are_kept(monkeypatch, var):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv(var, "expandable_segments:True,pinned_num_register_threads:4")
    assert configure_pinned_memory() is None


def test_engine_settings_applied_without_operator_pinned_options(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert configure_pinned_memory() == PINNED_ALLOC_SETTINGS

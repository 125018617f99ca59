"""Optional triton import: the engine runs on CPU (references) without it."""

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "tl", "triton"]

"""The wrappers' host-int helpers agree with triton's constexpr functions they replace."""

import pytest

from loraplex.engine.kernels._triton import HAVE_TRITON, cdiv, next_pow2, triton

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="compares against triton")


def test_cdiv_and_next_pow2_match_triton():
    for a in range(0, 3000, 7):
        for b in (1, 2, 3, 16, 64, 100, 512):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in range(1, 70000, 13):
        assert next_pow2(n) == triton.next_power_of_2(n), n

"""Kernel tests: Triton on CUDA, else Triton's interpreter on CPU (set before triton loads).

If another test package imported the kernels first (compiled mode), reload the op modules so
their ``@triton.jit`` functions are rebuilt in interpreter mode.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in list(sys.modules):
        if _name.startswith("engine.kernels.") and _name.split(".")[-1] not in (
            "lora_meta",
            "_triton",
        ):
            importlib.reload(sys.modules[_name])

    # numpy >= 2.5 refuses int() of a one-element 1-d array, which the interpreter hands to
    # range() for a scalar loaded from memory (`for r in range(0, rank, BLOCK)`): use .item().
    from triton.runtime import interpreter as _interp

    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

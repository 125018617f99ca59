"""Validate a PEFT LoRA directory against the served base model, before storing anything.

Order: config, then the safetensors header (read by hand, nothing loaded), names and shapes
against :class:`BaseModelSpec`, and only then the weights themselves (finite values).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.peft_config import LoraConfig, read_config
from loraplex.adapters.safetensors_header import TensorInfo, read_header
from loraplex.adapters.spec import BaseModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ALLOWED_DTYPES = ("F16", "BF16", "F32")
_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(?:experts\.(\d+)\.)?(\w+)"
    r"\.lora_(A|B)\.weight$"
)


@dataclass(frozen=True)
class ValidatedAdapter:
    config: LoraConfig
    target_modules: tuple[str, ...]
    num_tensors: int


def _bad(message: str) -> InvalidAdapter:
    return InvalidAdapter(f"adapter_model.safetensors: {message}", param="adapter_model")


def validate_dir(directory: Path, spec: BaseModelSpec, *, max_rank: int) -> ValidatedAdapter:
    """Raise :class:`InvalidAdapter` naming the first problem found; return the summary."""
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise InvalidAdapter(f"{required} is missing from the upload", param=required)
    config = read_config(directory / CONFIG_FILE, max_rank=max_rank)
    tensors = read_header(directory / WEIGHTS_FILE)
    modules = check_tensors(tensors, config.rank, spec)
    check_finite(directory / WEIGHTS_FILE)
    return ValidatedAdapter(config=config, target_modules=modules, num_tensors=len(tensors))


def check_tensors(tensors: list[TensorInfo], rank: int, spec: BaseModelSpec) -> tuple[str, ...]:
    if not tensors:
        raise _bad("holds no tensors")
    seen: dict[tuple[int, str], set[str]] = {}  # (layer, or layer * E + expert; module)
    for t in tensors:
        if t.dtype not in ALLOWED_DTYPES:
            raise _bad(f"tensor {t.name!r} has dtype {t.dtype}; allowed: F16, BF16, F32")
        layer, parent, module, side, expert = _parse_name(t.name, spec)
        shape = spec.module_shape(module)
        if shape is None or shape.parent != parent:
            raise _bad(
                f"tensor {t.name!r} targets module {parent}.{module}, which the base model "
                f"{spec.name!r} does not have or cannot adapt (adaptable: "
                f"{', '.join(spec.modules)})"
            )
        want = (rank, shape.in_features) if side == "A" else (shape.out_features, rank)
        if t.shape != want:
            raise _bad(
                f"tensor {t.name!r} has shape {list(t.shape)} but rank {rank} on "
                f"{spec.name!r} needs {list(want)}"
            )
        if module.startswith("experts."):
            layer = layer * spec.num_experts + expert
        sides = seen.setdefault((layer, module), set())
        sides.add(side)
    for (layer, module), sides in sorted(seen.items()):
        if sides != {"A", "B"}:
            missing = ({"A", "B"} - sides).pop()
            where = f"layer {layer}"
            if module.startswith("experts."):
                where = "layer {} expert {}".format(*divmod(layer, spec.num_experts))
            raise _bad(f"{where} {module} has no lora_{missing} tensor")
    return tuple(m for m in spec.modules if any(mod == m for _, mod in seen))


def _parse_name(name: str, spec: BaseModelSpec) -> tuple[int, str, str, str, int]:
    if "lora_magnitude_vector" in name:
        raise _bad(f"tensor {name!r} is a DoRA magnitude vector: DoRA is not supported")
    m = _NAME.match(name)
    if m is None:
        raise _bad(
            f"tensor {name!r} does not name a LoRA weight of a decoder layer (expected "
            "base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>.weight)"
        )
    layer, expert, module = int(m.group(1)), int(m.group(3) or 0), m.group(4)
    if layer >= spec.num_layers:
        raise _bad(f"tensor {name!r}: layer {layer} but {spec.name!r} has {spec.num_layers}")
    if m.group(3) is not None:  # an expert's projection (MoE)
        module = f"experts.{module}"
        if module in spec.modules and expert >= spec.num_experts:
            raise _bad(f"tensor {name!r}: expert {expert} but {spec.name!r} has {spec.num_experts}")
    return layer, m.group(2), module, m.group(5), expert


def check_finite(path: Path) -> None:
    """Load one tensor at a time (bounded memory) and refuse NaN or infinite values."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if not bool(torch.isfinite(tensor).all()):
                    raise _bad(f"tensor {name!r} contains NaN or infinite values")
    except InvalidAdapter:
        raise
    except Exception as exc:  # the header checks passed, so this is a corrupt body
        raise _bad(f"could not be read ({exc})") from None

"""FP8 base weights: the weight value, quantization at load, and FP8 checkpoints as published.

An :class:`Fp8Weight` stands where a dense ``[N, K]`` weight would (``LayerWeights``): e4m3
``qweight`` with float32 scales per output channel ``[N]`` or per ``[bn, bk]`` block. The
forward calls ``kernels.fp8_linear`` on it; the LoRA path is untouched (adapters stay in the
activations' dtype).

Where the weights come from (:class:`LinearLoader`):

- ``quantization="fp8"`` on an unquantized checkpoint (or a GGUF file, or ``dummy:``): each
  fused projection quantized at load, per output channel, ``scale = amax / 448``.
- A Hugging Face folder whose ``config.json`` has a ``quantization_config`` of
  ``quant_method: "fp8"`` (``weight_block_size`` with ``weight_scale_inv`` blocks, or a
  per-tensor ``weight_scale``), or ``compressed-tensors`` float-quantized 8-bit weights
  (``weight_scale`` per channel, per tensor or per block); loaded as published, whatever the
  setting. Their ``input_scale`` (static activation scales) is read by no one: activations are
  quantized per token at run time (W8A8) or not at all (W8A16). Modules left unquantized (the
  ``ignore`` list, ``lm_head``) stay dense.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.engine.kernels.fp8_linear import FP8, FP8_MAX, dequantize
from loraplex.engine.model.config import UnsupportedModel

log = logging.getLogger("loraplex.engine.load")
QUANTIZATIONS = ("fp8",)


@dataclass
class Fp8Weight:
    qweight: torch.Tensor  # [N, K] float8_e4m3fn
    scale: torch.Tensor  # [N] float32, or [cdiv(N, bn), cdiv(K, bk)] with block
    block: tuple[int, int] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.block, dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scale]


Weight = torch.Tensor | Fp8Weight


def quantize_per_channel(w: torch.Tensor) -> Fp8Weight:
    """``[N, K]`` -> e4m3 with one scale per output row (its amax / 448), on w's device."""
    wf = w.float()
    scale = (wf.abs().amax(1) / FP8_MAX).clamp_min(1e-12)
    q = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8Weight(q.contiguous(), scale.contiguous())


def fuse(parts: Sequence[Fp8Weight]) -> Fp8Weight:
    """Projections stacked on the output dim (q/k/v, gate/up) as one weight. Block scales
    stack when every part's rows are whole blocks; otherwise (or mixed layouts) the parts are
    dequantized and quantized again per channel."""
    if len(parts) == 1:
        return parts[0]
    q = torch.cat([p.qweight for p in parts], 0)
    blocks = {p.block for p in parts}
    if blocks == {None}:
        return Fp8Weight(q, torch.cat([p.scale for p in parts]))
    block = next(iter(blocks))
    if len(blocks) == 1 and block is not None and all(p.shape[0] % block[0] == 0 for p in parts):
        return Fp8Weight(q, torch.cat([p.scale for p in parts], 0), block)
    log.warning("fused projections with unaligned scale blocks: quantized again per channel")
    return quantize_per_channel(torch.cat([p.dequantize(torch.float32) for p in parts], 0))


@dataclass(frozen=True)
class CheckpointQuant:
    """How a published FP8 checkpoint stores its scales."""

    method: str  # "fp8" or "compressed-tensors"
    scale_name: str  # "weight_scale_inv" (fp8 block-wise) or "weight_scale"
    block: tuple[int, int] | None  # weight_block_size / block_structure


def checkpoint_quant(hf_config: dict[str, Any]) -> CheckpointQuant | None:
    """The ``quantization_config`` of an HF ``config.json`` -> None (unquantized) or the FP8
    layout; other methods (GPTQ, AWQ, bitsandbytes, int8) are refused by name."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise UnsupportedModel(f"fp8 checkpoint format {qc.get('fmt')!r} (only e4m3)")
        wbs = qc.get("weight_block_size")
        if wbs:
            return CheckpointQuant("fp8", "weight_scale_inv", (int(wbs[0]), int(wbs[1])))
        return CheckpointQuant("fp8", "weight_scale", None)
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if not groups:
            raise UnsupportedModel("compressed-tensors checkpoint without config_groups")
        block = None
        for g in groups:
            w = g.get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise UnsupportedModel(
                    f"compressed-tensors weights {w.get('type')!r} {w.get('num_bits')}-bit "
                    "(only 8-bit float, FP8)"
                )
            strategy = w.get("strategy")
            if strategy == "block":
                bs = w.get("block_structure") or [128, 128]
                block = (int(bs[0]), int(bs[1]))
            elif strategy not in ("channel", "tensor"):
                raise UnsupportedModel(f"compressed-tensors weight strategy {strategy!r}")
        return CheckpointQuant("compressed-tensors", "weight_scale", block)
    raise UnsupportedModel(f"quantization {method!r} (served: fp8, compressed-tensors FP8)")


def _published(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> Fp8Weight:
    """One module's checkpoint tensors -> Fp8Weight: per-tensor and per-channel scales as
    ``[N]``, block scales as they are."""
    n = q.shape[0]
    s = scale.float()
    if block is not None and s.dim() == 2 and s.numel() > 1:
        return Fp8Weight(q.contiguous(), s.contiguous(), block)
    if s.numel() == 1:
        s = s.reshape(1).expand(n)
    elif s.numel() == n:
        s = s.reshape(n)
    else:
        raise UnsupportedModel(f"weight scale of shape {tuple(scale.shape)} for {n} rows")
    return Fp8Weight(q.contiguous(), s.contiguous())


class LinearLoader:
    """Reads one fused projection (its HF module prefixes, stacked on the output dim) as a
    dense tensor of ``dtype`` or an :class:`Fp8Weight`, on ``device``."""

    def __init__(
        self,
        get: Callable[[str], torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        *,
        quantization: str | None = None,
        checkpoint: CheckpointQuant | None = None,
    ) -> None:
        if quantization not in (None, *QUANTIZATIONS):
            raise UnsupportedModel(f"quantization {quantization!r} (one of {QUANTIZATIONS})")
        self.get, self.dtype, self.device = get, dtype, device
        self.quantize = quantization == "fp8"
        self.checkpoint = checkpoint

    def _part(self, prefix: str) -> torch.Tensor | Fp8Weight:
        w = self.get(prefix + ".weight")
        ck = self.checkpoint
        if ck is None or w.dtype != FP8:
            return w.to(device=self.device, dtype=self.dtype)
        scale = self.get(prefix + "." + ck.scale_name).to(self.device)
        return _published(w.to(self.device), scale, ck.block)

    def __call__(self, *prefixes: str) -> Weight:
        parts = [self._part(p) for p in prefixes]
        if all(isinstance(p, torch.Tensor) for p in parts):
            dense = torch.cat(parts, 0).contiguous() if len(parts) > 1 else parts[0]
            return quantize_per_channel(dense) if self.quantize else dense  # type: ignore[arg-type]
        fp8 = [p if isinstance(p, Fp8Weight) else quantize_per_channel(p) for p in parts]
        return fuse(fp8)

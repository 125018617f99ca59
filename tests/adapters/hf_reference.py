"""Greedy tokens from Hugging Face + PEFT (adapters not merged), float32 on CPU."""

from __future__ import annotations

from pathlib import Path

import torch


class HfReference:
    def __init__(self, base_dir: Path) -> None:
        from transformers import LlamaForCausalLM

        self.base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def _greedy(self, model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        out: list[int] = []
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        return out

    def greedy(self, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
        if adapter is None:
            return self._greedy(self.base, prompt, n)
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.base, str(adapter)).eval()
        try:
            return self._greedy(model, prompt, n)
        finally:
            self.base = model.unload()  # the base model, without LoRA layers

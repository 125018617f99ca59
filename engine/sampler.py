"""Logits -> tokens for a whole batch at once, on the logits' device.

Order (as in HF, after OpenAI's ``logit_bias``): logit bias, repetition penalty (prompt +
generated), presence/frequency penalties (generated), the grammar's token mask (structured
outputs), temperature, top-k, top-p, min-p. Greedy rows (temperature 0) take the
argmax of the penalized logits. Random rows use the exponential race (argmax of
``p / E`` with ``E ~ Exp(1)``), which samples from ``p``; a row with its own
``torch.Generator`` draws its noise from it alone, so a seeded request gives the same
tokens whatever else shares its batch. Only the rows that ask for top-k/top-p are sorted. Logprobs are of the model's raw distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.api import SamplingParams
from loraplex.engine.devices import tensor_on, to_device
from loraplex.engine.token_mask import MaskBatch, apply_token_masks

_GREEDY_EPS = 1e-5


@dataclass
class SampleRow:
    params: SamplingParams
    token_ids: list[int]  # prompt then output; read only when a penalty asks
    prompt_len: int
    generator: torch.Generator | None = None
    # token ids that may not be sampled before ``params.min_tokens`` (eos and stop ids)
    stop_ids: tuple[int, ...] = ()

    @property
    def banned_now(self) -> bool:
        """Under ``min_tokens`` still: the stop ids are masked this step."""
        return bool(self.stop_ids) and (
            len(self.token_ids) - self.prompt_len < self.params.min_tokens
        )

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # of the chosen tokens; None when no row asked
    top_ids: list[list[int]] | None  # per row: its k alternatives (k = that row's logprobs)
    top_logprobs: list[list[float]] | None

    def logprob_of(self, row: int) -> tuple[float, list[int], list[float]] | None:
        """Row's (chosen logprob, alternative ids, their logprobs); None when not computed."""
        if self.logprobs is None or self.top_ids is None or self.top_logprobs is None:
            return None
        return self.logprobs[row], self.top_ids[row], self.top_logprobs[row]


def _token_mask(
    rows_ids: list[list[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, V] counts of each token id per row (padded lists, one scatter)."""
    width = max((len(ids) for ids in rows_ids), default=0)
    counts = torch.zeros(len(rows_ids), vocab + 1, device=device)
    if width == 0:
        return counts[:, :vocab], counts[:, :vocab] > 0
    padded = torch.full((len(rows_ids), width), vocab, dtype=torch.long)
    for i, ids in enumerate(rows_ids):
        padded[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    padded = to_device(padded, device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    counts = counts[:, :vocab]
    return counts, counts > 0


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    dev = logits.device
    rep = [r.params.repetition_penalty for r in rows]
    if any(p != 1.0 for p in rep):
        _, seen = _token_mask([r.token_ids for r in rows], vocab, dev)
        rp = tensor_on(rep, dev, logits.dtype).unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalized, logits)
    pres = [r.params.presence_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    if any(pres) or any(freq):
        counts, seen = _token_mask([r.output_ids for r in rows], vocab, dev)
        fp = tensor_on(freq, dev, logits.dtype).unsqueeze(1)
        pp = tensor_on(pres, dev, logits.dtype).unsqueeze(1)
        logits = logits - fp * counts - pp * seen.to(logits.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Adds each row's ``logit_bias`` (token id -> bias) in one scatter for the batch."""
    pairs = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
    if not pairs:
        return logits
    rows_idx, ids, biases = zip(*pairs, strict=True)
    dev = logits.device
    index = (tensor_on(list(rows_idx), dev), tensor_on(list(ids), dev))
    return logits.index_put(index, tensor_on(list(biases), dev, logits.dtype), accumulate=True)


def apply_min_tokens(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Rows still under their ``min_tokens``: their stop ids cannot be sampled."""
    banned = [(i, t) for i, r in enumerate(rows) if r.banned_now for t in r.stop_ids]
    if not banned:
        return logits
    rows_idx, ids = zip(*banned, strict=True)
    logits = logits.clone()
    dev = logits.device
    logits[tensor_on(list(rows_idx), dev), tensor_on(list(ids), dev)] = float("-inf")
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask to -inf what falls outside each row's top-k and top-p (keeps >= 1 token)."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=1)
    before = probs.cumsum(dim=1) - probs  # mass strictly ahead of each token
    drop |= before > top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _default_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    def __call__(
        self, logits: torch.Tensor, rows: list[SampleRow], masks: MaskBatch | None = None
    ) -> SampleResult:
        """Sample and wait for the result (one device sync)."""
        return self.sample(logits, rows, masks).resolve()

    def sample(
        self, logits: torch.Tensor, rows: list[SampleRow], masks: MaskBatch | None = None
    ) -> DeviceSample:
        """Queue the sampling of every row on the logits' device; nothing waits for it.
        The chosen ids stay on the device (the next step's inputs can read them there) and
        start their copy to the host; :meth:`DeviceSample.resolve` waits for that.
        ``masks``: the allowed tokens of constrained rows (structured outputs)."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} sample rows")
        logits = logits.float()
        dev = logits.device
        want = [r.params.logprobs for r in rows]
        raw_logprobs = logits.log_softmax(dim=1) if any(k is not None for k in want) else None

        logits = apply_logit_bias(logits, rows)
        logits = apply_penalties(logits, rows)
        logits = apply_min_tokens(logits, rows)
        if masks is not None:
            logits = apply_token_masks(logits, masks)
        greedy_ids = logits.argmax(dim=1)
        ps = [r.params for r in rows]
        is_greedy = [p.temperature < _GREEDY_EPS for p in ps]
        if all(is_greedy):  # decided on the host: no device sync for the common case
            chosen = greedy_ids
        else:
            # one host->device copy for every per-row knob: temperature, top_p, min_p, top_k
            knobs = torch.tensor(
                [
                    [1.0 if g else p.temperature, p.top_p, p.min_p, float(p.top_k)]
                    for p, g in zip(ps, is_greedy, strict=True)
                ]
            )
            knobs = to_device(knobs, dev)
            logits = logits / knobs[:, 0:1]
            cut = [i for i, p in enumerate(ps) if p.top_k > 0 or p.top_p < 1.0]
            if len(cut) == len(ps):
                logits = apply_top_k_top_p(logits, knobs[:, 3].long(), knobs[:, 1])
            elif cut:  # sort only the rows that ask (the sort is the sampler's costliest op)
                idx = tensor_on(cut, dev)
                sub = knobs.index_select(0, idx)
                logits = logits.index_copy(
                    0,
                    idx,
                    apply_top_k_top_p(logits.index_select(0, idx), sub[:, 3].long(), sub[:, 1]),
                )
            probs = logits.softmax(dim=1)
            if any(p.min_p > 0 for p in ps):
                floor = knobs[:, 2:3] * probs.max(dim=1, keepdim=True).values
                probs = probs.masked_fill(probs < floor, 0.0)
            noise = torch.empty_like(probs).exponential_(generator=self._default_generator(dev))
            for i, r in enumerate(rows):
                if r.generator is not None:
                    noise[i].exponential_(generator=r.generator)
            sampled = (probs / noise).argmax(dim=1)
            greedy = tensor_on(is_greedy, dev)
            chosen = torch.where(greedy, greedy_ids, sampled)

        if raw_logprobs is None:
            return DeviceSample(chosen, want)
        chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        k_max = max(k for k in want if k is not None)
        top = raw_logprobs.topk(k_max, dim=1) if k_max > 0 else None
        return DeviceSample(
            chosen, want, chosen_lp, None if top is None else top.values, None if top is None
            else top.indices
        )  # fmt: skip


class DeviceSample:
    """A batch's sampled ids (and logprobs) on the device, on their way to the host."""

    def __init__(
        self,
        chosen: torch.Tensor,
        want: list[int | None],
        chosen_lp: torch.Tensor | None = None,
        top_vals: torch.Tensor | None = None,
        top_ids: torch.Tensor | None = None,
    ) -> None:
        self.token_ids = chosen  # [N] int64, on the device: the next step may gather from it
        self._want = want
        parts = [t for t in (chosen, chosen_lp, top_vals, top_ids) if t is not None]
        self._host: list[torch.Tensor] = []
        self._event = None
        if chosen.device.type == "cuda":
            for t in parts:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                self._host.append(h)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = parts
        self._has_lp = chosen_lp is not None
        self._has_top = top_vals is not None

    def resolve(self) -> SampleResult:
        """Wait for the copy (one sync on CUDA) and read the host lists."""
        if self._event is not None:
            self._event.synchronize()
        host = iter(self._host)
        token_ids = next(host).tolist()
        if not self._has_lp:
            return SampleResult(token_ids, None, None, None)
        chosen_lp = next(host).tolist()
        rows = len(token_ids)
        top_ids: list[list[int]] = [[] for _ in range(rows)]
        top_lps: list[list[float]] = [[] for _ in range(rows)]
        if self._has_top:
            vals_l, ids_l = next(host).tolist(), next(host).tolist()
            for i, k in enumerate(self._want):
                if k:
                    top_ids[i], top_lps[i] = ids_l[i][:k], vals_l[i][:k]
        return SampleResult(token_ids, chosen_lp, top_ids, top_lps)

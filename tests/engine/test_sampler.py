"""Sampler from logits tensors: greedy, filters, penalties, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.engine.api import SamplingParams
from loraplex.engine.sampler import (
    Sampler,
    SampleRow,
    apply_logit_bias,
    apply_penalties,
    apply_top_k_top_p,
)

V = 50


def row(prompt=(), output=(), seed: int | None = None, **kw) -> SampleRow:
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    return SampleRow(SamplingParams(**kw), [*prompt, *output], len(prompt), gen)


def test_greedy_is_argmax():
    logits = torch.randn(4, V)
    res = Sampler()(logits, [row(temperature=0.0) for _ in range(4)])
    assert res.token_ids == logits.argmax(1).tolist() and res.logprobs is None


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, V)
    rows = [row(top_k=1), row(top_p=1e-6), row(min_p=1.0)]
    for _ in range(5):
        assert Sampler()(logits, rows).token_ids == logits.argmax(1).tolist()


def test_top_k_top_p_mask():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    out = apply_top_k_top_p(logits, torch.tensor([0, 2]), torch.tensor([0.7, 1.0]))
    kept = torch.isfinite(out)
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False]]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (V - 3))
    logits = torch.log(probs).clamp(min=-1e4).expand(4000, V).clone()
    res = Sampler(seed=1)(logits, [row(temperature=1.0) for _ in range(4000)])
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=V).float() / 4000
    assert torch.allclose(freq[:3], probs[:3], atol=0.03) and freq[3:].sum() == 0


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0] + [-1e4] * (V - 2)]).expand(2000, V).clone()
    cold = Sampler(seed=2)(logits, [row(temperature=0.2) for _ in range(2000)]).token_ids
    hot = Sampler(seed=2)(logits, [row(temperature=2.0) for _ in range(2000)]).token_ids
    assert cold.count(0) > hot.count(0) + 300


def test_seed_is_independent_of_batch_composition():
    torch.manual_seed(0)
    mine = torch.randn(V)
    out_alone, out_crowd = [], []
    alone, crowd = row(seed=42), row(seed=42)
    for _ in range(10):
        out_alone += Sampler(seed=0)(mine.unsqueeze(0), [alone]).token_ids
        others = torch.randn(5, V)
        batch = torch.cat([others[:2], mine.unsqueeze(0), others[2:]])
        rows = [row(), row(), crowd, row(), row(), row()]
        out_crowd.append(Sampler(seed=9)(batch, rows).token_ids[2])
    assert out_alone == out_crowd and len(set(out_alone)) > 1


def test_repetition_penalty_like_hf():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    r = row(prompt=[0], output=[1], repetition_penalty=2.0)
    out = apply_penalties(logits, [r])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_presence_and_frequency_penalties_over_output_only():
    logits = torch.zeros(1, 4)
    r = row(prompt=[3, 3], output=[0, 0, 1], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [r])
    assert out.tolist() == [[-1.0, -0.75, 0.0, 0.0]]


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[1.0, 0.9] + [0.0] * (V - 2)])
    assert Sampler()(logits, [row(output=[0], temperature=0.0)]).token_ids == [0]
    assert Sampler()(
        logits, [row(output=[0], temperature=0.0, frequency_penalty=0.5)]
    ).token_ids == [1]


def test_logprobs_raw_with_top_alternatives():
    logits = torch.randn(3, V)
    rows = [
        row(temperature=0.0, logprobs=3),
        row(temperature=0.0),
        row(temperature=0.0, logprobs=0),
    ]
    res = Sampler()(logits, rows)
    ref = logits.log_softmax(1)
    assert res.logprobs is not None and res.top_ids is not None and res.top_logprobs is not None
    for i in range(3):
        assert math.isclose(res.logprobs[i], ref[i, res.token_ids[i]].item(), rel_tol=1e-5)
    assert (
        res.top_ids[0] == ref[0].topk(3).indices.tolist()
        and res.top_ids[1] == []
        and res.top_ids[2] == []
    )
    assert res.top_logprobs[0] == pytest.approx(ref[0].topk(3).values.tolist())


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = torch.randn(6, V)
    rows = [row(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    res = Sampler()(logits, rows)
    for i in range(1, 6, 2):
        assert res.token_ids[i] == logits[i].argmax().item()


def test_logit_bias_per_row_in_one_batch():
    logits = torch.randn(4, V)
    top = logits.argmax(1).tolist()
    rows = [
        row(temperature=0.0, logit_bias=((7, 100.0),)),  # forces 7
        row(temperature=0.0, logit_bias=((top[1], -100.0),)),  # bans its argmax
        row(temperature=0.0),  # untouched
        row(temperature=0.8, seed=3, logit_bias=((11, 100.0), (12, -5.0))),  # sampled: 11
    ]
    biased = apply_logit_bias(logits, rows)
    expected = logits.clone()
    expected[0, 7] += 100.0
    expected[1, top[1]] -= 100.0
    expected[3, 11] += 100.0
    expected[3, 12] -= 5.0
    assert torch.equal(biased, expected)
    out = Sampler()(logits, rows).token_ids
    assert out == [7, expected[1].argmax().item(), top[2], 11]
    assert out[1] != top[1]

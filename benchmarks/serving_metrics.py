"""What one run of the online serving benchmark measured: per-request records in, a summary
out (throughput, TTFT, TPOT, inter-token latency, end-to-end latency, errors, goodput).

Pure Python over plain values (no HTTP, no torch), so the checks are testable from numbers.
Definitions (times in seconds on the client's monotonic clock):

- TTFT: request sent -> first streamed chunk that carries output text (or the finish
  reason; chat's opening role chunk does not count).
- TPOT, per request: (e2e - TTFT) / (output tokens - 1), output tokens from the final usage.
- ITL: every gap between two consecutive such chunks of one request (a chunk can hold more
  than one token when the server holds text back, e.g. an incomplete UTF-8 character; a
  token without text sends no chunk of its own).
- goodput: successful requests with TTFT <= the TTFT SLO and TPOT <= the TPOT SLO, per
  second of the run.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    tenant: int
    adapter: int | None  # None: the base model
    start: float = 0.0  # sent, seconds after the run's start
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # after ``start``
    output_tokens: int = 0  # usage.completion_tokens of the final chunk
    prompt_tokens: int = 0
    finish_reason: str | None = None
    status: int = 0  # HTTP status; 0: no response
    error: str | None = None  # None: success
    detail: str = ""  # the error's message (its body, cut short)
    response_id: str | None = None  # the response's id: the ledger's request id

    def compact(self) -> dict:
        """The record for the JSON file (chunk times left out: they are in the ITL stats)."""
        return {
            "i": self.index,
            "tenant": self.tenant,
            "adapter": self.adapter,
            "start": round(self.start, 6),
            "ttft": _round(self.ttft),
            "e2e": _round(self.e2e),
            "chunks": len(self.chunk_times),
            "out": self.output_tokens,
            "prompt": self.prompt_tokens,
            "status": self.status,
            "error": self.error,
            "id": self.response_id,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def check_output(rec: RequestRecord, expected_tokens: int) -> None:
    """A streamed answer that ended well but not with exactly ``expected_tokens`` tokens
    (and finish reason "length") is an error: the workload asked for exact lengths."""
    if rec.error is not None:
        return
    if rec.output_tokens == 0 and rec.finish_reason is None:
        rec.error = "no_usage"
    elif rec.output_tokens != expected_tokens or rec.finish_reason != "length":
        rec.error = "wrong_length"


def dist(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """mean and p50/p90/p99 (linear interpolation between closest ranks) of ``values`` x
    ``scale``; NaN when empty."""
    if not values:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    xs = sorted(v * scale for v in values)
    out = {"mean": sum(xs) / len(xs)}
    for p in PERCENTILES:
        pos = (len(xs) - 1) * p / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{p}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def tpot(rec: RequestRecord) -> float | None:
    if rec.ttft is None or rec.e2e is None or rec.output_tokens < 2:
        return None
    return (rec.e2e - rec.ttft) / (rec.output_tokens - 1)


def summarize(
    records: list[RequestRecord], duration: float, slo_ttft_s: float, slo_tpot_s: float
) -> dict:
    """The run's numbers. Token counts and latencies come from successful requests only;
    ``errors`` counts the others by kind (``http_<status>``, ``wrong_length``, ...)."""
    ok = [r for r in records if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    itls = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    good = [
        r
        for r in ok
        if r.ttft is not None
        and r.ttft <= slo_ttft_s
        and (t := tpot(r)) is not None
        and t <= slo_tpot_s
    ]
    out_tokens = sum(r.output_tokens for r in ok)
    chunks = sum(len(r.chunk_times) for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": dict(sorted(Counter(r.error for r in records if r.error).items())),
        "error_samples": {r.error: r.detail for r in reversed(records) if r.error},
        "duration_s": duration,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "chunks_per_token": chunks / out_tokens if out_tokens else math.nan,
        "req_s": per_s(len(ok)),
        "out_tok_s": per_s(out_tokens),
        "goodput_req_s": per_s(len(good)),
        "goodput_share": len(good) / len(records) if records else math.nan,
        "slo_ttft_ms": slo_ttft_s * 1e3,
        "slo_tpot_ms": slo_tpot_s * 1e3,
        "ttft_ms": dist(ttfts, 1e3),
        "tpot_ms": dist(tpots, 1e3),
        "itl_ms": dist(itls, 1e3),
        "e2e_s": dist([r.e2e for r in ok if r.e2e is not None]),
    }

"""``/v1/embeddings`` through the official ``openai`` SDK against a real server (in-process
and remote engine): every input form, both encodings, adapters, limits, metering; and the
vectors against transformers' hidden states (last token, L2-normalized) for the base model
and for an adapter (PEFT, not merged)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from tests.gateway.envelope import error
from tests.gateway.live import BASE, Gateway, wait_until

HIDDEN = 64  # the tiny Llama's hidden size
TEXTS = ["The quick brown fox", "jumps over the lazy dog.", "Hello!"]


@pytest.fixture(scope="module")
def max_body_bytes() -> int:
    return 4 * 1024 * 1024  # room for a request over the total-token bound


def _vec(e: Any) -> torch.Tensor:
    return torch.tensor(e.embedding, dtype=torch.float32)


def _ids(gateway: Gateway, text: str) -> list[int]:
    return list(gateway.engine.tokenizer().encode(text))


def _hf_vectors(model_dir: Path, adapter_dir: Path | None, inputs: list[list[int]]):
    """transformers' final hidden state (after the final norm) of each input's last token,
    L2-normalized: the documented pooling."""
    from transformers import LlamaForCausalLM

    model: Any = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    out = []
    with torch.no_grad():
        for ids in inputs:
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            out.append(torch.nn.functional.normalize(hs[-1][0, -1], dim=0))
    return torch.stack(out)


def test_sdk_inputs_and_encodings(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    one = client.embeddings.create(model=BASE, input=TEXTS[0])  # the SDK asks for base64
    assert one.object == "list" and one.model == BASE
    (e,) = one.data
    assert e.object == "embedding" and e.index == 0 and len(e.embedding) == HIDDEN
    assert abs(float(_vec(e).norm()) - 1.0) < 1e-5
    ids = [_ids(gateway, t) for t in TEXTS]
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids[0])

    floats = client.embeddings.create(model=BASE, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.usage.prompt_tokens == sum(map(len, ids))
    # batched or alone, text or its token ids: the same vector
    assert torch.allclose(_vec(floats.data[0]), _vec(e), atol=1e-5)
    by_ids = client.embeddings.create(model=BASE, input=ids, encoding_format="float")
    single_ids = client.embeddings.create(model=BASE, input=ids[1], encoding_format="float")
    for a, b in zip(floats.data, by_ids.data, strict=True):
        assert torch.allclose(_vec(a), _vec(b), atol=1e-5)
    assert torch.allclose(_vec(single_ids.data[0]), _vec(floats.data[1]), atol=1e-5)
    assert not torch.allclose(_vec(floats.data[0]), _vec(floats.data[1]), atol=1e-2)

    # base64 on the wire: little-endian float32, equal to the floats
    raw = gateway.http("a").post(
        "/v1/embeddings",
        json={"model": BASE, "input": TEXTS[:2], "encoding_format": "base64"},
    )
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["id"].startswith("embd-") and body["object"] == "list"
    for d, f in zip(body["data"], floats.data[:2], strict=True):
        assert isinstance(d["embedding"], str)
        values = struct.unpack(f"<{HIDDEN}f", base64.b64decode(d["embedding"]))
        assert torch.allclose(torch.tensor(values), _vec(f), atol=1e-5)
    # the model's own size is accepted as `dimensions`
    same = client.embeddings.create(model=BASE, input=TEXTS[0], dimensions=HIDDEN)
    assert len(same.data[0].embedding) == HIDDEN


async def test_async_sdk_concurrent_requests(gateway: Gateway) -> None:
    """Several API requests at once (their inputs batch together in the engine) each get
    the vectors they get alone."""
    import asyncio

    client = gateway.async_sdk("a")
    alone = [
        (await client.embeddings.create(model=m, input=TEXTS, encoding_format="float")).data
        for m in (BASE, "support")
    ]
    together = await asyncio.gather(
        *(
            client.embeddings.create(model=m, input=TEXTS, encoding_format="float")
            for m in (BASE, "support", BASE, "support")
        )
    )
    for i, r in enumerate(together):
        for a, b in zip(r.data, alone[i % 2], strict=True):
            assert torch.allclose(_vec(a), _vec(b), atol=1e-5)
    await client.close()


def test_base_and_adapter_match_transformers(
    gateway: Gateway, tiny_llama_dir: Path, make_peft_adapter: Callable[..., Path]
) -> None:
    client = gateway.sdk("a")
    ids = [_ids(gateway, t) for t in TEXTS] + [list(range(5, 300))]  # one long input
    lora_b = make_peft_adapter(tiny_llama_dir, rank=4, seed=2)  # support@2 (the gateway's)
    for model, adapter in ((BASE, None), ("support", lora_b)):
        got = client.embeddings.create(model=model, input=ids, encoding_format="float")
        vecs = torch.stack([_vec(d) for d in got.data])
        want = _hf_vectors(tiny_llama_dir, adapter, ids)
        err = float((vecs - want).abs().max())
        assert err < 1e-4, f"{model}: max abs error {err:.2e}"
    # the adapter changes the vectors, and each version has its own
    base = client.embeddings.create(model=BASE, input=TEXTS[0], encoding_format="float")
    v1 = client.embeddings.create(model="prod", input=TEXTS[0], encoding_format="float")
    v2 = client.embeddings.create(model="support", input=TEXTS[0], encoding_format="float")
    assert float((_vec(base.data[0]) - _vec(v2.data[0])).abs().max()) > 1e-2
    assert float((_vec(v1.data[0]) - _vec(v2.data[0])).abs().max()) > 1e-2


def _usage(gateway: Gateway, request_id: str) -> tuple[Any, ...]:
    cols = "status, prompt_tokens, completion_tokens, model, adapter_version_id"
    rows: list[tuple[Any, ...]] = []

    def landed() -> bool:
        rows[:] = gateway.sql(f"SELECT {cols} FROM usage_records WHERE request_id = %s", request_id)
        return bool(rows)

    wait_until(landed, 20)
    (row,) = rows
    return row


def test_one_usage_record_per_request(gateway: Gateway) -> None:
    with gateway.http("a") as http:
        r = http.post("/v1/embeddings", json={"model": "support", "input": TEXTS})
        assert r.status_code == 200, r.text
        body = r.json()
    status, prompt, completion, model, adapter_version = _usage(gateway, body["id"])
    assert (status, completion, model) == ("ok", 0, "support")
    assert prompt == body["usage"]["prompt_tokens"] == sum(len(_ids(gateway, t)) for t in TEXTS)
    assert adapter_version is not None
    # a refused request records nothing and the next one is metered on its own
    with gateway.http("a") as http:
        bad = http.post("/v1/embeddings", json={"model": BASE, "input": [[10**9]]})
        error(bad, 400, param="input")
        r = http.post("/v1/embeddings", json={"model": BASE, "input": [1, 2, 3]})
    assert _usage(gateway, r.json()["id"])[:3] == ("ok", 3, 0)


def test_bad_inputs_are_clear_400s(gateway: Gateway) -> None:
    max_len = gateway.engine.model_info().max_model_len  # type: ignore[union-attr]
    cases: list[tuple[dict[str, Any], str | None, str | None]] = [
        ({"input": ""}, "input", None),
        ({"input": []}, "input", None),
        ({"input": [[]]}, "input", None),
        ({"input": ["a", 3]}, "input", None),
        ({"input": ["x"] * 2049}, "input", None),
        ({"input": [512]}, "input", None),  # over the vocabulary
        ({"input": [-1]}, "input", None),
        ({"input": [5] * (max_len + 1)}, "input", "context_length_exceeded"),
        ({"input": ["ok", "a" * 40 * max_len]}, "input", "context_length_exceeded"),
        ({"input": [[5] * 200] * 1600}, "input", "too_many_tokens"),  # 320k > 300k
        ({"input": "hi", "dimensions": 32}, "dimensions", "unsupported_value"),
        ({"input": "hi", "dimensions": 0}, "dimensions", None),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", None),
        ({"input": "hi", "truncate": 10}, "truncate", None),
    ]
    with gateway.http("a") as http:
        for extra, param, code in cases:
            r = http.post("/v1/embeddings", json={"model": BASE, **extra})
            err = error(r, 400)
            assert (err["param"] or "").split(".")[0] == param, err  # input.1: the item
            if code is not None:
                assert err["code"] == code, (extra if len(str(extra)) < 200 else param, err)
        # a whole context's worth of tokens is fine: nothing is generated after it
        r = http.post("/v1/embeddings", json={"model": BASE, "input": [5] * max_len})
        assert r.status_code == 200, r.text
        # models resolve per tenant, and need the inference scope
        r = http.post("/v1/embeddings", json={"model": "globex-secret", "input": "hi"})
        error(r, 404, param="model")
    with gateway.http("a_read_only") as http:
        error(http.post("/v1/embeddings", json={"model": BASE, "input": "hi"}), 403)
    with pytest.raises(openai.BadRequestError) as bad:
        gateway.sdk("a").embeddings.create(model=BASE, input="hi", dimensions=HIDDEN + 1)
    assert bad.value.code == "unsupported_value"

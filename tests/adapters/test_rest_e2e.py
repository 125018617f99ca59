"""End to end through HTTP: upload a PEFT adapter through the admin API, then greedy chat
completions naming it answer what Hugging Face + PEFT answer with that adapter; versions,
``name@version``, aliases and delete; 200 adapters through 8 GPU slots; store down and up."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from adapter_files import TINY, write_lora
from hf_reference import HfReference
from moto_proc import MotoServer
from rest import AdapterServer, adapter_server, make_tenant, peft_files, upload

from loraplex.engine.config import EngineConfig
from loraplex.engine_wiring import inproc_engine

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story about a robot."}]
MAX_TOKENS = 5
TARGETS = [("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "down_proj"), ("k_proj", "up_proj")]


def serve(moto: MotoServer, model: Path, cache: Path):  # type: ignore[no-untyped-def]
    config = EngineConfig(
        device="cpu", dtype="float32", max_num_seqs=16, num_gpu_blocks=512, max_loras=8,
        max_cpu_loras=32, max_lora_rank=8,
    )  # fmt: skip
    return adapter_server(
        moto, model, cache,
        engine_factory=lambda settings: inproc_engine(settings, str(model), config),
        served_model_name=BASE, max_lora_rank=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(
    moto: MotoServer, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdapterServer]:
    with serve(moto, tiny_llama_dir, tmp_path_factory.mktemp("cache")) as srv:
        yield srv


class Reference:
    """HF + PEFT greedy text for the chat prompt as the gateway renders it."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.hf = HfReference(model_dir)
        text = self.tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        self.prompt = list(self.tok.encode(text, add_special_tokens=False))

    def text(self, adapter: Path | None, max_tokens: int = MAX_TOKENS) -> str:
        tokens = self.hf.greedy(adapter, self.prompt, max_tokens)
        if self.tok.eos_token_id in tokens:
            tokens = tokens[: tokens.index(self.tok.eos_token_id)]
        return str(self.tok.decode(tokens, skip_special_tokens=True))


@pytest.fixture(scope="module")
def ref(tiny_llama_dir: Path) -> Reference:
    return Reference(tiny_llama_dir)


def chat(client: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
    return client.post("/v1/chat/completions", json=body)


def answer(client: httpx.Client, model: str) -> str:
    r = chat(client, model)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_upload_then_chat_matches_hf_peft_versions_aliases(
    server: AdapterServer,
    ref: Reference,
    tiny_llama_dir: Path,
    make_peft_adapter: Callable[..., Path],
) -> None:
    lora1 = make_peft_adapter(tiny_llama_dir, rank=8, targets=["q_proj", "v_proj"], seed=11)
    lora2 = make_peft_adapter(tiny_llama_dir, rank=4, targets=["o_proj", "down_proj"], seed=12)
    with server.client() as admin:
        tenant, key = make_tenant(admin, "inference", "adapters:write")
    with server.client(key) as c:  # the tenant's own key uploads and calls
        assert upload(c, tenant, "support", peft_files(lora1)).status_code == 201
        v1_text = answer(c, "support")
        assert v1_text == ref.text(lora1)
        assert v1_text != answer(c, BASE) == ref.text(None)

        assert upload(c, tenant, "support", peft_files(lora2)).json()["version"] == 2
        v2_text = answer(c, "support")  # new requests get the new version
        assert v2_text == ref.text(lora2) and v2_text != v1_text
        assert answer(c, "support@1") == v1_text and answer(c, "support@2") == v2_text

        path = f"/admin/v1/tenants/{tenant}/adapters/support/aliases/prod"
        assert c.put(path, json={"version": 1}).status_code == 200
        assert answer(c, "prod") == v1_text
        assert c.put(path, json={"version": 2}).status_code == 200
        assert answer(c, "prod") == v2_text

        assert c.delete(f"/admin/v1/tenants/{tenant}/adapters/support").status_code == 200
        for model in ("support", "support@1", "prod"):
            r = chat(c, model)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_alias_moved_mid_stream_in_flight_finishes_on_its_version(
    server: AdapterServer, ref: Reference, tmp_path: Path
) -> None:
    n = 48
    v1 = write_lora(tmp_path / "v1", TINY, rank=2, seed=21, scale=0.4)
    v2 = write_lora(tmp_path / "v2", TINY, rank=2, seed=22, scale=0.4)
    with server.client() as admin:
        tenant, key = make_tenant(admin, "inference", "adapters:write")
    with server.client(key) as c:
        upload(c, tenant, "bot", peft_files(v1))
        upload(c, tenant, "bot", peft_files(v2))
        alias = f"/admin/v1/tenants/{tenant}/adapters/bot/aliases/live"
        assert c.put(alias, json={"version": 1}).status_code == 200
        body = {"model": "live", "messages": MESSAGES, "max_tokens": n, "temperature": 0,
                "stream": True}  # fmt: skip
        pieces: list[str] = []
        moved = False
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice["delta"].get("content") or "")
                if not moved:  # after the first chunk: new requests go to v2
                    assert c.put(alias, json={"version": 2}).status_code == 200
                    moved = True
                    after = answer(c, "live")
        assert moved
        assert "".join(pieces) == ref.text(v1, n)  # the stream stayed on v1 to its end
        assert after == ref.text(v2) != ref.text(v1)


@pytest.mark.slow
async def test_200_adapters_shuffled_through_8_slots(
    server: AdapterServer, ref: Reference, tmp_path: Path
) -> None:
    n = 200
    with server.client() as admin:
        tenant, key = make_tenant(admin, "inference", "adapters:write")
    sources = [
        write_lora(
            tmp_path / f"a{i}",
            TINY,
            rank=1 + i % 4,
            targets=TARGETS[i % 4],
            seed=1000 + i,
            scale=0.4,
        )
        for i in range(n)
    ]
    with server.client(key) as c:
        for i, src in enumerate(sources):
            r = upload(c, tenant, f"lora-{i}", peft_files(src))
            assert r.status_code == 201, r.text
    order = list(range(n)) * 2  # each adapter twice: cold, then after eviction
    random.Random(7).shuffle(order)
    gate = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:

        async def call(i: int) -> tuple[int, str]:
            async with gate:
                body = {"model": f"lora-{i}", "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                        "temperature": 0}  # fmt: skip
                r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return i, str(r.json()["choices"][0]["message"]["content"])

        results = await asyncio.gather(*(call(i) for i in order))
        metrics = (await c.get("/metrics")).text
    elapsed = time.monotonic() - started
    answers: dict[int, str] = {}
    for i, text in results:
        assert answers.setdefault(i, text) == text, f"lora-{i} answered differently twice"
    expected = {i: await asyncio.to_thread(ref.text, sources[i]) for i in range(n)}
    wrong = [i for i in range(n) if answers[i] != expected[i]]
    assert not wrong, f"{len(wrong)} of {n} differ from HF+PEFT, e.g. lora-{wrong[0]}"
    distinct = len(set(answers.values()))
    assert distinct > n // 4, f"only {distinct} distinct answers"
    loads = re.search(r'loraplex_adapter_loads_total\{outcome="ok",tier="object_store"\} (\S+)',
                      metrics)  # fmt: skip
    assert loads is not None and float(loads[1]) >= n  # one download per adapter, then disk
    print(f"\n200 adapters x2 via REST: {elapsed:.1f}s, {distinct} distinct answers")


def test_store_down_cached_serve_cold_503_then_recover(
    tiny_llama_dir: Path, ref: Reference, tmp_path: Path
) -> None:
    moto = MotoServer()  # its own S3 server, so stopping it disturbs no other test
    moto.start()
    try:
        with serve(moto, tiny_llama_dir, tmp_path / "cache") as srv:
            with srv.client() as admin:
                tenant, key = make_tenant(admin, "inference", "adapters:write")
            warm = write_lora(tmp_path / "warm", TINY, rank=2, seed=1, scale=0.4)
            cold = write_lora(tmp_path / "cold", TINY, rank=3, seed=2, scale=0.4)
            with srv.client(key) as c:
                assert upload(c, tenant, "warm", peft_files(warm)).status_code == 201
                assert upload(c, tenant, "cold", peft_files(cold)).status_code == 201
                warm_text = answer(c, "warm")
                assert warm_text == ref.text(warm)
                snapshot = moto.snapshot(srv.bucket)

                moto.stop()
                for _ in range(3):
                    assert answer(c, "warm") == warm_text  # cached adapters keep serving
                for _ in range(3):
                    r = chat(c, "cold")
                    assert r.status_code == 503, r.text
                    assert "object store unavailable" in r.json()["error"]["message"]
                r = upload(c, tenant, "new", peft_files(cold))
                assert r.status_code == 503, r.text  # nothing registered without the bytes

                moto.start()  # back (in-memory moto: put back what a durable store holds)
                moto.restore(srv.bucket, snapshot)
                deadline = time.monotonic() + 15
                while (r := chat(c, "cold")).status_code == 503 and time.monotonic() < deadline:
                    time.sleep(0.25)  # the fetcher's backoff expires, then it retries
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == ref.text(cold)
                listed = c.get(f"/admin/v1/tenants/{tenant}/adapters").json()["data"]
                assert [a["name"] for a in listed] == ["cold", "warm"]
    finally:
        moto.stop()

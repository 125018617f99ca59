"""The official ``openai`` SDK, sync and async, streaming and not, against a real server."""

from __future__ import annotations

import openai
import pytest

from tests.gateway.live import BASE, Gateway

HELLO = [{"role": "user", "content": "Hello! Tell me a story about a robot."}]


def test_models_list_and_retrieve(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "support", "prod"}
    support = models["support"].model_dump()
    assert support["object"] == "model"
    assert support["owned_by"] == gateway.tenants["a"]
    assert support["parent"] == BASE and support["root"] == "support@2"
    assert models["prod"].model_dump()["root"] == "support@1"
    assert models[BASE].model_dump().get("parent") is None
    assert client.models.retrieve("support@1").model_dump()["root"] == "support@1"
    assert client.models.retrieve(BASE).id == BASE


def test_chat_completion_with_usage(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    raw = client.chat.completions.with_raw_response.create(
        model=BASE, messages=HELLO, max_tokens=4, temperature=0
    )
    assert raw.headers["x-request-id"]
    r = raw.parse()
    assert r.object == "chat.completion" and r.model == BASE and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    u = r.usage
    assert u is not None and u.completion_tokens == 4 and u.prompt_tokens > 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens >= 0
    # Greedy decoding is deterministic; the adapter and its aliases resolve per tenant.
    again = client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=4, temperature=0)
    assert again.choices[0].message.content == choice.message.content
    via_alias = client.chat.completions.create(
        model="prod", messages=HELLO, max_tokens=4, temperature=0
    )
    assert via_alias.model == "prod" and via_alias.usage.completion_tokens == 4


def test_chat_parameters(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    r = client.chat.completions.create(
        model="support@1",
        messages=[{"role": "system", "content": "Be brief."}, *HELLO],
        max_completion_tokens=3,
        n=2,
        seed=7,
        temperature=0.9,
        top_p=0.95,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logprobs=True,
        top_logprobs=2,
        stop=["\n\n"],
        user="end-user-1",
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens <= 6
    for c in r.choices:
        assert c.logprobs is not None and c.logprobs.content
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    one = client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=5, seed=3)
    two = client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=5, seed=3)
    assert one.choices[0].message.content == two.choices[0].message.content


def test_chat_stream_sync(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    stream = client.chat.completions.create(
        model="support",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.model == "support" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert isinstance(text, str)
    # Without include_usage no usage chunk is sent.
    plain = list(
        client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=2, stream=True)
    )
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason


async def test_chat_and_completions_async(gateway: Gateway) -> None:
    client = gateway.async_sdk("a")
    r = await client.chat.completions.create(
        model="prod", messages=HELLO, max_tokens=3, temperature=0
    )
    assert r.usage.completion_tokens == 3
    stream = await client.completions.create(
        model=BASE,
        prompt="The quick brown fox",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=1,
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert all(c.object == "text_completion" for c in chunks)
    text_chunks = [c for c in chunks if c.choices]
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].logprobs.tokens) for c in text_chunks) == 5
    await client.close()


def test_completions_sync(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    r = client.completions.create(
        model="support", prompt="The quick brown fox", max_tokens=4, temperature=0, logprobs=2
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 4 and len(choice.logprobs.top_logprobs) == 4
    assert r.usage.completion_tokens == 4 and r.usage.total_tokens == r.usage.prompt_tokens + 4
    ids = client.completions.create(model=BASE, prompt=[1, 2, 3], max_tokens=2)
    assert ids.usage.prompt_tokens == 3


def test_sdk_error_types(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=BASE, messages=HELLO, extra_body={"guided_json": {}})
    assert "guided_json" in bad.value.message and bad.value.param == "guided_json"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=HELLO, temperature=5)
    with pytest.raises(openai.AuthenticationError) as auth:
        openai.OpenAI(api_key="lpx_000000000000_nope", base_url=f"{gateway.url}/v1").models.list()
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError):
        gateway.sdk("a_read_only").chat.completions.create(model=BASE, messages=HELLO)


async def test_concurrent_requests_over_many_adapters(gateway: Gateway) -> None:
    """Mixed tenants, adapters, streaming and not, in flight together (one batch)."""
    import asyncio

    a, b = gateway.async_sdk("a"), gateway.async_sdk("b")

    async def plain(client: openai.AsyncOpenAI, model: str) -> int:
        r = await client.chat.completions.create(
            model=model, messages=HELLO, max_tokens=4, temperature=0
        )  # greedy: a sampled early EOS from the random model made this flaky
        return r.usage.completion_tokens

    async def streamed(client: openai.AsyncOpenAI, model: str) -> int:
        stream = await client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=4, stream=True,
            stream_options={"include_usage": True}, temperature=0,
        )  # fmt: skip
        chunks = [c async for c in stream]
        return chunks[-1].usage.completion_tokens

    jobs = []
    for model in (BASE, "support", "prod", "support@1"):
        jobs += [plain(a, model), streamed(a, model)]
    jobs += [plain(b, "globex-secret"), streamed(b, "globex-secret"), plain(b, BASE)]
    assert await asyncio.gather(*jobs) == [4] * len(jobs)
    await a.close()
    await b.close()

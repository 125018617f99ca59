"""/v1/completions as OpenAI's: max_tokens 16 by default, echo, several prompts in one
request (choices indexed, usage summed and metered), logit_bias, vLLM's extra sampling
parameters, and clear 400s for what is not done here (suffix, best_of > n)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.gateway.live import BASE, Gateway, wait_until

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Any:
    with gateway.http("a") as client:
        yield client


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_max_tokens_defaults_to_16(gateway: Gateway) -> None:
    r = gateway.sdk("a").completions.create(
        model=BASE, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage is not None and r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length" and r.system_fingerprint


def test_echo(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    plain = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = "".join(
        c.text
        for chunk in client.completions.create(
            model=BASE, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True
        )
        for c in chunk.choices
    )
    assert streamed == echoed.choices[0].text
    ids = [5, 6, 7]
    decoded = client.completions.create(model=BASE, prompt=ids, max_tokens=1, echo=True)
    assert decoded.choices[0].text.startswith(gateway.engine.tokenizer().decode(ids))


def test_several_prompts(gateway: Gateway, http: httpx.Client) -> None:
    prompts = [PROMPT, "Hello! How can I help", "Tell me a story"]
    singles = [
        _ok(
            http.post(
                "/v1/completions",
                json={"model": BASE, "prompt": p, "max_tokens": 3, "temperature": 0},
            )
        )
        for p in prompts
    ]
    body = {"model": BASE, "prompt": prompts, "max_tokens": 3, "temperature": 0, "n": 2}
    both = _ok(http.post("/v1/completions", json=body))
    assert [c["index"] for c in both["choices"]] == list(range(6))
    for i, single in enumerate(singles):
        for j in range(2):  # greedy: both choices of a prompt are its single answer
            assert both["choices"][2 * i + j]["text"] == single["choices"][0]["text"]
    usage = both["usage"]
    assert usage["prompt_tokens"] == 2 * sum(s["usage"]["prompt_tokens"] for s in singles) // 2
    assert usage["completion_tokens"] == 6 * 3
    # metered: one usage record per prompt, the id's first and "-1", "-2" after it
    ids = [both["id"], f"{both['id']}-1", f"{both['id']}-2"]
    rows: list[Any] = []

    def landed() -> bool:
        rows[:] = gateway.sql(
            "SELECT prompt_tokens, completion_tokens FROM usage_records WHERE request_id = ANY(%s)",
            ids,
        )
        return len(rows) == 3

    wait_until(landed, 20)
    assert sum(r[0] for r in rows) == usage["prompt_tokens"]
    assert sum(r[1] for r in rows) == usage["completion_tokens"]
    # streamed, with usage at the end
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    texts: dict[int, str] = {}
    last: dict[str, Any] = {}
    with http.stream("POST", "/v1/completions", json=body) as r:
        import json

        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                if chunk.get("usage"):
                    last = chunk["usage"]
    assert texts == {c["index"]: c["text"] for c in both["choices"]}
    assert last["completion_tokens"] == usage["completion_tokens"]
    # token id lists, one per prompt
    lists = _ok(http.post("/v1/completions", json={"model": BASE, "prompt": [[5, 6, 7], [8, 9]],
                                                   "max_tokens": 2}))  # fmt: skip
    assert [c["index"] for c in lists["choices"]] == [0, 1]
    assert lists["usage"]["prompt_tokens"] == 5


def test_logit_bias(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    greedy = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=3, temperature=0,
                                       logprobs=0)  # fmt: skip
    lp = greedy.choices[0].logprobs
    assert lp is not None and lp.tokens
    tok = gateway.engine.tokenizer()
    forced_id = tok.encode(" fox")[-1]
    forced = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=3, temperature=0,
        logit_bias={str(forced_id): 100}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert forced.choices[0].text == tok.decode([forced_id] * 3)
    first_id = tok.encode(greedy.choices[0].text)[0]
    banned = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(first_id): -100}
    )
    assert banned.choices[0].text != tok.decode([first_id])


def test_vllm_sampling_extras(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    greedy = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=5, temperature=0)
    top1 = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=1, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy
    floor = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=1, extra_body={"min_p": 1.0}
    )
    assert floor.choices[0].text == greedy.choices[0].text  # min_p=1 keeps the top token only
    tok = gateway.engine.tokenizer()
    first = tok.encode(greedy.choices[0].text)[0]
    stopped = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=5, temperature=0,
        extra_body={"stop_token_ids": [first]},
    )  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens == 1
    client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=3,
        extra_body={"repetition_penalty": 1.3, "min_tokens": 2, "skip_special_tokens": False},
    )  # fmt: skip
    eos = tok.eos_token_id
    shown = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=2, temperature=0,
        logit_bias={str(eos): 100}, extra_body={"skip_special_tokens": False, "ignore_eos": True},
    )  # fmt: skip
    assert tok.eos_token in shown.choices[0].text
    hidden = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=2, temperature=0,
        logit_bias={str(eos): 100}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert tok.eos_token not in hidden.choices[0].text


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"suffix": "end"}, "suffix", "suffix is not supported"),
        ({"best_of": 2}, "best_of", "best_of must equal n"),
        ({"echo": True, "logprobs": 1}, "echo", "echo with logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"prompt": 5}, "prompt", "expected a string, a list of token ids"),
        ({"logit_bias": {"100000": 5}}, "logit_bias", "logit_bias"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids", "stop_token_ids"),
        ({"top_k": -2}, "top_k", ""),
        ({"min_p": 1.5}, "min_p", ""),
        ({"repetition_penalty": 0}, "repetition_penalty", ""),
    ],
)
def test_refused(http: httpx.Client, fields: dict[str, Any], param: str, words: str) -> None:
    r = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert _ok(
        http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 1})
    )

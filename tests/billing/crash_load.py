"""The client side of the crash-consistency test: a seeded mix of OpenAI requests (streamed
and not, text and chat completions, varied prompts and lengths) sent all at once, and what
the client got back from each.

A response is *complete* when the client holds all of it: a 200 whose JSON body arrived
whole, or a stream that reached ``data: [DONE]``. Its id (the ledger's request id) and its
usage come from the response itself (a stream's usage from its ``include_usage`` chunk).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

MODEL = "dummy:tiny"
TEXTS = [
    "Once upon a time",
    "The quick brown fox",
    "Write a haiku about GPUs.",
    "Unicode: héllo wörld, 日本語 🙂",
    "Tell me a story about a robot who learns to paint, in three sentences.",
]


@dataclass(frozen=True)
class Spec:
    path: str
    body: dict[str, Any]

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass
class Outcome:
    spec: Spec
    status: int | None = None  # the HTTP status, None if the connection failed first
    complete: bool = False
    request_id: str | None = None  # a stream cut off after its first chunk has one too
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens, as the client saw
    error: str | None = None  # a transport error's name, "timeout", or the error's code
    retry_after: str | None = None  # on an error status

    def kind(self) -> str:
        return ("stream " if self.spec.streamed else "") + self.spec.path


def random_spec(rng: random.Random) -> Spec:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(1, 12)}
    if rng.random() < 0.5:
        path = "/v1/completions"
        if rng.random() < 0.3:  # token ids
            body["prompt"] = [rng.randint(5, 250) for _ in range(rng.randint(1, 16))]
        else:
            body["prompt"] = rng.choice(TEXTS)
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": rng.choice(TEXTS)}]
    if rng.random() < 0.5:
        body["temperature"] = 0.8
        body["seed"] = rng.randint(0, 1000)
    else:
        body["temperature"] = 0
    if rng.random() < 0.5:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return Spec(path, body)


def _error_code(body: bytes) -> str:
    """The OpenAI error envelope's code (the body itself if it is not one)."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]


def _usage(body: dict[str, Any]) -> tuple[int, int]:
    return int(body["usage"]["prompt_tokens"]), int(body["usage"]["completion_tokens"])


async def send(client: httpx.AsyncClient, spec: Spec) -> Outcome:
    out = Outcome(spec)
    try:
        if not spec.streamed:
            r = await client.post(spec.path, json=spec.body)
            out.status = r.status_code
            if r.status_code != 200:
                out.error, out.retry_after = _error_code(r.content), r.headers.get("retry-after")
                return out
            body = r.json()  # the whole body arrived (httpx checks its content-length)
            out.request_id, out.usage, out.complete = body["id"], _usage(body), True
            return out
        async with client.stream("POST", spec.path, json=spec.body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = _error_code(await r.aread())
                out.retry_after = r.headers.get("retry-after")
                return out
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    out.complete = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:  # in-band: answered, and billed as an error
                        out.error = str(event["error"].get("code"))
                        continue
                    out.request_id = out.request_id or event["id"]
                    if event.get("usage"):
                        out.usage = _usage(event)
    except httpx.TimeoutException:
        out.error = "timeout"  # a hang: the test fails on it
    except httpx.TransportError as exc:  # refused, reset, or cut off mid-body
        out.error = type(exc).__name__
    return out


async def fire(
    url: str,
    key: str,
    specs: list[Spec],
    *,
    kill_after: int,
    kill_delay_s: float,
    kill: Callable[[], None],
    timeout_s: float,
) -> list[Outcome]:
    """Send every request at once; once ``kill_after`` of them have ended, wait
    ``kill_delay_s`` and call ``kill`` (the rest are still in flight)."""
    ended = 0
    trigger = asyncio.Event()
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=len(specs), max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=timeout_s, limits=limits
    ) as client:

        async def one(spec: Spec) -> Outcome:
            nonlocal ended
            try:
                return await send(client, spec)
            finally:
                ended += 1
                if ended >= kill_after:
                    trigger.set()

        async def killer() -> None:
            await trigger.wait()
            await asyncio.sleep(kill_delay_s)
            kill()

        killing = asyncio.create_task(killer())
        outcomes = await asyncio.gather(*(one(s) for s in specs))
        await killing
    return list(outcomes)

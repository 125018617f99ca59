"""Both engine clients (in-process and remote, over the toy runner): streaming, text and
stop strings on the client side, aborts, errors, adapter operations, engine death."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
from engine_clients import ToyServer, ipc_address, toy_engine, wait_until
from toy_runner import reference_greedy, write_toy_adapter

from loraplex.engine.api import AdapterRef, Request, RequestOutput, SamplingParams
from loraplex.engine.client import EngineClient
from loraplex.engine.errors import (
    AdapterLoadError,
    EngineDead,
    InvalidRequest,
    PromptTooLong,
    RequestFailed,
)
from loraplex.engine.remote_client import RemoteEngineClient

GREEDY = dict(temperature=0.0, ignore_eos=True)
KINDS = ["inproc", "remote"]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tiny_tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("clienttok")
    build_tokenizer(path)
    return path


async def collect(client: EngineClient, req: Request) -> list[RequestOutput]:
    return [o async for o in client.generate(req)]


def toks(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for d in o.deltas for t in d.token_ids]


def text(outs: list[RequestOutput]) -> str:
    return "".join(d.text for o in outs for d in o.deltas)


def idle(client: EngineClient) -> bool:
    s = client.stats()
    return s is not None and s.steps > 0 and s.num_requests == 0 and s.kv_blocks_used == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_streams_match_reference(kind, tok_dir, tmp_path):
    async with toy_engine(kind, tok_dir) as h:
        refs = [
            AdapterRef(f"k{i}", str(write_toy_adapter(tmp_path / f"a{i}", 20 + i)))
            for i in range(3)
        ]
        reqs = [
            Request(
                f"r{i}",
                [3 + i, 4, 5, 6 + i],
                SamplingParams(max_tokens=6, **GREEDY),
                refs[i % 3] if i % 4 else None,
            )
            for i in range(8)
        ]
        expect = {
            r.request_id: reference_greedy(
                list(r.prompt), 0 if r.adapter is None else 20 + int(r.adapter.key[1:]), 6, 400
            )
            for r in reqs
        }
        results = await asyncio.gather(*(collect(h.client, r) for r in reqs))
        for req, outs in zip(reqs, results, strict=True):
            assert toks(outs) == expect[req.request_id][:6]
            assert outs[-1].finished and [o.finished for o in outs].count(True) == 1
            assert outs[-1].completion_tokens == 6 and outs[-1].prompt_tokens == 4
        await wait_until(lambda: idle(h.client))
        s = h.client.stats()
        assert s is not None and s.adapter_loads == 3 and s.kv_blocks_total == 64


@pytest.mark.parametrize("kind", KINDS)
async def test_request_errors_are_raised_from_generate(kind, tok_dir):
    async with toy_engine(kind, tok_dir) as h:
        with pytest.raises(PromptTooLong):
            await collect(
                h.client, Request("long", list(range(3, 300)), SamplingParams(max_tokens=4))
            )
        with pytest.raises(InvalidRequest):
            await collect(h.client, Request("bad", [3, 4], SamplingParams(top_p=0.0)))
        with pytest.raises(InvalidRequest, match="seed"):
            await collect(h.client, Request("seed", [3, 4], SamplingParams(seed=2**64)))
        with pytest.raises(InvalidRequest, match="stop_token_ids"):
            await collect(h.client, Request("ids", [3], SamplingParams(stop_token_ids=(10**6,))))
        outs = await collect(
            h.client, Request("fine", [3, 4], SamplingParams(max_tokens=2, **GREEDY))
        )
        assert outs[-1].finished


@pytest.mark.parametrize("kind", KINDS)
async def test_seeds_at_the_ends_of_the_64_bit_range_sample(kind, tok_dir):
    """Seeds OpenAI allows at both ends (and a choice index past the end) sample fine and
    repeat themselves; the old engine's step loop died on them."""
    async with toy_engine(kind, tok_dir) as h:
        for seed in (2**63 - 1, -(2**63), 0):
            p = SamplingParams(max_tokens=4, temperature=1.0, seed=seed, n=3, ignore_eos=True)
            a = await collect(h.client, Request(f"s{seed}a", [3, 4], p))
            b = await collect(h.client, Request(f"s{seed}b", [3, 4], p))
            assert toks(a) == toks(b) and len(toks(a)) == 12


@pytest.mark.parametrize("kind", KINDS)
async def test_stop_string_ends_the_stream_and_the_engine_request(kind, tok_dir):
    """The client decodes and applies the stop string; what the engine made past it is
    neither sent nor counted, and the engine request is aborted (its KV freed)."""
    async with toy_engine(kind, tok_dir, step_delay_s=0.002) as h:
        free = await collect(
            h.client, Request("free", [3, 4, 5], SamplingParams(max_tokens=40, **GREEDY))
        )
        full = text(free)
        cut = len(full) // 2
        stop = full[cut : cut + 3]
        assert stop and stop not in full[:cut]
        outs = await collect(
            h.client,
            Request("stop", [3, 4, 5], SamplingParams(max_tokens=200, stop=(stop,), **GREEDY)),
        )
        assert text(outs) == full[:cut]
        assert outs[-1].deltas[-1].finish_reason == "stop"
        assert outs[-1].completion_tokens < 40
        await wait_until(lambda: idle(h.client))


@pytest.mark.parametrize("kind", KINDS)
async def test_abort_and_leaving_end_the_request(kind, tok_dir):
    async with toy_engine(kind, tok_dir, step_delay_s=0.002) as h:
        outs = []
        async for o in h.client.generate(
            Request("long", [3, 4, 5], SamplingParams(max_tokens=200, **GREEDY))
        ):
            outs.append(o)
            if len(outs) == 3:
                await h.client.abort("long")
        assert outs[-1].finished and outs[-1].deltas[-1].finish_reason == "abort"
        assert len(toks(outs)) < 200
        agen = h.client.generate(
            Request("gone", [3, 4, 5], SamplingParams(max_tokens=200, **GREEDY))
        )
        async for _ in agen:
            break
        await agen.aclose()
        await wait_until(lambda: idle(h.client))


@pytest.mark.parametrize("kind", KINDS)
async def test_adapter_errors_and_operations(kind, tok_dir, tmp_path):
    async with toy_engine(kind, tok_dir) as h:
        bad = AdapterRef("bad", str(tmp_path / "missing"))
        with pytest.raises(AdapterLoadError, match="bad"):
            await collect(h.client, Request("b", [3, 4], SamplingParams(max_tokens=3), bad))
        good = AdapterRef("good", str(write_toy_adapter(tmp_path / "good", 7)))
        assert await h.client.load_adapter(good)
        await wait_until(lambda: True)
        for _ in range(500):
            res = await h.client.adapter_residency()
            if "good" in res.host:
                break
            await asyncio.sleep(0.01)
        assert "good" in res.host and "good" not in res.loading
        outs = await collect(
            h.client, Request("g", [3, 4], SamplingParams(max_tokens=3, **GREEDY), good)
        )
        assert toks(outs) == reference_greedy([3, 4], 7, 3, 400)
        assert "good" in (await h.client.adapter_residency()).gpu
        assert await h.client.unload_adapter("good")
        res = await h.client.adapter_residency()
        assert "good" not in res.gpu and "good" not in res.host
        assert not await h.client.unload_adapter("good")


@pytest.mark.parametrize("kind", KINDS)
async def test_failed_forwards_fail_their_requests_then_the_engine(kind, tok_dir):
    """A forward that raises fails the requests of that batch (500), not the engine; three in
    a row end the step loop: new requests then get EngineDead (503)."""
    async with toy_engine(kind, tok_dir, fail_execute=True) as h:
        for i in range(3):
            with pytest.raises(RequestFailed):
                await collect(h.client, Request(f"x{i}", [3, 4], SamplingParams(max_tokens=2)))
        await wait_until(lambda: not h.client.health().ready, 20)
        with pytest.raises(EngineDead):
            await collect(h.client, Request("y", [3, 4], SamplingParams(max_tokens=2)))
        if h.server is not None:
            assert h.server.wait() == 1  # exits non-zero: its supervisor restarts it
        else:
            assert h.client.health().state == "dead"


@pytest.mark.parametrize("kind", KINDS)
async def test_shutdown_ends_streams_with_abort(kind, tok_dir):
    async with toy_engine(kind, tok_dir, step_delay_s=0.005) as h:
        outs = []
        req = Request("s", [3, 4], SamplingParams(max_tokens=200, **GREEDY))
        async for o in h.client.generate(req):
            outs.append(o)
            if len(outs) == 2:
                if h.server is not None:
                    h.server.signal(signal.SIGTERM)
                else:
                    await h.client.close()
        assert outs[-1].finished and outs[-1].deltas[-1].finish_reason == "abort"
        with pytest.raises(EngineDead):
            await collect(h.client, Request("late", [3], SamplingParams()))
        if h.server is not None:
            assert h.server.wait() == 0


async def test_killed_engine_ends_streams_and_a_restarted_one_serves(tok_dir):
    """SIGKILL mid-stream: the stream ends with EngineDead at once, new requests are refused
    (EngineDead), and an engine started again at the same address serves the same client."""
    async with toy_engine("remote", tok_dir, step_delay_s=0.01) as h:
        assert h.server is not None
        got = []
        with pytest.raises(EngineDead):
            async for o in h.client.generate(
                Request("k", [3, 4], SamplingParams(max_tokens=200, **GREEDY))
            ):
                got.append(o)
                if len(got) == 2:
                    h.server.signal(signal.SIGKILL)
        assert len(got) >= 2
        h.server.wait()
        with pytest.raises(EngineDead):
            await collect(h.client, Request("n", [3], SamplingParams(max_tokens=1)))
        h.server = ToyServer(h.server.address, tok_dir)
        await wait_until(lambda: h.client.health().ready)
        outs = await collect(
            h.client, Request("again", [3, 4], SamplingParams(max_tokens=3, **GREEDY))
        )
        assert toks(outs) == reference_greedy([3, 4], 0, 3, 400)


async def test_engine_token_is_required_when_set(tok_dir):
    server = ToyServer(ipc_address(), tok_dir, token="s3cret-engine-token")
    wrong = RemoteEngineClient(server.address, token="nope")
    right = RemoteEngineClient(server.address, token="s3cret-engine-token")
    try:
        await wrong.start()
        await right.start()
        await wait_until(lambda: right.health().ready)
        await wait_until(lambda: "refused" in wrong.health().detail)  # its answer may lag
        assert not wrong.health().ready
        outs = await collect(right, Request("t", [3], SamplingParams(max_tokens=2, **GREEDY)))
        assert outs[-1].finished
    finally:
        await wrong.close()
        await right.close()
        server.stop()


async def _ghost_running(h: Any) -> asyncio.StreamWriter:
    """A gateway of the test's own on a connection of its own: it says hello and adds a
    long request, which the engine is running when this returns."""
    from loraplex.engine.transport import FrameReader, frame, parse_address
    from loraplex.engine.wire import Add, Hello, Ping, Status, client_decoder, encoder

    _, path = parse_address(h.client.address)
    reader, writer = await asyncio.open_unix_connection(path)
    enc, dec, frames = encoder(), client_decoder(), FrameReader()
    writer.write(frame(enc, Hello()))
    req = Request("ghost", [3, 4], SamplingParams(max_tokens=200, **GREEDY))
    writer.write(frame(enc, Add(req)))
    running, deadline = False, asyncio.get_running_loop().time() + 60
    while not running:  # the engine runs the ghost's request (its own status says so)
        assert asyncio.get_running_loop().time() < deadline, "the ghost's request never ran"
        writer.write(frame(enc, Ping()))
        try:  # (never wait on one receive: the deadline above must be able to end this)
            data = await asyncio.wait_for(reader.read(1 << 20), 2.0)
        except TimeoutError:
            continue
        for payload in frames.feed(data):
            msg = dec.decode(payload)
            running = running or (
                isinstance(msg, Status) and msg.stats is not None and msg.stats.num_requests == 1
            )
    return writer


async def test_silent_gateway_has_its_requests_aborted(tok_dir):
    """A gateway process that stops pinging (it hangs, its connection still open) has its
    requests aborted by the engine, which keeps serving the others."""
    async with toy_engine("remote", tok_dir, step_delay_s=0.01, client_timeout_s=1.0) as h:
        writer = await _ghost_running(h)
        await wait_until(lambda: idle(h.client))  # aborted after ~1 s of silence
        writer.close()
        outs = await collect(
            h.client, Request("alive", [3], SamplingParams(max_tokens=2, **GREEDY))
        )
        assert outs[-1].finished


async def test_disconnected_gateway_has_its_requests_aborted_at_once(tok_dir):
    """A gateway process whose connection closes (it exited) has its requests aborted
    when the engine reads the end of the stream, long before the silence timeout."""
    async with toy_engine("remote", tok_dir, step_delay_s=0.01, client_timeout_s=600.0) as h:
        writer = await _ghost_running(h)
        writer.close()
        await wait_until(lambda: idle(h.client), timeout_s=30)
        outs = await collect(
            h.client, Request("alive", [3], SamplingParams(max_tokens=2, **GREEDY))
        )
        assert outs[-1].finished


async def test_outputs_a_gateway_does_not_read_are_kept_for_it(tok_dir):
    """A gateway process that stops reading (its socket's buffer full) gets every output
    later, whole and in order: what the kernel does not take is kept, never dropped, and
    other gateways are served meanwhile."""
    from loraplex.engine.transport import FrameReader, frame, parse_address
    from loraplex.engine.wire import Add, Hello, Outputs, client_decoder, encoder

    n, tokens = 64, 200  # ~400 KB of outputs: more than a Unix socket's buffer holds
    async with toy_engine("remote", tok_dir, num_blocks=2048) as h:
        before = h.client.stats()
        steps0 = before.steps if before is not None else 0
        _, path = parse_address(h.client.address)  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_unix_connection(path)
        enc, dec, frames = encoder(), client_decoder(), FrameReader()
        writer.write(frame(enc, Hello()))
        for i in range(n):
            sampling = SamplingParams(max_tokens=tokens, **GREEDY)
            writer.write(frame(enc, Add(Request(f"slow-{i}", [3, 4], sampling))))
        await writer.drain()

        def ran() -> bool:  # the engine has run them all (they need >= `tokens` steps)
            s = h.client.stats()
            return s is not None and s.steps >= steps0 + tokens and s.num_requests == 0

        await wait_until(ran)
        outs = await collect(
            h.client, Request("alive", [3], SamplingParams(max_tokens=2, **GREEDY))
        )
        assert outs[-1].finished
        got: dict[str, int] = {}
        finished: set[str] = set()
        while len(finished) < n:
            data = await asyncio.wait_for(reader.read(1 << 20), 30)
            assert data, "the engine closed the connection"
            for payload in frames.feed(data):
                msg = dec.decode(payload)
                if not isinstance(msg, Outputs):
                    continue
                for out in msg.outputs:
                    assert out.request_id not in finished, "an output after the last one"
                    got[out.request_id] = got.get(out.request_id, 0) + sum(
                        len(c.token_ids) for c in out.choices
                    )
                    if out.finished:
                        finished.add(out.request_id)
        assert got == {f"slow-{i}": tokens for i in range(n)}
        writer.close()


async def test_a_gateway_sending_garbage_is_dropped_alone(tok_dir):
    """A peer whose bytes are not frames of the protocol (a length past the limit) is
    disconnected; the engine serves the other gateways on."""
    from loraplex.engine.transport import HEADER, MAX_FRAME, parse_address

    async with toy_engine("remote", tok_dir) as h:
        _, path = parse_address(h.client.address)  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(HEADER.pack(MAX_FRAME + 1) + b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the engine
        outs = await collect(
            h.client, Request("alive", [3], SamplingParams(max_tokens=2, **GREEDY))
        )
        assert outs[-1].finished


def test_a_gateway_saying_hello_is_heard():
    """Until the model is loaded a gateway says hello every heartbeat and nothing else; a load
    longer than the silence timeout must not forget it (its first ping after the load was
    refused with "say hello first", and it logged the engine as unreachable)."""
    import time

    from loraplex.engine.server import EngineServer
    from loraplex.engine.wire import Hello

    server = EngineServer(lambda: None, "ipc:///nonexistent/engine.sock", client_timeout_s=1.0)
    try:
        server._handle(b"gw", Hello(""))
        server._clients[b"gw"].last_seen -= 5.0  # its first hello came 5 s ago
        server._handle(b"gw", Hello(""))  # and another now
        server._check_clients(time.monotonic())
        assert b"gw" in server._clients
        server._clients[b"gw"].last_seen -= 5.0  # then 5 s of silence: forgotten
        server._check_clients(time.monotonic())
        assert b"gw" not in server._clients
    finally:
        server._wake_rx.close()
        server._wake_tx.close()

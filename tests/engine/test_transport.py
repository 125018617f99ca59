"""The engine boundary's framing and addresses (``engine.transport``), and what the engine
server does with a connection that breaks them."""

from __future__ import annotations

import socket

import pytest

from loraplex.engine.api import ChoiceTokens, EngineOutput
from loraplex.engine.transport import (
    HEADER,
    MAX_FRAME,
    FrameError,
    FrameReader,
    frame,
    listen,
    parse_address,
)
from loraplex.engine.wire import Outputs, Ping, client_decoder, encoder


def _outputs(n: int) -> Outputs:
    return Outputs(
        [EngineOutput(f"r{i}", [ChoiceTokens(0, [i, i + 1])], 3, 2, i % 2 == 0) for i in range(n)]
    )


def test_frames_survive_any_cut_of_the_stream():
    """Frames split across reads, several in one read, a header cut in two: each payload
    comes out whole and in order."""
    enc, dec = encoder(), client_decoder()
    msgs = [_outputs(n) for n in (1, 7, 0, 300)]
    stream = b"".join(bytes(frame(enc, m)) for m in msgs)
    for cut in (1, 2, 3, 5, 64, 4096, len(stream)):
        reader, got = FrameReader(), []
        for i in range(0, len(stream), cut):
            got += [dec.decode(p) for p in reader.feed(stream[i : i + cut])]
        assert got == msgs, cut


def test_one_whole_frame_is_read_without_a_copy():
    enc = encoder()
    data = bytes(frame(enc, Ping()))
    (payload,) = FrameReader().feed(data)
    assert isinstance(payload, memoryview) and payload.obj is data


def test_a_length_past_the_limit_is_refused():
    with pytest.raises(FrameError, match="bytes"):
        FrameReader().feed(HEADER.pack(MAX_FRAME + 1) + b"x" * 8)


@pytest.mark.parametrize(
    ("address", "family", "where"),
    [
        ("ipc:///tmp/x/engine.sock", socket.AF_UNIX, "/tmp/x/engine.sock"),
        ("tcp://127.0.0.1:7700", socket.AF_INET, ("127.0.0.1", 7700)),
        ("tcp://*:7700", socket.AF_INET, ("0.0.0.0", 7700)),
        ("tcp://[::1]:7700", socket.AF_INET6, ("::1", 7700)),
        ("tcp://engine.ns.svc:7700", socket.AF_INET, ("engine.ns.svc", 7700)),
    ],
)
def test_addresses(address, family, where):
    assert parse_address(address) == (family, where)


@pytest.mark.parametrize("address", ["ipc://", "tcp://host", "tcp://host:port", "http://x:1"])
def test_bad_addresses(address):
    with pytest.raises(ValueError):
        parse_address(address)


def test_listen_replaces_a_dead_servers_socket_file(tmp_path):
    path = tmp_path / "engine.sock"
    first = listen(f"ipc://{path}")
    first.close()  # a server that died: its socket file is left behind
    second = listen(f"ipc://{path}")
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.close()
    finally:
        second.close()


def test_listen_leaves_other_files_alone(tmp_path):
    path = tmp_path / "engine.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError):
        listen(f"ipc://{path}")
    assert path.read_text() == "not a socket"

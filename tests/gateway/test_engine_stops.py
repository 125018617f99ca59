"""The engine stopping under a live stream (shutdown): the stream still ends properly,
the request is metered as aborted, and later requests get 503 in the envelope."""

from __future__ import annotations

import json
import threading
from typing import Any

from tests.gateway.live import BASE, Gateway, wait_until

MSG = [{"role": "user", "content": "Tell me a story about a robot."}]


def test_engine_shutdown_mid_stream(gateway: Gateway) -> None:
    body = {"model": BASE, "messages": MSG, "max_tokens": 400, "stream": True}
    events: list[dict[str, Any]] = []
    with gateway.http("a") as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            if len(events) >= 3:
                break
        threading.Thread(target=gateway.stop_engine, daemon=True).start()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    rows: list[tuple[Any, ...]] = []

    def landed() -> bool:
        rows[:] = gateway.sql(
            "SELECT status, completion_tokens FROM usage_records WHERE request_id = %s",
            events[0]["id"],
        )
        return bool(rows)

    wait_until(landed, 20)
    status, completion_tokens = rows[0]
    assert status == "aborted" and 2 <= completion_tokens < 400

    with gateway.http("a") as http:
        r = http.post("/v1/chat/completions", json={"model": BASE, "messages": MSG})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable"

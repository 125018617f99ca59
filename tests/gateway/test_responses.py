"""``/v1/responses`` with the official SDK (``client.responses.create``, streamed too) against
real uvicorn, on the tiny model taught to call ``get_weather`` (harness.tool_model): a tool
round trip through ``function_call`` / ``function_call_output`` items, the typed stream
events, ``text.format`` json_schema, ``max_output_tokens``, usage as the ledger records it,
and the refusals (``store``, ``previous_response_id``) in OpenAI's error envelope."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from harness.tool_model import ANSWER, ARGUMENTS, QUESTION, TOOL_RESULT, TOOLS, build_tool_llama
from pydantic import BaseModel, Field

from tests.gateway.live import BASE, Gateway, wait_until

# the Responses API's function tools are flat
FLAT_TOOLS: list[Any] = [{"type": "function", **t["function"]} for t in TOOLS]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tool_llama(tmp_path_factory.mktemp("tool-llama"))


def _ledger(gateway: Gateway, request_id: str) -> tuple[Any, ...]:
    rows: list[tuple[Any, ...]] = []

    def landed() -> bool:
        rows[:] = gateway.sql(
            "SELECT status, prompt_tokens, completion_tokens, model FROM usage_records "
            "WHERE request_id = %s",
            request_id,
        )
        return bool(rows)

    wait_until(landed, 20)
    (row,) = rows
    return row


def test_tool_round_trip(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    r = client.responses.create(model=BASE, input=QUESTION, tools=FLAT_TOOLS, temperature=0)
    assert r.status == "completed" and r.id.startswith("resp-")
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == ARGUMENTS and call.call_id.startswith("call_")
    assert r.output_text == ""
    assert r.usage is not None and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert _ledger(gateway, r.id) == ("ok", r.usage.input_tokens, r.usage.output_tokens, BASE)

    history: list[Any] = [
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in r.output],  # as agent frameworks do
        {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT},
    ]
    final = client.responses.create(model=BASE, input=history, tools=FLAT_TOOLS, temperature=0)
    assert final.output_text == ANSWER and final.status == "completed"
    (message,) = final.output
    assert message.type == "message" and message.role == "assistant"


def test_streamed_events(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    events = list(
        client.responses.create(
            model=BASE, input=QUESTION, tools=FLAT_TOOLS, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response  # type: ignore[union-attr]
    (call,) = done.output
    assert call.name == "get_weather" and json.loads(call.arguments) == ARGUMENTS
    assert done.usage is not None
    assert _ledger(gateway, done.id)[:3] == (
        "ok",
        done.usage.input_tokens,
        done.usage.output_tokens,
    )

    # a text answer streams as output_text deltas that add up to the whole text
    history: list[Any] = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": json.dumps(ARGUMENTS)},
        {"type": "function_call_output", "call_id": "call_1", "output": TOOL_RESULT},
    ]  # fmt: skip
    stream = client.responses.create(
        model=BASE, input=history, tools=FLAT_TOOLS, temperature=0, stream=True
    )
    text, kinds = "", []
    for e in stream:
        kinds.append(e.type)
        if e.type == "response.output_text.delta":
            text += e.delta
        if e.type == "response.output_text.done":
            assert e.text == ANSWER
    assert text == ANSWER and kinds[-1] == "response.completed"
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    # the SDK's stream helper rebuilds the response from the events: they must add up
    with client.responses.stream(
        model=BASE, input=history, tools=FLAT_TOOLS, temperature=0
    ) as helper:
        rebuilt = helper.get_final_response()
    assert rebuilt.output_text == ANSWER and rebuilt.status == "completed"


def test_instructions_limits_and_incomplete(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    r = client.responses.create(
        model="support", input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        instructions="Be brief.", max_output_tokens=3, temperature=0.7, top_p=0.9,
    )  # fmt: skip
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 3
    assert r.instructions == "Be brief." and r.max_output_tokens == 3 and r.model == "support"
    row = _ledger(gateway, r.id)
    assert row == ("ok", r.usage.input_tokens, 3, "support")
    # the instructions are in the prompt: more input tokens than without them
    bare = client.responses.create(model="support", input="Hi", max_output_tokens=1)
    assert bare.usage is not None and bare.usage.input_tokens < r.usage.input_tokens


def test_forced_call_and_json_schema_format(gateway: Gateway) -> None:
    client = gateway.sdk("a")
    r = client.responses.create(
        model=BASE, input="Hello", tools=FLAT_TOOLS, max_output_tokens=80,
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
    )  # fmt: skip
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), TOOLS[0]["function"]["parameters"])

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "s", "schema": schema, "strict": True}}
    for temperature in (0.0, 1.0):
        r = client.responses.create(
            model=BASE, input="Answer.", text=fmt, max_output_tokens=40, temperature=temperature
        )  # type: ignore[arg-type]
        assert r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), schema)
        assert r.text is not None and r.text.format.type == "json_schema"
    parsed = client.responses.parse(
        model="support", input="Answer.", text_format=Verdict, max_output_tokens=60
    )
    assert isinstance(parsed.output_parsed, Verdict)


class Verdict(BaseModel):
    ok: bool
    level: Literal["low", "high"]
    why: str = Field(max_length=8)


def _bad(gateway: Gateway, **fields: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        gateway.sdk("a").responses.create(model=BASE, **fields)
    err = info.value.body
    assert isinstance(err, dict) and err["type"] == "invalid_request_error", err
    return err


def test_refusals_in_the_error_envelope(gateway: Gateway) -> None:
    err = _bad(gateway, input="x", store=True)
    assert err["param"] == "store" and "not stored" in err["message"]
    err = _bad(gateway, input="x", previous_response_id="resp_123")
    assert err["param"] == "previous_response_id"
    err = _bad(gateway, input="x", reasoning={"effort": "low"})
    assert err["param"] == "reasoning" and "unsupported parameter" in err["message"]
    err = _bad(gateway, input=[{"type": "web_search_call", "id": "w"}])
    assert err["param"].startswith("input.0")
    err = _bad(gateway, input="x", tools=[{"type": "web_search"}])
    assert err["param"].startswith("tools.0")
    err = _bad(gateway, input="x", max_output_tokens=100_000)
    assert err["param"] == "max_output_tokens" and "context length" in err["message"]
    with pytest.raises(openai.NotFoundError):
        gateway.sdk("a").responses.create(model="no-such-model", input="x")
    # store false is what the server does anyway
    r = gateway.sdk("a").responses.create(model=BASE, input="x", store=False, max_output_tokens=1)
    assert r.store is False

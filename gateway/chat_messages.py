"""A chat request's messages and tools -> what the model's chat template renders.

A template with a tools section (Qwen, Llama 3.1, SmolLM3...) gets the tools, the assistant
messages' ``tool_calls`` and the ``tool`` messages as transformers passes them to templates.
A template without one (SmolLM2's ChatML) gets the gateway's Hermes tools prompt in the
system message, the calls as ``<tool_call>`` blocks in the assistant's text, and the tool
results as ``<tool_response>`` blocks in a user turn, the way Qwen's template writes them;
the model's output is then read with the Hermes parser (``gateway.tool_parsers``).

Either way every text of the request (contents, arguments, tool schemas) goes through
``apply_chat_template(..., sanitize_control_tokens=True)``: a control token typed anywhere
in it is encoded as plain text, never as the model's control token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loraplex.gateway.schemas import ChatCompletionRequest, ChatMessage
from loraplex.gateway.tool_parsers import ParserName, parser_for_template
from loraplex.gateway.tool_schemas import ToolDefinition
from loraplex.tenancy.errors import InvalidInput

HERMES_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def _bad(index: int, field: str, message: str) -> InvalidInput:
    return InvalidInput(f"messages[{index}].{field}: {message}", param=f"messages.{index}.{field}")


def check_messages(body: ChatCompletionRequest) -> None:
    """What each role needs, named by field (pydantic would name a union's branches)."""
    for i, m in enumerate(body.messages):
        if m.role == "assistant":
            if m.content is None and not m.tool_calls:
                raise _bad(i, "content", "an assistant message needs content or tool_calls")
        elif m.content is None:
            raise _bad(i, "content", f"a {m.role} message needs content")
        if m.tool_calls is not None and m.role != "assistant":
            raise _bad(i, "tool_calls", "only assistant messages carry tool_calls")
        if m.role == "tool" and m.tool_call_id is None:
            raise _bad(i, "tool_call_id", "a tool message needs the tool_call_id it answers")
        if m.tool_call_id is not None and m.role != "tool":
            raise _bad(i, "tool_call_id", "only tool messages carry a tool_call_id")


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools.

    ``forced``: the output must be a call (``tool_choice`` ``required`` or a named
    function): asked for in the prompt and enforced by the grammar engine, as are the
    arguments of ``strict`` tools (``gateway.tool_grammar``).
    """

    tools: list[ToolDefinition]  # offered to the model (one, for a named choice)
    parser: ParserName | None  # None: the output is not parsed for calls
    forced: bool
    parallel: bool


def template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates (e.g. "default" and "tool_use")
        return "\n".join(str(t) for t in template.values())
    return template or ""


def plan_tools(
    body: ChatCompletionRequest, template: str, parser_setting: str | None
) -> ToolPlan | None:
    """None when the request offers no tools or ``tool_choice`` is ``none``."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise InvalidInput("tool_choice needs tools", param="tool_choice")
        return None
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise InvalidInput("tools: function names must be unique", param="tools")
    if choice == "none":
        return None
    tools = list(body.tools)
    if choice is not None and not isinstance(choice, str):
        wanted = choice.function.name
        tools = [t for t in tools if t.function.name == wanted]
        if not tools:
            raise InvalidInput(
                f"tool_choice: no function named {wanted!r} in tools", param="tool_choice"
            )
    return ToolPlan(
        tools=tools,
        parser=parser_for_template(template, parser_setting),
        forced=choice is not None and choice != "auto",
        parallel=body.parallel_tool_calls,
    )


def _arguments(text: str) -> Any:
    """A call's arguments as the template expects them: an object (a string if not JSON)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _tool_spec(tool: ToolDefinition) -> dict[str, Any]:
    return {"type": "function", "function": tool.function.model_dump(exclude_none=True)}


def _instruction(plan: ToolPlan) -> str:
    if not plan.forced:
        return ""
    if len(plan.tools) == 1:
        return f"You must call the function {plan.tools[0].function.name}."
    return "You must call at least one of the functions."


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if not text:
        return messages
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _native(m: ChatMessage) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": _arguments(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
    return out


def _hermes_call(name: str, arguments: str) -> str:
    call = {"name": name, "arguments": _arguments(arguments)}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


def _hermes(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        text = m.text()
        if m.role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        if m.tool_calls:
            calls = [_hermes_call(c.function.name, c.function.arguments) for c in m.tool_calls]
            text = "\n".join([text, *calls] if text else calls)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    for message in out:
        message.pop("_tool_results", None)
    return out


def template_inputs(
    body: ChatCompletionRequest, plan: ToolPlan | None, template: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for ``apply_chat_template``; tools None when the template gets
    none (no tools, or a template without a tools section: then they are in the prompt)."""
    has_tool_history = any(m.role == "tool" or m.tool_calls for m in body.messages)
    native = "tools" in template
    if not native and (plan is not None or has_tool_history):
        messages = _hermes(body.messages)
        if plan is None:
            return messages, None
        specs = "\n".join(json.dumps(_tool_spec(t), ensure_ascii=False) for t in plan.tools)
        prompt = HERMES_TOOLS_PROMPT.format(tools=specs)
        instruction = _instruction(plan)
        return _with_system(messages, prompt + ("\n\n" + instruction if instruction else "")), None
    messages = [_native(m) for m in body.messages]
    if plan is None:
        return messages, None
    return _with_system(messages, _instruction(plan)), [_tool_spec(t) for t in plan.tools]

"""Tool calling on /v1/chat/completions: the tool definitions go to the model's own chat template
(`tools=`), and the calls come back out of its answer as OpenAI `tool_calls`.

Calls are read as Qwen2.5 / Qwen3 / Hermes write them, `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`, and as Llama 3.1+ does, a whole answer that is one `{"name": ..., "parameters": {...}}`
object. tool_choice "required" or a named function constrains the answer to a call (a JSON object
of a declared function's name and arguments, by its parameter schema), so it always parses."""

from __future__ import annotations

import json
import re
import uuid
from typing import Optional

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOL_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def call_entry(name: str, arguments) -> dict:
    """One OpenAI tool call: arguments as a JSON string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def _as_call(text: str) -> Optional[dict]:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return call_entry(obj["name"], arguments if arguments is not None else {})


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the answer's text without its calls, the calls). A block that is not a call (bad JSON, no
    name) stays in the text, as the model wrote it."""
    calls = []

    def take(match: re.Match) -> str:
        call = _as_call(match.group(1))
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    content = TOOL_CALL.sub(take, text)
    if calls:
        return content.strip(), calls
    whole = _as_call(text.strip()) if text.strip().startswith("{") else None
    if whole is not None and ('"parameters"' in text or '"arguments"' in text):  # Llama 3.1's form
        return "", [whole]
    return text, []


def forced_call(text: str) -> Optional[dict]:
    """The call of an answer constrained to one (tool_choice required or named); None when it was
    cut short (max_tokens) before it parsed."""
    return _as_call(text.strip())


def call_schema(tools: list[dict], name: Optional[str] = None) -> dict:
    """The JSON schema of one call of `name`, or of any declared function."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"enum": [t["function"]["name"]]},
                               "arguments": t["function"].get("parameters") or {"type": "object"}}}
               for t in tools if name is None or t["function"]["name"] == name]
    return options[0] if len(options) == 1 else {"anyOf": options}


def supports_tools(template: str) -> bool:
    """Whether a chat template renders tool definitions at all."""
    return "tools" in template


class ToolCallStream:
    """Streamed text of an answer that may call tools: feed() gives what can go out as content at
    once; from the first `<tool_call>` on (or what may be its start) the text is held, and
    finish() parses it."""

    def __init__(self):
        self.held = ""
        self.calling = False

    def feed(self, text: str) -> str:
        self.held += text
        if self.calling:
            return ""
        at = self.held.find(OPEN)
        if at >= 0:
            self.calling = True
            out, self.held = self.held[:at], self.held[at:]
            return out
        # Hold back a tail that may be the start of "<tool_call>".
        keep = next((k for k in range(min(len(OPEN) - 1, len(self.held)), 0, -1) if OPEN.startswith(self.held[-k:])), 0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, the calls)."""
        held, self.held = self.held, ""
        return parse_tool_calls(held)


class ForcedCallStream(ToolCallStream):
    """The streamed answer of tool_choice required or named: all of it is the call."""

    def feed(self, text: str) -> str:
        self.held += text
        return ""

    def finish(self) -> tuple[str, list[dict]]:
        held, self.held = self.held, ""
        call = forced_call(held)
        return ("", [call]) if call is not None else (held, [])

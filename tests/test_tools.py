"""Tool calling on /v1/chat/completions: definitions rendered by the model's own template, calls
parsed out of the answer (Hermes/Qwen `<tool_call>` blocks, Llama 3.1's bare object), and
tool_choice required / named made certain by the constrained decoder, against a real server with
the dummy model (random weights: only the constraint makes its answer a call)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests
from live_server import WAIT_S, live_server, tiny_engine_config

from chatserve.config import ServerConfig
from chatserve.server.tools import ToolCallStream, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_calls_are_parsed_out_of_the_text():
    text = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": 1})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    # Llama 3.1's form: the whole answer one object with "parameters".
    content, calls = parse_tool_calls(' {"name": "get_time", "parameters": {"zone": 2}}')
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"zone": 2}
    # Not calls: a block that is no JSON stays in the text, as does plain JSON without a name.
    for text in ("<tool_call>not json</tool_call>", '{"city": "Paris"}', "Paris is sunny."):
        assert parse_tool_calls(text) == (text, [])
    # Streamed a character at a time: the text before the call goes out as it comes, the rest is held.
    stream, sent = ToolCallStream(), ""
    for ch in "Sure. <tool_c" + 'all>{"name": "get_time", "arguments": {"zone": 3}}</tool_call>':
        sent += stream.feed(ch)
    rest, calls = stream.finish()
    assert sent + rest == "Sure. " and json.loads(calls[0]["function"]["arguments"]) == {"zone": 3}
    stream = ToolCallStream()
    assert stream.feed("a <tool") == "a " and stream.feed(" box") == "<tool box" and stream.finish() == ("", [])


@pytest.fixture(scope="module")
def server():
    # 256 blocks: the tools' system turn alone is ~500 tokens of the dummy tokenizer.
    with live_server(tiny_engine_config(num_kv_blocks=256), ServerConfig(trust_request_chat_template=True)) as srv:
        srv.client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        yield srv


def arguments_of(call, tool) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_named_function_is_always_called_with_valid_arguments(server, seed):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = server.client.chat.completions.create(model="dummy_model", messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice=choice, seed=seed, max_tokens=200)
    (answer,) = r.choices
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    arguments_of(call, WEATHER)


def test_required_calls_one_of_the_tools_and_streams_the_same(server):
    kwargs = dict(model="dummy_model", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                  temperature=0, max_tokens=200)
    r = server.client.chat.completions.create(**kwargs)
    (call,) = r.choices[0].message.tool_calls
    tool = WEATHER if call.function.name == "get_weather" else TIME
    whole = arguments_of(call, tool)
    streamed: dict = {}
    finish = None
    for chunk in server.client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        assert not delta.content  # the call is never raw text
        for part in delta.tool_calls or []:
            entry = streamed.setdefault(part.index, {"name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert streamed == {0: {"name": call.function.name, "arguments": call.function.arguments}}
    assert json.loads(streamed[0]["arguments"]) == whole


def test_calls_and_results_in_the_history_reach_the_template(server):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    short = server.client.chat.completions.create(model="dummy_model", messages=ASK, tools=[WEATHER],
                                                  tool_choice="none", max_tokens=1)
    full = server.client.chat.completions.create(model="dummy_model", messages=history, tools=[WEATHER],
                                                 max_tokens=1)
    as_template = [m if m["role"] != "assistant" else {**m, "tool_calls": [{**call, "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]} for m in history]
    ids = server.engine.apply_chat_template(as_template, tools=[WEATHER])
    rendered = server.engine.tokenizer.decode(ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in rendered
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in rendered and "<tools>" in rendered
    # The server rendered exactly that (tools, the call and its result); tool_choice none renders no tools.
    assert full.usage.prompt_tokens == len(ids)
    assert short.usage.prompt_tokens == len(server.engine.apply_chat_template(ASK))


def test_tool_errors(server):
    def post(**body):
        return requests.post(f"{server.url}/v1/chat/completions", timeout=WAIT_S,
                             json={"model": "dummy_model", "messages": ASK, "max_tokens": 1, **body})

    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for body, param, words in [
        ({"tools": [WEATHER], "chat_template_kwargs": {"chat_template": plain}}, "tools", "does not render tools"),
        ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "not among the tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "pattern"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
         "already constrains"),
        ({"functions": [WEATHER["function"]]}, "functions", "send 'tools'"),
    ]:
        r = post(**body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], (body, error)
    assert post().status_code == 200  # and the server keeps serving


def test_langchain_structured_output_and_bound_tools(server):
    """LangChain's ChatOpenAI against this server: with_structured_output (json_schema and
    function_calling) gives a validated object, bind_tools with a forced tool gives a tool call."""
    import langchain_openai
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather in a city."""
        city: str = Field(max_length=20)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    llm = langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model="dummy_model",
                                      max_tokens=120, temperature=0, max_retries=0, timeout=WAIT_S)
    for method in ("json_schema", "function_calling"):
        got = llm.with_structured_output(Weather, method=method).invoke("What is the weather in Paris?")
        assert isinstance(got, Weather), (method, got)
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])


def test_auto_parses_a_call_the_model_writes_in_its_own_words(server):
    """tool_choice auto end to end: the model's answer (made to be this text by a choice
    constraint, since random weights write none by themselves) is parsed into tool_calls, the text
    before the call stays content, unstreamed and streamed alike."""
    said = 'Let me check.<tool_call>\n{"name": "get_time", "arguments": {"zone": 3}}\n</tool_call>'
    kwargs = dict(model="dummy_model", messages=ASK, tools=[WEATHER, TIME], max_tokens=200,
                  extra_body={"structured_outputs": {"choice": [said]}})
    r = server.client.chat.completions.create(**kwargs)
    (answer,) = r.choices
    assert answer.finish_reason == "tool_calls" and answer.message.content == "Let me check."
    (call,) = answer.message.tool_calls
    assert arguments_of(call, TIME) == {"zone": 3}
    content, calls, finish = "", [], None
    for chunk in server.client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check." and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_time", {"zone": 3})]
    # Without tools the same answer is plain text.
    plain = server.client.chat.completions.create(**{**kwargs, "tools": None})
    assert plain.choices[0].message.content == said and not plain.choices[0].message.tool_calls

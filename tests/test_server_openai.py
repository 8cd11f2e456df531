"""The OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) through the official
`openai` package, sync and async, streamed and not, against a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import logging

import openai
import pytest
import torch
import requests
from live_server import WAIT_S, idle, live_server, tiny_engine_config, wait_until
from scripted_model import ANSWER, HI, REASONING, write_scripted_model

from chatserve.config import ServerConfig
from chatserve.models.dummy import THINK_END, THINK_START

# The greedy dummy_model answers this one with readable text.
HELLO = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
         {"role": "user", "content": "Hello"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server():
    with live_server(server_config=ServerConfig(model_aliases=["gpt-4o-mini"])) as srv:
        srv.client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        yield srv


def chat(server, **kwargs):
    return server.client.chat.completions.create(**{"model": "dummy_model", "messages": HI, **kwargs})


def test_models(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["dummy_model", "gpt-4o-mini"]
    assert all(m.object == "model" and m.owned_by == "chatserve" for m in models.data)
    assert server.client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-5")


def test_chat_completion(server):
    r = chat(server, max_tokens=12, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "dummy_model"
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    # An alias names the same model; max_completion_tokens is max_tokens' newer name.
    again = chat(server, model="gpt-4o-mini", max_completion_tokens=12, **GREEDY)
    assert again.choices[0].message.content == choice.message.content


def test_chat_stream_matches_the_whole_answer(server):
    whole = chat(server, max_tokens=40, **GREEDY)
    chunks = list(chat(server, max_tokens=40, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    body, last, usage = chunks[:-2], chunks[-2], chunks[-1]
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in body)
    assert last.choices[0].finish_reason == "length" and not last.choices[0].delta.content
    assert usage.choices == [] and usage.usage.completion_tokens == 40
    # The prompt was just computed by the unstreamed request: its KV blocks come from the prefix cache.
    assert usage.usage.prompt_tokens_details.cached_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content


def test_stream_without_usage_has_no_usage_chunk(server):
    chunks = list(chat(server, max_tokens=5, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_async_client_requests_run_together(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)

        async def streamed(i: int) -> str:
            text = []
            async for chunk in await client.chat.completions.create(
                    model="dummy_model", messages=[{"role": "user", "content": f"Question {i}?"}],
                    max_tokens=24, stream=True, **GREEDY):
                text.append(chunk.choices[0].delta.content or "")
            return "".join(text)

        async def whole(i: int) -> str:
            r = await client.chat.completions.create(model="dummy_model", max_tokens=24, **GREEDY,
                                                     messages=[{"role": "user", "content": f"Question {i}?"}])
            return r.choices[0].message.content

        batched = await asyncio.gather(*(streamed(i) for i in range(3)), *(whole(i) for i in range(3)))
        alone = [await whole(i) for i in range(3)]
        await client.close()
        return batched, alone

    batched, alone = asyncio.run(main())
    # Greedy answers are the same whether a request ran alone or batched with others.
    assert batched == alone + alone
    wait_until(lambda: idle(server.engine), "every block to be free")


def test_n_choices_and_seed(server):
    r = chat(server, max_tokens=10, n=3, seed=7, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # each choice draws its own answer
    assert r.usage.completion_tokens == 30 and r.usage.prompt_tokens < 30
    assert [c.message.content for c in chat(server, max_tokens=10, n=3, seed=7, temperature=1.0).choices] == texts
    streamed = [""] * 3
    finished = set()
    for chunk in chat(server, max_tokens=10, n=3, seed=7, temperature=1.0, stream=True):
        (c,) = chunk.choices
        streamed[c.index] += c.delta.content or ""
        if c.finish_reason:
            finished.add(c.index)
    assert streamed == texts and finished == {0, 1, 2}


def test_stop_string(server):
    text = chat(server, messages=HELLO, max_tokens=30, **GREEDY).choices[0].message.content
    stop = text[10:14]
    assert stop.strip() and "\ufffd" not in stop
    r = chat(server, messages=HELLO, max_tokens=30, stop=[stop, "@@never@@"], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]


def test_logprobs(server):
    r = chat(server, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or entry.token.startswith("bytes:")
    streamed = [e for c in chat(server, max_tokens=6, logprobs=True, top_logprobs=3, stream=True, **GREEDY)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    assert chat(server, max_tokens=2).choices[0].logprobs is None


def test_extra_sampling_fields(server):
    r = chat(server, max_tokens=8, extra_body={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.3,
                                               "ignore_eos": True})
    assert r.usage.completion_tokens == 8
    # top_k=1 is greedy whatever the temperature.
    greedy = chat(server, max_tokens=8, temperature=0, extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].message.content == greedy.choices[0].message.content
    penalized = chat(server, max_tokens=8, presence_penalty=2.0, frequency_penalty=2.0, **GREEDY)
    assert penalized.usage.completion_tokens == 8


def test_completions(server):
    c = server.client.completions
    r = c.create(model="dummy_model", prompt="The capital of France is", max_tokens=8, **GREEDY)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.choices[0].finish_reason == "length"
    text = r.choices[0].text
    ids = server.engine.tokenizer.encode("The capital of France is")
    assert c.create(model="dummy_model", prompt=ids, max_tokens=8, **GREEDY).choices[0].text == text
    echoed = c.create(model="dummy_model", prompt="The capital of France is", max_tokens=8, echo=True, **GREEDY)
    assert echoed.choices[0].text == "The capital of France is" + text
    # Two prompts with n=2: choices are numbered prompt * n + choice, prompt tokens counted once per prompt.
    many = c.create(model="dummy_model", prompt=["The capital of France is", "Hello"], n=2, max_tokens=8, **GREEDY)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == text
    assert many.usage.prompt_tokens == len(ids) + len(server.engine.tokenizer.encode("Hello"))
    assert many.usage.completion_tokens == 32
    streamed = "".join(ch.choices[0].text for ch in c.create(model="dummy_model", prompt=ids, max_tokens=8,
                                                            stream=True, **GREEDY) if ch.choices)
    assert streamed == text
    lp = c.create(model="dummy_model", prompt=ids, max_tokens=5, logprobs=2, **GREEDY).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == c.create(model="dummy_model", prompt=ids, max_tokens=5, **GREEDY).choices[0].text \
        or any(t.startswith("bytes:") for t in lp.tokens)
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0


@pytest.mark.parametrize("kwargs, status, param, words", [
    ({"max_tokens": 0}, 400, "max_tokens", ["greater than 0"]),
    ({"messages": []}, 400, "messages", ["at least one message"]),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", ["robot"]),
    ({"messages": [{"role": "user", "content": "hello " * 600}]}, 400, "messages", ["shorten it"]),
    ({"temperature": 3}, 400, "temperature", ["less than or equal to 2"]),
    ({"extra_body": {"repetition_penalty": 1e308}}, 400, "repetition_penalty", ["less than or equal to 2"]),
    ({"max_tokens": 100_000}, 400, "max_tokens", ["at most"]),
    ({"top_logprobs": 2}, 400, "top_logprobs", ["logprobs: true"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ["at most 4"]),
    ({"n": 0}, 400, "n", ["greater than or equal to 1"]),
    ({"extra_body": {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}}, 400, "tool_choice", ["'g'", "not among the tools"]),
    ({"model": "gpt-5"}, 404, "model", ["gpt-5", "dummy_model"]),
    ({"extra_body": {"chat_template_kwargs": {"tokenize": False}}}, 400, "chat_template_kwargs",
     ["'tokenize' is set by the server"]),
    ({"extra_body": {"chat_template_kwargs": {"chat_template": "{{ 'ab ' * 5000000 }}"}}}, 400,
     "chat_template_kwargs.chat_template", ["--trust-request-chat-template"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
     400, "messages[0].content", ["'image_url' content part", "text only"]),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     400, "messages[0].content", ["'input_audio'", "text only"]),
    ({"modalities": ["text", "audio"]}, 400, "modalities", ["text only"]),
    ({"extra_body": {"functions": [{"name": "f", "parameters": {}}]}}, 400, "functions", ["not supported"]),
    ({"extra_body": {"tool_choice": "required"}}, 400, "tool_choice", ["needs tools"]),
], ids=["max_tokens", "empty", "role", "too_long", "temperature", "repetition_penalty", "over_context", "top_logprobs", "stop", "n",
        "tools", "unknown_model", "reserved_template_kwarg", "request_template", "image", "audio", "modalities",
        "functions", "tool_choice"])
def test_bad_requests_get_openai_errors(server, kwargs, status, param, words):
    with pytest.raises(openai.APIStatusError) as caught:
        chat(server, **kwargs)
    err = caught.value
    assert err.status_code == status
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
    assert all(w in body["message"] for w in words), body["message"]
    assert chat(server, max_tokens=1).usage.completion_tokens == 1  # and the server keeps serving


def test_bad_completion_requests(server):
    c = server.client.completions
    for kwargs, param in [({"prompt": []}, "prompt"), ({"prompt": [10**6]}, "prompt"),
                          ({"prompt": "x", "best_of": 3}, "best_of"), ({"prompt": "x", "suffix": "y"}, "suffix")]:
        with pytest.raises(openai.BadRequestError) as caught:
            c.create(model="dummy_model", max_tokens=2, **kwargs)
        assert caught.value.response.json()["error"]["param"] == param, kwargs
    r = requests.post(f"{server.url}/v1/chat/completions", data=b"{not json", timeout=WAIT_S,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_request_template_only_when_the_operator_trusts_it():
    with live_server(server_config=ServerConfig(trust_request_chat_template=True)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        own = client.chat.completions.create(model="dummy_model", messages=HI, max_tokens=1)
        bare = client.chat.completions.create(model="dummy_model", messages=HI, max_tokens=1, extra_body={
            "chat_template_kwargs": {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}})
        assert bare.usage.prompt_tokens < own.usage.prompt_tokens


def test_a_lone_surrogate_is_a_400_on_every_route(server):
    """JSON may carry "\\ud800", which is no valid Unicode: every route refuses it with a 400 naming
    the field, and the server keeps serving. (Raw bodies: JSON encoders refuse to write one.)"""
    lone = '"\\ud800x"'
    cases = [
        ("/infer", f'{{"model": "dummy_model", "messages": [{{"role": "user", "content": {lone}}}]}}',
         "messages[0].content"),
        ("/v1/chat/completions", f'{{"model": "dummy_model", "messages": [{{"role": "user", "content": {lone}}}]}}',
         "messages[0].content"),
        ("/v1/chat/completions", f'{{"model": {lone}, "messages": [{{"role": "user", "content": "hi"}}]}}', "model"),
        ("/v1/completions", f'{{"model": "dummy_model", "prompt": {lone}}}', "prompt"),
        ("/v1/conversations", f'{{"system_prompt": {lone}}}', "system_prompt"),
    ]
    for path, body, param in cases:
        r = requests.post(f"{server.url}{path}", data=body.encode(), timeout=WAIT_S,
                          headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text)
        error = r.json()["error"]
        assert error["param"].startswith(param) and "lone UTF-16 surrogate" in error["message"], (path, error)
    assert chat(server, max_tokens=1).usage.completion_tokens == 1


def test_a_slow_reader_does_not_slow_the_others(server):
    unread = chat(server, messages=HELLO, max_tokens=300, stream=True, extra_body={"ignore_eos": True}, **GREEDY)
    chunks = iter(unread)
    request_id = f"{next(chunks).id}-0"
    # While nobody reads that stream, another request is answered in full...
    assert chat(server, max_tokens=20, **GREEDY).usage.completion_tokens == 20
    # ...and the engine finishes the unread one too: its tokens wait in the server, not in the engine.
    wait_until(lambda: request_id not in server.engine.requests, "the unread request to finish")
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in rest if c.choices[0].delta.content) > 250


def test_an_odd_request_does_not_end_the_other_streams(server):
    """The hardening run's finding: top_k past the vocabulary used to fail the whole batch, so
    every stream in flight ended with finish_reason "error". Now it means "every token"."""
    stream = iter(chat(server, messages=HELLO, max_tokens=200, stream=True, extra_body={"ignore_eos": True},
                       **GREEDY))
    next(stream)
    odd = chat(server, max_tokens=3, extra_body={"top_k": 1_000_000})
    assert odd.choices[0].finish_reason == "length" and odd.usage.completion_tokens == 3
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"


def test_closing_a_stream_aborts_the_request(server):
    wait_until(lambda: idle(server.engine), "an idle engine")
    stream = chat(server, max_tokens=400, stream=True, **GREEDY)
    first = next(iter(stream))
    request_id = f"{first.id}-0"
    assert request_id in server.engine.requests
    stream.close()
    wait_until(lambda: request_id not in server.engine.requests, "the abort")
    wait_until(lambda: idle(server.engine), "the blocks to be free")


def test_shutdown_ends_streams_with_a_final_chunk():
    from chatserve.server.app import drain

    with live_server() as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        stream = client.chat.completions.create(model="dummy_model", messages=HI, max_tokens=400, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY)
        chunks = [next(iter(stream))]
        drain(srv.app)  # what SIGTERM and Ctrl-C do
        chunks += list(stream)  # ends: the client saw [DONE]
        assert chunks[-2].choices[0].finish_reason == "abort" and chunks[-1].usage.completion_tokens < 400
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="dummy_model", messages=HI, max_tokens=2)
        assert caught.value.status_code == 503


def test_api_key():
    with live_server(server_config=ServerConfig(api_key="sesame")) as srv:
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="dummy_model", messages=HI, max_tokens=1)
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sesame", max_retries=0)
        assert good.chat.completions.create(model="dummy_model", messages=HI, max_tokens=1).choices


# -- reasoning models -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory):
    model_dir, _ = write_scripted_model(tmp_path_factory.mktemp("scripted"))
    with live_server(tiny_engine_config(model=str(model_dir))) as srv:
        srv.client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        yield srv


@pytest.mark.parametrize("opened", [False, True], ids=["model_opens_think", "template_opens_think"])
def test_reasoning_content(reasoning_server, opened):
    kwargs = dict(model=reasoning_server.app.state.model_name, messages=HI, max_tokens=40, temperature=0,
                  extra_body={"chat_template_kwargs": {"open_think": opened}})
    r = reasoning_server.client.chat.completions.create(**kwargs)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, ANSWER)
    assert r.choices[0].finish_reason == "stop"
    thought, answer = [], []
    for chunk in reasoning_server.client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        thought.append(getattr(delta, "reasoning_content", None) or "")
        answer.append(delta.content or "")
        assert "<think>" not in answer[-1] + thought[-1] and "</think>" not in answer[-1] + thought[-1]
    assert "".join(thought) == REASONING and "".join(answer) == ANSWER
    # The reasoning streams before the answer, token by token.
    assert sum(1 for t in thought if t) > 1 and thought.index(next(t for t in thought if t)) < \
        answer.index(next(a for a in answer if a))


def test_raw_completions_keep_the_think_tags(reasoning_server):
    r = requests.post(f"{reasoning_server.url}/infer", timeout=WAIT_S, json={
        "model": reasoning_server.app.state.model_name, "messages": HI, "temperature": 0, "max_tokens": 40})
    assert r.json()["choices"][0]["message"]["content"] == f"{THINK_START}{REASONING}{THINK_END}{ANSWER}"
    assert json.loads(r.text)["choices"][0]["finish_reason"] == "stop"


def test_openapi_schema_documents_400_not_422(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=WAIT_S).json()
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in operations)
    for path in ("/v1/chat/completions", "/v1/completions", "/infer"):
        assert schema["paths"][path]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == \
            {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(schema["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(server):
    """lm-eval's loglikelihood request: echo + logprobs, max_tokens 0 (nothing generated); the
    prompt tokens' logprobs equal the model's own log-softmax at each position."""
    context, continuation = "The capital of France is", " Paris, the city of light"
    ids = server.engine.tokenizer.encode(context + continuation)
    n_context = len(server.engine.tokenizer.encode(context))
    r = server.client.completions.create(model="dummy_model", prompt=context + continuation, max_tokens=0,
                                         echo=True, logprobs=2, temperature=0)
    (choice,) = r.choices
    assert choice.text == server.engine.tokenizer.decode(ids) and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(top) <= 2 and max(top.values()) >= logprob - 1e-5
               for top, logprob in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    want = torch.log_softmax(server.engine.loaded.model.score(ids).float(), -1)
    want = [want[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    # The continuation's loglikelihood, as lm-eval sums it.
    assert sum(lp.token_logprobs[n_context:]) == pytest.approx(sum(want[n_context - 1:]), abs=1e-3)
    # A second time the prompt's blocks are in the prefix cache: still scored whole, same numbers;
    # with a generated answer, its logprobs follow the prompt's, and streaming gives the same.
    again = server.client.completions.create(model="dummy_model", prompt=ids, max_tokens=3, echo=True,
                                             logprobs=0, temperature=0)
    assert again.choices[0].logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert len(again.choices[0].logprobs.tokens) == len(ids) + 3 and again.usage.completion_tokens == 3
    streamed = [x for ch in server.client.completions.create(model="dummy_model", prompt=ids, max_tokens=3, echo=True,
                                                              logprobs=0, temperature=0, stream=True)
                if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(again.choices[0].logprobs.token_logprobs, abs=1e-5)
    # max_tokens 0 without echo asks for nothing: refused.
    with pytest.raises(openai.BadRequestError, match="only with echo"):
        server.client.completions.create(model="dummy_model", prompt="Hi", max_tokens=0)


def test_responses_follow_openais_schema(server):
    """refusal: null on the message and logprobs (required, nullable), system_fingerprint a string,
    model the name the request used."""
    body = requests.post(f"{server.url}/v1/chat/completions", timeout=WAIT_S, json={
        "model": "gpt-4o-mini", "messages": HI, "max_tokens": 2, "logprobs": True}).json()
    message = body["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None
    assert "refusal" in body["choices"][0]["logprobs"] and body["choices"][0]["logprobs"]["refusal"] is None
    assert isinstance(body["system_fingerprint"], str) and body["system_fingerprint"].startswith("chatserve-")
    assert body["model"] == "gpt-4o-mini"
    chunks = [json.loads(line[6:]) for line in requests.post(f"{server.url}/v1/completions", timeout=WAIT_S, json={
        "model": "gpt-4o-mini", "prompt": "Hi", "max_tokens": 2, "stream": True}).text.splitlines()
        if line.startswith("data: {")]
    assert chunks and all(c["model"] == "gpt-4o-mini" and isinstance(c["system_fingerprint"], str) for c in chunks)
    # Fields OpenAI clients send that mean nothing here are accepted (README lists them).
    r = chat(server, max_tokens=1, user="u1", extra_body={"store": False, "metadata": {"a": "b"},
                                                           "service_tier": "auto", "reasoning_effort": "low"})
    assert r.usage.completion_tokens == 1


def test_a_local_model_is_served_by_its_folders_name(qwen2_dir):
    with live_server(tiny_engine_config(model=str(qwen2_dir))) as srv:
        listed = requests.get(f"{srv.url}/v1/models", timeout=WAIT_S).json()["data"]
        assert [m["id"] for m in listed] == [qwen2_dir.name] and "/" not in qwen2_dir.name
        for name in (qwen2_dir.name, str(qwen2_dir)):  # the full --model value is still accepted
            r = requests.post(f"{srv.url}/v1/chat/completions", timeout=WAIT_S,
                              json={"model": name, "messages": HI, "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == name
    with live_server(tiny_engine_config(model=str(qwen2_dir)), ServerConfig(served_model_name="tiny")) as srv:
        assert [m["id"] for m in requests.get(f"{srv.url}/v1/models", timeout=WAIT_S).json()["data"]] == ["tiny"]


# -- validation: authentication first, JSON types kept, one stop bound, a truthful schema ------------

PROTECTED_POSTS = {"/infer": {"model": "dummy_model", "messages": HI},
                   "/v1/chat/completions": {"model": "dummy_model", "messages": HI},
                   "/v1/completions": {"model": "dummy_model", "prompt": "Hi"},
                   "/v1/conversations": {"title": "t"}}


def test_authentication_comes_before_body_validation():
    with live_server(server_config=ServerConfig(api_key="sesame")) as srv:
        for path in PROTECTED_POSTS:
            for body in (b"{not json", b'{"messages": 5, "title": 7, "prompt": []}', b"[1]"):
                for headers, status in (({}, 401), ({"authorization": "Bearer sesame"}, 400)):
                    r = requests.post(f"{srv.url}{path}", data=body, timeout=WAIT_S,
                                      headers={"content-type": "application/json", **headers})
                    assert r.status_code == status, (path, body, headers, r.text)
                    error = r.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}
                    assert (error["code"] == "invalid_api_key") == (status == 401), error
        # A good body with the key is served.
        r = requests.post(f"{srv.url}/infer", json={**PROTECTED_POSTS["/infer"], "max_tokens": 1}, timeout=WAIT_S,
                          headers={"authorization": "Bearer sesame"})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value, words", [
    ("max_tokens", "4", ["integer"]), ("max_tokens", 4.0, ["integer"]), ("max_tokens", True, ["integer"]),
    ("stream", "yes", ["boolean"]), ("stream", 1, ["boolean"]), ("temperature", True, ["number"]),
    ("temperature", "0.5", ["number"]), ("top_p", "1", ["number"]), ("n", "2", ["integer"]),
    ("seed", "7", ["integer"]), ("logprobs", "true", ["boolean"]),
])
def test_wrong_json_types_are_refused_not_coerced(server, field, value, words):
    r = requests.post(f"{server.url}/v1/chat/completions", timeout=WAIT_S,
                      json={"model": "dummy_model", "messages": HI, "max_tokens": 1, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and all(w in error["message"] for w in words), error


def test_wrong_json_types_are_refused_on_every_route(server):
    cases = [("/infer", {"model": "dummy_model", "messages": HI, "max_tokens": "4"}, "max_tokens"),
             ("/infer", {"model": "dummy_model", "messages": HI, "stream": "yes"}, "stream"),
             ("/infer", {"model": "dummy_model", "messages": HI, "temperature": True}, "temperature"),
             ("/v1/completions", {"model": "dummy_model", "prompt": [1, True]}, "prompt"),
             ("/v1/completions", {"model": "dummy_model", "prompt": "x", "echo": "yes"}, "echo"),
             ("/v1/conversations", {"params": {"max_tokens": "4"}}, "params.max_tokens"),
             ("/v1/conversations", {"params": {"temperature": False}}, "params.temperature")]
    for path, body, param in cases:
        r = requests.post(f"{server.url}{path}", json=body, timeout=WAIT_S)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"]["param"].startswith(param), (path, r.json())
    # An integer is still a number: temperature 0 and top_p 1 are fine.
    assert chat(server, max_tokens=1, temperature=0, top_p=1).usage.completion_tokens == 1
    r = requests.post(f"{server.url}/infer", json={"model": "dummy_model", "messages": HI, "max_tokens": 1,
                                                    "temperature": 1, "stream": False}, timeout=WAIT_S)
    assert r.status_code == 200, r.text


def test_infer_takes_as_many_stop_strings_as_the_openai_routes(server):
    for stop in (["a", "b", "c", "d", "e"], ["x"] * 4000):
        for path, body in (("/infer", {"messages": HI}), ("/v1/chat/completions", {"messages": HI}),
                           ("/v1/completions", {"prompt": "Hi"})):
            r = requests.post(f"{server.url}{path}", json={"model": "dummy_model", "stop": stop, **body},
                              timeout=WAIT_S)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert error["param"] == "stop" and "at most 4" in error["message"], error
    r = requests.post(f"{server.url}/infer", json={"model": "dummy_model", "messages": HI, "max_tokens": 1,
                                                    "stop": ["a", "b", "c", "d"]}, timeout=WAIT_S)
    assert r.status_code == 200, r.text


def test_openapi_schema_tells_the_truth(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=WAIT_S).json()
    paths, schemas = schema["paths"], schema["components"]["schemas"]
    for path in ("/infer", "/v1/chat/completions", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"400", "401", "404", "429", "503"} <= set(responses), (path, responses.keys())
        assert "model_not_found" in responses["404"]["description"]
        assert responses["404"]["content"]["application/json"]["schema"] == \
            {"$ref": "#/components/schemas/ErrorResponse"}
    assert "model_not_found" in paths["/v1/models/{model_id}"]["get"]["responses"]["404"]["description"]
    for name in ("InferRequest", "ChatCompletionRequest"):
        assert schemas[name]["properties"]["messages"]["minItems"] == 1, name
        stop = schemas[name]["properties"]["stop"]["anyOf"]
        assert {"type": "array", "items": {"type": "string"}, "maxItems": 4} in stop, stop
    for name in ("CreateConversation", "UpdateConversation"):
        title = schemas[name]["properties"]["title"]
        assert title["type"] == "string" and title["minLength"] == 1 and "anyOf" not in title, title
    # The schema's example bodies are accepted as they are.
    example = schemas["ChatCompletionRequest"]["examples"][0]
    assert requests.post(f"{server.url}/v1/chat/completions", json={**example, "max_tokens": 1},
                         timeout=WAIT_S).status_code == 200


def test_a_405_says_which_methods_are_allowed(server):
    for path, allowed in (("/v1/models", {"GET"}), ("/v1/chat/completions", {"POST"}), ("/infer", {"POST"}),
                          ("/health", {"GET"}), ("/static/app.js", {"GET", "HEAD"}),
                          ("/v1/conversations", {"GET", "POST"})):
        for method in ("TRACE", "PUT"):
            r = requests.request(method, f"{server.url}{path}", timeout=WAIT_S)
            assert r.status_code == 405, (method, path, r.status_code)
            assert {m.strip() for m in r.headers["Allow"].split(",")} == allowed, (path, r.headers)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_body_that_is_no_json_is_told_what_the_route_takes(server):
    conv_id = requests.post(f"{server.url}/v1/conversations", json={}, timeout=WAIT_S).json()["id"]
    routes = [("POST", "/infer", ["messages"]), ("POST", "/v1/completions", ["prompt"]),
              ("POST", "/v1/conversations", ["title"]), ("PATCH", f"/v1/conversations/{conv_id}", ["title"]),
              ("POST", f"/v1/conversations/{conv_id}/messages", ["content"]),
              ("POST", f"/v1/conversations/{conv_id}/switch", ["message_id"])]
    for method, path, words in routes:
        for body in (b"{nope", b'"just a string"'):
            r = requests.request(method, f"{server.url}{path}", data=body, timeout=WAIT_S,
                                 headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, r.text)
            message = r.json()["error"]["message"]
            assert all(w in message for w in words), (path, message)
            if "conversations" in path:  # the conversation routes take neither model nor messages
                assert "model" not in message and "messages" not in message, (path, message)


# -- the operator's sampling defaults -----------------------------------------------------------------

def test_operator_sampling_defaults_apply_on_every_route_and_are_shown(caplog):
    """--override-generation-config {"temperature": 0}: every route samples greedily where a request
    sets no temperature (unseeded answers repeat and equal an explicit temperature 0's), /v1/models
    shows the effective defaults, and the start-up log says them and where they come from."""
    overrides = {"temperature": 0, "top_p": 0.8}
    with caplog.at_level(logging.INFO, logger="chatserve.server"), \
            live_server(tiny_engine_config(override_generation_config=overrides)) as srv:
        shown = {"temperature": 0, "top_p": 0.8, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
        for path in ("/v1/models", "/v1/models/dummy_model"):
            body = requests.get(f"{srv.url}{path}", timeout=WAIT_S).json()
            card = body["data"][0] if path == "/v1/models" else body
            assert card["chatserve"] == {"default_sampling": shown}, card

        def infer(**extra) -> str:
            r = requests.post(f"{srv.url}/infer", json={"model": "dummy_model", "messages": HI, "max_tokens": 12,
                                                         **extra}, timeout=WAIT_S)
            return r.json()["choices"][0]["message"]["content"]

        def chat_route(**extra) -> str:
            r = requests.post(f"{srv.url}/v1/chat/completions", timeout=WAIT_S,
                              json={"model": "dummy_model", "messages": HI, "max_tokens": 12, **extra})
            return r.json()["choices"][0]["message"]["content"]

        def completion(**extra) -> str:
            r = requests.post(f"{srv.url}/v1/completions", timeout=WAIT_S,
                              json={"model": "dummy_model", "prompt": "Once upon a time", "max_tokens": 12, **extra})
            return r.json()["choices"][0]["text"]

        def conversation(**extra) -> str:
            conv = requests.post(f"{srv.url}/v1/conversations", json={}, timeout=WAIT_S).json()
            with requests.post(f"{srv.url}/v1/conversations/{conv['id']}/messages", stream=True, timeout=WAIT_S,
                               json={"content": "Hi", "max_tokens": 12, **extra}) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                          if line.startswith("data: {")]
            return next(e for e in events if e["type"] == "done")["message"]["content"]

        for ask in (infer, chat_route, completion, conversation):
            greedy = ask(temperature=0)
            assert ask() == ask() == greedy, ask.__name__
            # A request's own value still wins: sampled at temperature 1.5, unseeded answers differ.
            assert len({ask(temperature=1.5, top_p=1) for _ in range(3)}) > 1, ask.__name__
    assert ("default sampling (for requests that leave it unset): temperature 0, top_p 0.8, top_k 0, min_p 0.0, "
            "repetition_penalty 1.0 (temperature, top_p from --override-generation-config)") in caplog.text


def test_vllm_prompt_logprobs_on_both_routes(server):
    ids = server.engine.tokenizer.encode("The capital of France is Paris")
    want = torch.log_softmax(server.engine.loaded.model.score(ids).float(), -1)
    r = requests.post(f"{server.url}/v1/completions", timeout=WAIT_S, json={
        "model": "dummy_model", "prompt": ids, "max_tokens": 2, "prompt_logprobs": 1}).json()
    (choice,) = r["choices"]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None and choice["logprobs"] is None
    for p, (token, entry) in enumerate(zip(ids[1:], plp[1:])):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(want[p, token].item(), abs=1e-4)
        assert mine["rank"] == int((want[p] > want[p, token]).sum()) + 1
        best = int(want[p].argmax())
        assert entry[str(best)]["rank"] == 1 and len(entry) <= 2
    chat_body = requests.post(f"{server.url}/v1/chat/completions", timeout=WAIT_S, json={
        "model": "dummy_model", "messages": HI, "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert chat_body["prompt_logprobs"][0] is None and len(chat_body["prompt_logprobs"]) == chat_body["usage"]["prompt_tokens"]
    streamed = requests.post(f"{server.url}/v1/completions", timeout=WAIT_S, json={
        "model": "dummy_model", "prompt": "Hi", "max_tokens": 1, "prompt_logprobs": 1, "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"

"""Structured output (response_format, vLLM's structured_outputs / guided_*) and logit_bias,
through the real `openai` SDK against a real server running the random-weight dummy_model, whose
text is noise: only the constraint makes its output valid, so every answer must validate."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from live_server import WAIT_S, idle, live_server, tiny_engine_config, wait_until
from pydantic import BaseModel, Field

from chatserve import Engine, SamplingParams
from chatserve.engine.structured import StructuredOutput
from chatserve.models.dummy import write_hf_model_dir

HI = [{"role": "user", "content": "Describe a person as JSON."}]

# Strings and arrays are bounded so that noise reaches the end of the grammar well within max_tokens.
SCHEMAS = {
    "flat_required": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                       "member": {"type": "boolean"}},
        "required": ["name", "age", "member"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": -1.5, "maximum": 2.25},
                       "count": {"type": "integer", "minimum": 3, "maximum": 17},
                       "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
        "required": ["score", "count", "ratio"],
    },
    "nested_arrays_enums": {
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog", "bird"]},
            "owner": {"type": "object",
                      "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                              "minItems": 1, "maxItems": 3}},
                      "required": ["id", "tags"]},
            "points": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "maxItems": 4},
        },
        "required": ["kind", "owner", "points"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                       "note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["code"],
    },
}


@pytest.fixture(scope="module")
def server():
    with live_server(tiny_engine_config(num_kv_blocks=128)) as srv:
        srv.client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        yield srv


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def chat(server, **kwargs):
    return server.client.chat.completions.create(**{"model": "dummy_model", "messages": HI, "max_tokens": 200,
                                                    **kwargs})


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_output_validates_every_time(server, name):
    schema = SCHEMAS[name]
    for seed in range(4):
        choice = chat(server, seed=seed, response_format=schema_format(schema)).choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)
    # The completions route takes the same constraint (vLLM accepts response_format there too).
    text = server.client.completions.create(model="dummy_model", prompt="JSON:", max_tokens=200, seed=7,
                                            extra_body={"response_format": schema_format(schema)}).choices[0]
    assert text.finish_reason == "stop"
    jsonschema.validate(json.loads(text.text), schema)


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool
    toys: list[Literal["ball", "rope"]] = Field(max_length=2)


def test_parse_with_a_pydantic_model(server):
    for seed in range(3):
        r = server.client.chat.completions.parse(model="dummy_model", messages=HI, response_format=Pet,
                                                 max_tokens=100, seed=seed)
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and 0 <= pet.age <= 30 and len(pet.toys) <= 2


def test_json_object_gives_a_json_object(server):
    # Any object: keys and string values are free, so the noise's answers vary in length.
    for seed in (1, 2, 5):
        choice = chat(server, seed=seed, max_tokens=400, response_format={"type": "json_object"}).choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


def test_regex_and_choice(server):
    regex = r"[a-z]{2,5}-\d{3}"
    for seed in range(3):
        new = server.client.completions.create(model="dummy_model", prompt="id:", max_tokens=20, seed=seed,
                                               extra_body={"structured_outputs": {"regex": regex}}).choices[0]
        old = server.client.completions.create(model="dummy_model", prompt="id:", max_tokens=20, seed=seed,
                                               extra_body={"guided_regex": regex}).choices[0]
        assert new.finish_reason == "stop" and re.fullmatch(regex, new.text) and old.text == new.text
    choices = ["yes", "no", "maybe \"so\""]
    seen = set()
    for seed in range(6):
        answer = chat(server, seed=seed, extra_body={"structured_outputs": {"choice": choices}}).choices[0]
        assert answer.finish_reason == "stop" and answer.message.content in choices
        seen.add(answer.message.content)
        assert chat(server, seed=seed, extra_body={"guided_choice": choices}).choices[0].message.content \
            == answer.message.content
    assert len(seen) > 1  # the choice is the model's, not always the first


def test_ebnf_grammar_and_json_in_structured_outputs(server):
    grammar = 'root ::= "move " direction " " [1-9]\ndirection ::= "north" | "south" | "east" | "west"'
    schema = SCHEMAS["bounded_numbers"]
    for seed in range(3):
        move = server.client.completions.create(model="dummy_model", prompt="Next:", max_tokens=20, seed=seed,
                                                extra_body={"structured_outputs": {"grammar": grammar}}).choices[0]
        assert move.finish_reason == "stop" and re.fullmatch(r"move (north|south|east|west) [1-9]", move.text)
        answer = chat(server, seed=seed, extra_body={"structured_outputs": {"json": schema}}).choices[0]
        jsonschema.validate(json.loads(answer.message.content), schema)
        assert chat(server, seed=seed, extra_body={"guided_json": json.dumps(schema)}).choices[0].message.content \
            == answer.message.content


def test_streamed_constrained_output_is_valid_json(server):
    schema = SCHEMAS["nested_arrays_enums"]
    for seed in range(2):
        chunks = list(chat(server, seed=seed, stream=True, response_format=schema_format(schema)))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)
        whole = chat(server, seed=seed, response_format=schema_format(schema)).choices[0].message.content
        assert text == whole


def test_max_tokens_before_the_grammar_completes_is_length(server):
    choice = chat(server, seed=0, max_tokens=4, response_format=schema_format(SCHEMAS["flat_required"])).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


@pytest.mark.parametrize("kwargs, param, words", [
    ({"response_format": schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})},
     "response_format", "Cannot find field '$defs'"),
    ({"response_format": schema_format({"type": "integer", "minimum": 5, "maximum": 1})},
     "response_format", "minimum greater than maximum"),
    ({"response_format": schema_format({"type": "frog"})}, "response_format", 'Unsupported type "frog"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "needs"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_object or json_schema"),
    ({"extra_body": {"guided_regex": "(ab"}}, "guided_regex", "the regex cannot be compiled"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs", "non-empty list"),
    ({"extra_body": {"structured_outputs": {"yaml": "a"}}}, "structured_outputs", "unknown key 'yaml'"),
    ({"extra_body": {"guided_json": "{not json"}}, "guided_json", "not valid JSON"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex",
     "one output constraint"),
])
def test_constraints_that_cannot_compile_are_400s(server, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        chat(server, **kwargs)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param and words in error["message"], error
    assert chat(server, max_tokens=2).choices[0].finish_reason == "length"  # still serving
    wait_until(lambda: idle(server.engine), "the engine to go idle")


def test_a_mixed_batch_of_constrained_and_free_requests(server):
    schema = SCHEMAS["nested_arrays_enums"]
    free_alone = [chat(server, seed=100 + i, max_tokens=30).choices[0].message.content for i in range(4)]
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)

    async def main():
        constrained = [aclient.chat.completions.create(model="dummy_model", messages=HI, max_tokens=200, seed=i,
                                                       response_format=schema_format(schema)) for i in range(4)]
        free = [aclient.chat.completions.create(model="dummy_model", messages=HI, max_tokens=30, seed=100 + i)
                for i in range(4)]
        return await asyncio.gather(*constrained, *free)

    answers = asyncio.run(main())
    for r in answers[:4]:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # Seeded requests draw the same tokens whatever else is in the batch: the mask touched only its rows.
    assert [r.choices[0].message.content for r in answers[4:]] == free_alone
    wait_until(lambda: idle(server.engine), "the engine to go idle")


def test_preempted_constrained_requests_stay_valid():
    # 12 blocks of 16 tokens hold few of these requests at once: some are preempted and recomputed,
    # and their matchers must not be advanced twice over the recomputed tokens.
    engine = Engine(tiny_engine_config(num_kv_blocks=12, max_num_batched_tokens=64))
    schema = SCHEMAS["nested_arrays_enums"]
    spec = StructuredOutput.from_json_schema(schema, "test")
    prompt = engine.tokenize_prompt("Describe a person as JSON, " * 2)
    ids = [engine.add_request({"prompt_token_ids": prompt}, SamplingParams(max_tokens=120, seed=i,
                                                                           structured_output=spec))
           for i in range(6)]
    results = engine.run_to_completion(ids)
    assert engine.num_preemptions > 0
    for rid in ids:
        assert results[rid].finish_reason == "stop", results[rid].text
        jsonschema.validate(json.loads(results[rid].text), schema)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_grammars_are_cached_by_constraint():
    engine = Engine(tiny_engine_config())
    a = engine.grammars.compile(StructuredOutput.from_json_schema(SCHEMAS["flat_required"], "x"))
    b = engine.grammars.compile(StructuredOutput.from_json_schema(json.dumps(SCHEMAS["flat_required"]), "y"))
    c = engine.grammars.compile(StructuredOutput(regex="a+"))
    assert a is b and c is not a
    engine.grammars.cache_size = 2
    engine.grammars.compile(StructuredOutput(choice=("x", "y")))  # evicts the least recently used: a
    assert engine.grammars.compile(StructuredOutput(regex="a+")) is c
    assert engine.grammars.compile(StructuredOutput.from_json_schema(SCHEMAS["flat_required"], "x")) is not a


# -- logit_bias -----------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["chat", "completions"])
def test_logit_bias_bans_and_forces_tokens(server, route):
    tokenizer = server.engine.tokenizer

    def greedy_ids(**kwargs) -> list[int]:
        body = {"model": "dummy_model", "max_tokens": 3, "temperature": 0, **kwargs}
        if route == "chat":
            r = server.client.chat.completions.create(messages=HI, **body)
            text = r.choices[0].message.content
        else:
            text = server.client.completions.create(prompt="Hello", **body).choices[0].text
        return tokenizer.encode(text, add_special_tokens=False)

    plain = greedy_ids()
    banned = greedy_ids(logit_bias={str(plain[0]): -100})
    assert banned[0] != plain[0] and plain[0] not in banned
    forced_id = tokenizer.encode(" the", add_special_tokens=False)[0]
    assert greedy_ids(logit_bias={str(forced_id): 100})[:3] == [forced_id] * 3


@pytest.mark.parametrize("bias, words", [
    ({"1000": 5}, "token id 1000 is out of range"),
    ({"-3": 5}, "token ids (integers >= 0)"),
    ({"abc": 5}, "integers as strings"),
    ({"5": 101}, "in [-100, 100]"),
    ({"5": -100.5}, "in [-100, 100]"),
])
def test_bad_logit_bias_is_a_400(server, bias, words):
    for call in (lambda: server.client.chat.completions.create(model="dummy_model", messages=HI, max_tokens=2,
                                                               logit_bias=bias),
                 lambda: server.client.completions.create(model="dummy_model", prompt="Hi", max_tokens=2,
                                                          logit_bias=bias)):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == "logit_bias" and words in info.value.body["message"], info.value.body


def test_logits_wider_than_the_tokenizer(tmp_path):
    # Qwen2.5-style padding: 1,024 logits for a 1,000-token tokenizer. The padding rows are never
    # allowed by a constraint, and logit_bias may still name them (they are the model's ids).
    model_dir = write_hf_model_dir(tmp_path / "padded", "qwen2", vocab_size=1024)
    engine = Engine(tiny_engine_config(model=str(model_dir)))
    assert engine.loaded.config.vocab_size == 1024 and len(engine.tokenizer) == 1000
    schema = SCHEMAS["nested_arrays_enums"]
    spec = StructuredOutput.from_json_schema(schema, "test")
    ids = [engine.add_request("JSON:", SamplingParams(max_tokens=200, seed=i, structured_output=spec,
                                                      logit_bias={1010: 50})) for i in range(3)]
    for result in engine.run_to_completion(ids).values():
        assert result.finish_reason == "stop" and max(result.token_ids) < 1000
        jsonschema.validate(json.loads(result.text), schema)
    free = engine.add_request("Hi", SamplingParams(max_tokens=3, temperature=0, logit_bias={1010: 100}))
    assert engine.run_to_completion([free])[free].token_ids == [1010] * 3

"""The OpenAI protocol layer without a server: every rejected request names its field, accepted requests map to
exact SamplingParams, response builders match the `openai` package's types, and the OpenAPI document is valid."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from ferrum_runtime import openai_protocol as proto
from ferrum_runtime.openai_protocol import APIError, parse_chat_request, parse_completion_request
from ferrum_runtime.sampler import PromptLogprob, SampleResult, SamplingParams

pytestmark = pytest.mark.unit

V, L = 100, 64  # vocab_size, max_model_len of the imaginary served model
USER = {"role": "user", "content": "hi"}


def chat(**fields) -> dict:
    return {"model": "m", "messages": [USER], **fields}


def comp(**fields) -> dict:
    return {"model": "m", "prompt": "hi", **fields}


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def parse(body):
    is_chat = isinstance(body, dict) and "messages" in body or body == {"model": "m"}
    return (parse_chat_request if is_chat else parse_completion_request)(body, vocab_size=V, max_model_len=L)


def msgs(*extra: dict) -> dict:
    return chat(messages=[USER, *extra])


BAD = [
    # (id, body, param, code); every one is a 400 invalid_request_error
    ("body-array", [1], None, "invalid_type"),
    ("body-string", "hi", None, "invalid_type"),
    ("model-missing", {"messages": [USER]}, "model", "missing_required_parameter"),
    ("model-null", chat(model=None), "model", "missing_required_parameter"),
    ("model-int", chat(model=3), "model", "invalid_type"),
    ("messages-missing", {"model": "m"}, "messages", "missing_required_parameter"),
    ("messages-empty", chat(messages=[]), "messages", "empty_array"),
    ("messages-string", chat(messages="hi"), "messages", "invalid_type"),
    ("message-not-object", chat(messages=["hi"]), "messages[0]", "invalid_type"),
    ("role-unknown", msgs({"role": "bot", "content": "x"}), "messages[1].role", "invalid_value"),
    ("role-function", msgs({"role": "function", "name": "f", "content": "x"}), "messages[1].role", "invalid_value"),
    ("role-missing", chat(messages=[{"content": "x"}]), "messages[0].role", "missing_required_parameter"),
    ("role-int", chat(messages=[{"role": 1, "content": "x"}]), "messages[0].role", "invalid_type"),
    ("content-missing", chat(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter"),
    ("content-int", chat(messages=[{"role": "system", "content": 5}]), "messages[0].content", "invalid_type"),
    ("content-empty-parts", chat(messages=[{"role": "user", "content": []}]), "messages[0].content", "empty_array"),
    ("content-image", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]),
     "messages[0].content[1].type", "unsupported_value"),
    ("content-audio", chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages[0].content[0].type", "unsupported_value"),
    ("content-part-no-text", chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     "messages[0].content[0].text", "missing_required_parameter"),
    ("content-part-string", chat(messages=[{"role": "user", "content": ["hi"]}]), "messages[0].content[0]",
     "invalid_type"),
    ("assistant-null-content", msgs({"role": "assistant", "content": None}), "messages[1].content",
     "missing_required_parameter"),
    ("tool-no-id", msgs({"role": "tool", "content": "42"}), "messages[1].tool_call_id", "missing_required_parameter"),
    ("tool-call-custom", msgs({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "custom", "custom": {"name": "f", "input": "x"}}]}),
     "messages[1].tool_calls[0].type", "unsupported_value"),
    ("tool-call-no-name", msgs({"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"arguments": "{}"}}]}),
     "messages[1].tool_calls[0].function.name", "missing_required_parameter"),
    ("tool-calls-object", msgs({"role": "assistant", "content": "x", "tool_calls": {}}), "messages[1].tool_calls",
     "invalid_type"),
    ("temperature-high", chat(temperature=2.5), "temperature", "decimal_above_max_value"),
    ("temperature-negative", chat(temperature=-0.1), "temperature", "decimal_below_min_value"),
    ("temperature-string", chat(temperature="1"), "temperature", "invalid_type"),
    ("temperature-bool", chat(temperature=True), "temperature", "invalid_type"),
    ("temperature-nan", chat(temperature=math.nan), "temperature", "invalid_value"),
    ("temperature-inf", chat(temperature=math.inf), "temperature", "invalid_value"),
    ("top_p-zero", chat(top_p=0), "top_p", "decimal_below_min_value"),
    ("top_p-high", chat(top_p=1.01), "top_p", "decimal_above_max_value"),
    ("presence-high", chat(presence_penalty=2.5), "presence_penalty", "decimal_above_max_value"),
    ("frequency-low", comp(frequency_penalty=-3), "frequency_penalty", "decimal_below_min_value"),
    ("n-zero", chat(n=0), "n", "integer_below_min_value"),
    ("n-129", comp(n=129), "n", "integer_above_max_value"),
    ("n-float", chat(n=2.0), "n", "invalid_type"),
    ("n-bool", chat(n=True), "n", "invalid_type"),
    ("seed-string", chat(seed="7"), "seed", "invalid_type"),
    ("seed-huge", comp(seed=2**64), "seed", "integer_above_max_value"),
    ("logit_bias-key", chat(logit_bias={"hello": 1}), "logit_bias", "invalid_type"),
    ("logit_bias-negative-key", chat(logit_bias={"-1": 1}), "logit_bias", "invalid_type"),
    ("logit_bias-vocab", chat(logit_bias={"100": 1}), "logit_bias", "invalid_value"),
    ("logit_bias-high", comp(logit_bias={"5": 101}), "logit_bias", "decimal_above_max_value"),
    ("logit_bias-value-type", comp(logit_bias={"5": "1"}), "logit_bias", "invalid_type"),
    ("logit_bias-array", chat(logit_bias=[]), "logit_bias", "invalid_type"),
    ("logprobs-int-on-chat", chat(logprobs=1), "logprobs", "invalid_type"),
    ("top_logprobs-without-logprobs", chat(top_logprobs=3), "top_logprobs", "invalid_value"),
    ("top_logprobs-with-logprobs-false", chat(logprobs=False, top_logprobs=0), "top_logprobs", "invalid_value"),
    ("top_logprobs-21", chat(logprobs=True, top_logprobs=21), "top_logprobs", "integer_above_max_value"),
    ("max_tokens-zero-chat", chat(max_tokens=0), "max_tokens", "integer_below_min_value"),
    ("max_completion_tokens-zero", chat(max_completion_tokens=0), "max_completion_tokens",
     "integer_below_min_value"),
    ("max_tokens-disagree", chat(max_tokens=10, max_completion_tokens=11), "max_tokens", "invalid_value"),
    ("max_tokens-context", chat(max_tokens=L), "max_tokens", "integer_above_max_value"),
    ("max_tokens-float", chat(max_tokens=10.0), "max_tokens", "invalid_type"),
    ("stop-empty", chat(stop=""), "stop", "invalid_value"),
    ("stop-five", chat(stop=list("abcde")), "stop", "array_above_max_length"),
    ("stop-empty-item", comp(stop=["a", ""]), "stop[1]", "invalid_value"),
    ("stop-int-item", comp(stop=["a", 3]), "stop[1]", "invalid_type"),
    ("stop-int", chat(stop=5), "stop", "invalid_type"),
    ("stream-string", chat(stream="yes"), "stream", "invalid_type"),
    ("stream_options-no-stream", chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    ("stream_options-stream-false", comp(stream=False, stream_options={}), "stream_options", "invalid_value"),
    ("stream_options-type", chat(stream=True, stream_options=[]), "stream_options", "invalid_type"),
    ("include_usage-type", chat(stream=True, stream_options={"include_usage": "yes"}),
     "stream_options.include_usage", "invalid_type"),
    ("tools-type", chat(tools={"type": "function"}), "tools", "invalid_type"),
    ("tool-kind", chat(tools=[{"type": "retrieval"}]), "tools[0].type", "unsupported_value"),
    ("tool-no-name", chat(tools=[{"type": "function", "function": {}}]), "tools[0].function.name",
     "missing_required_parameter"),
    ("tool-bad-name", chat(tools=[TOOL, {"type": "function", "function": {"name": "a b"}}]), "tools[1].function.name",
     "invalid_value"),
    ("tool-params-not-schema", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]),
     "tools[0].function.parameters", "invalid_value"),
    ("tool-params-unenforceable", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}]),
     "tools[0].function.parameters", "invalid_value"),
    ("tools-duplicate", chat(tools=[TOOL, TOOL]), "tools", "invalid_value"),
    ("tool_choice-without-tools", chat(tool_choice="auto"), "tool_choice", "invalid_value"),
    ("tool_choice-unknown", chat(tools=[TOOL], tool_choice="always"), "tool_choice", "invalid_value"),
    ("tool_choice-undeclared", chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
     "tool_choice.function.name", "invalid_value"),
    ("tool_choice-type", chat(tools=[TOOL], tool_choice={"type": "custom", "function": {"name": "get_weather"}}),
     "tool_choice.type", "unsupported_value"),
    ("functions", chat(functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
    ("function_call", chat(function_call={"name": "f"}), "function_call", "unsupported_parameter"),
    ("parallel_tool_calls-type", chat(parallel_tool_calls="yes"), "parallel_tool_calls", "invalid_type"),
    ("response_format-kind", chat(response_format={"type": "xml"}), "response_format.type", "unsupported_value"),
    ("response_format-schema-missing", chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema.schema", "missing_required_parameter"),
    ("response_format-schema-invalid", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": "a"}}}), "response_format.json_schema.schema",
     "invalid_value"),
    ("response_format-schema-unenforceable", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}), "response_format.json_schema.schema",
     "invalid_value"),
    ("grammar-and-regex", chat(grammar="root ::= \"a\"", regex="a+"), "regex", "invalid_value"),
    ("schema-and-tools", chat(tools=[TOOL], response_format={"type": "json_object"}), "response_format",
     "invalid_value"),
    ("regex-empty", comp(regex=" "), "regex", "invalid_value"),
    ("response_format-no-type", chat(response_format={}), "response_format.type", "missing_required_parameter"),
    ("response_format-string", chat(response_format="text"), "response_format", "invalid_type"),
    ("audio", chat(audio={"voice": "alloy", "format": "wav"}), "audio", "unsupported_parameter"),
    ("modalities", chat(modalities=["text", "audio"]), "modalities", "unsupported_value"),
    ("prediction", chat(prediction={"type": "content", "content": "x"}), "prediction", "unsupported_parameter"),
    ("web_search_options", chat(web_search_options={}), "web_search_options", "unsupported_parameter"),
    ("reasoning_effort", chat(reasoning_effort="low"), "reasoning_effort", "unsupported_parameter"),
    ("service_tier-flex", chat(service_tier="flex"), "service_tier", "unsupported_value"),
    ("service_tier-int", chat(service_tier=1), "service_tier", "invalid_type"),
    ("store-true", chat(store=True), "store", "unsupported_value"),
    ("metadata-string", chat(metadata="x"), "metadata", "invalid_type"),
    ("user-int", chat(user=5), "user", "invalid_type"),
    ("prompt_logprobs", chat(prompt_logprobs=1), "prompt_logprobs", "unsupported_parameter"),
    ("top_k-low", chat(top_k=-2), "top_k", "integer_below_min_value"),
    ("top_k-float", comp(top_k=1.5), "top_k", "invalid_type"),
    ("min_p-high", chat(min_p=1.5), "min_p", "decimal_above_max_value"),
    ("repetition_penalty-zero", chat(repetition_penalty=0), "repetition_penalty", "decimal_below_min_value"),
    ("ignore_eos-string", comp(ignore_eos="no"), "ignore_eos", "invalid_type"),
    ("stop_token_ids-vocab", chat(stop_token_ids=[1, V]), "stop_token_ids", "invalid_value"),
    ("stop_token_ids-string", chat(stop_token_ids="1"), "stop_token_ids", "invalid_type"),
    ("chat_template_kwargs-array", chat(chat_template_kwargs=[]), "chat_template_kwargs", "invalid_type"),
    ("chat_template_kwargs-reserved", chat(chat_template_kwargs={"messages": []}), "chat_template_kwargs.messages",
     "invalid_value"),
    ("content-surrogate", chat(messages=[{"role": "user", "content": "a\ud800b"}]), "messages[0].content",
     "invalid_value"),
    ("text-part-surrogate", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]),
     "messages[0].content[0].text", "invalid_value"),
    ("stop-surrogate", chat(stop=["ok", "\ud800"]), "stop[1]", "invalid_value"),
    ("template-kwargs-surrogate", chat(chat_template_kwargs={"x": ["\ud800"]}), "chat_template_kwargs",
     "invalid_value"),
    ("logit_bias-huge-key", chat(logit_bias={"9" * 5000: 1}), "logit_bias", "invalid_value"),
    ("add_generation_prompt-int", chat(add_generation_prompt=1), "add_generation_prompt", "invalid_type"),
    # completions
    ("prompt-missing", {"model": "m"} | {"max_tokens": 3}, "prompt", "missing_required_parameter"),
    ("prompt-surrogate", comp(prompt=["fine", "\ud800"]), "prompt[1]", "invalid_value"),
    ("model-surrogate", comp(model="\ud800"), "model", "invalid_value"),
    ("prompt-empty-array", comp(prompt=[]), "prompt", "empty_array"),
    ("prompt-int", comp(prompt=5), "prompt", "invalid_type"),
    ("prompt-mixed", comp(prompt=[1, "a"]), "prompt", "invalid_type"),
    ("prompt-token-vocab", comp(prompt=[1, V]), "prompt", "invalid_value"),
    ("prompt-token-negative", comp(prompt=[-1]), "prompt", "invalid_value"),
    ("prompt-token-bool", comp(prompt=[1, True]), "prompt", "invalid_type"),
    ("prompt-token-float", comp(prompt=[1.0]), "prompt", "invalid_type"),
    ("prompt-empty-token-list", comp(prompt=[[1], []]), "prompt", "empty_array"),
    ("prompt-nested-vocab", comp(prompt=[[1], [2, 300]]), "prompt", "invalid_value"),
    ("max_tokens-negative", comp(max_tokens=-1), "max_tokens", "integer_below_min_value"),
    ("max_tokens-context-comp", comp(max_tokens=L), "max_tokens", "integer_above_max_value"),
    ("logprobs-6", comp(logprobs=6), "logprobs", "integer_above_max_value"),
    ("logprobs-bool", comp(logprobs=True), "logprobs", "invalid_type"),
    ("echo-string", comp(echo="true"), "echo", "invalid_type"),
    ("suffix", comp(suffix="tail"), "suffix", "unsupported_parameter"),
    ("suffix-int", comp(suffix=1), "suffix", "invalid_type"),
    ("best_of-not-n", comp(best_of=2), "best_of", "unsupported_value"),
    ("best_of-zero", comp(best_of=0), "best_of", "integer_below_min_value"),
    ("temperature-completions", comp(temperature=3), "temperature", "decimal_above_max_value"),
    ("prompt_logprobs-completions", comp(prompt_logprobs=0), "prompt_logprobs", "unsupported_parameter"),
]


def test_the_bad_table_is_big_and_unique():
    assert len(BAD) >= 45
    assert len({case[0] for case in BAD}) == len(BAD)


@pytest.mark.parametrize("body,param,code", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_request(body, param, code):
    with pytest.raises(APIError) as info:
        parse(body)
    e = info.value
    assert (e.status, e.type, e.param, e.code) == (400, "invalid_request_error", param, code), e.message
    if param is not None:  # the message names the field, so a one-line log is enough to fix the request
        assert param.split("[")[0].split(".")[0] in e.message
    assert e.to_dict() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param,
                                     "code": code}}
    json.dumps(e.to_dict(), ensure_ascii=False).encode("utf-8")  # sendable, whatever the request held


# -- accepted requests ---------------------------------------------------------------------------------------------

def test_chat_defaults():
    req = parse(chat())
    assert req.params == SamplingParams(max_tokens=L - 1)
    assert (req.model, req.stream, req.include_usage, req.logprobs, req.top_logprobs) == ("m", False, False, False, 0)
    assert (req.max_tokens, req.chat_template_kwargs, req.add_generation_prompt) == (None, {}, True)
    assert req.messages == [{"role": "user", "content": "hi"}]


def test_nulls_mean_not_given():
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stop", "seed", "logit_bias", "logprobs", "top_logprobs",
                           "max_tokens", "max_completion_tokens", "stream", "stream_options", "presence_penalty",
                           "frequency_penalty", "tools", "tool_choice", "response_format", "user", "top_k", "min_p",
                           "repetition_penalty", "stop_token_ids", "chat_template_kwargs", "service_tier", "store"])
    assert parse(chat(**nulls)) == parse(chat())
    assert parse(comp(**nulls, echo=None, suffix=None, best_of=None)) == parse(comp())


def test_chat_maps_every_field():
    req = parse(chat(temperature=0.5, top_p=0.9, presence_penalty=0.5, frequency_penalty=-0.5,
                     logit_bias={"5": 10, "3": -100}, seed=7, stop=["x", "y"], n=3, top_k=40, min_p=0.05,
                     repetition_penalty=1.1, ignore_eos=True, stop_token_ids=[1, 2], logprobs=True, top_logprobs=5,
                     max_completion_tokens=20, stream=True, stream_options={"include_usage": True},
                     chat_template_kwargs={"enable_thinking": False}, add_generation_prompt=False))
    assert req.params == SamplingParams(
        max_tokens=20, temperature=0.5, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.5, logit_bias=((3, -100.0), (5, 10.0)), seed=7, stop=("x", "y"),
        stop_token_ids=(1, 2), ignore_eos=True, logprobs=5, prompt_logprobs=None, n=3)
    assert (req.stream, req.include_usage, req.logprobs, req.top_logprobs, req.max_tokens) == (True, True, True, 5, 20)
    assert (req.chat_template_kwargs, req.add_generation_prompt) == ({"enable_thinking": False}, False)


def test_chat_numbers_and_limits():
    assert parse(chat(temperature=1)).params.temperature == 1.0  # an int where a number is expected
    assert isinstance(parse(chat(temperature=2)).params.temperature, float)
    assert parse(chat(top_p=1, temperature=0, presence_penalty=-2, frequency_penalty=2)).params.greedy
    assert parse(chat(logprobs=True)).params.logprobs == 0  # the chosen token only
    assert parse(chat(logprobs=True, top_logprobs=20)).params.logprobs == 20
    assert parse(chat(max_tokens=7)).params.max_tokens == 7
    assert parse(chat(max_tokens=9, max_completion_tokens=9)).max_tokens == 9
    assert parse(chat(max_completion_tokens=L - 1)).params.max_tokens == L - 1
    assert parse(chat(stop="END")).params.stop == ("END",)
    assert parse(chat(n=128, seed=-1)).params.n == 128
    assert parse(chat(seed=2**64 - 1)).params.seed == 2**64 - 1


def test_accepted_but_ignored_or_harmless_values():
    body = chat(tools=[], tool_choice="none", functions=[], parallel_tool_calls=True,
                response_format={"type": "text"}, modalities=["text"], service_tier="auto", store=False,
                metadata={"k": "v"}, user="u1", safety_identifier="s", prompt_cache_key="p",
                stream=True, stream_options={"include_usage": False, "continuous_usage_stats": True},
                some_vendor_field=[1, 2])  # unknown fields: ignored
    req = parse(body)
    assert req.params == SamplingParams(max_tokens=L - 1)
    assert parse(chat(service_tier="default")).params == req.params


def test_messages_are_normalised():
    req = parse(chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q", "name": "ann", "unknown_key": 1},
        {"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}},
            {"id": "c2", "type": "function", "function": {"name": "raw", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "2"}]},
        {"role": "assistant", "content": "done"},
    ]))
    assert req.messages == [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}},
            {"id": "c2", "type": "function", "function": {"name": "raw", "arguments": "not json"}}]},
        {"role": "tool", "content": "2", "tool_call_id": "c1"},
        {"role": "assistant", "content": "done"},
    ]


def test_completion_defaults_and_every_field():
    assert parse(comp()).params == SamplingParams(max_tokens=16)
    req = parse(comp(prompt=["a", "b"], temperature=0.7, top_p=0.5, presence_penalty=1, frequency_penalty=1.5,
                     logit_bias={"9": 5.5}, seed=3, stop="\n", n=2, best_of=2, top_k=5, min_p=0.1,
                     repetition_penalty=1.3, ignore_eos=True, stop_token_ids=[0], logprobs=2, echo=True, max_tokens=0,
                     stream=True, stream_options={"include_usage": True}, user="u", suffix=""))
    assert req.params == SamplingParams(
        max_tokens=0, temperature=0.7, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.3, presence_penalty=1.0,
        frequency_penalty=1.5, logit_bias=((9, 5.5),), seed=3, stop=("\n",), stop_token_ids=(0,), ignore_eos=True,
        logprobs=2, prompt_logprobs=2, n=2)
    assert (req.prompts, req.echo, req.logprobs, req.stream, req.include_usage) == (["a", "b"], True, 2, True, True)
    assert req.max_tokens == 0 and req.params_for(L).max_tokens == 0
    assert parse(comp(logprobs=0)).params.prompt_logprobs is None  # prompt scoring only with echo
    assert parse(comp(echo=True)).params.prompt_logprobs is None  # echo alone: text only


@pytest.mark.parametrize("prompt,expected", [
    ("text", ["text"]), (["a", "b", ""], ["a", "b", ""]), ([1, 2, V - 1], [[1, 2, V - 1]]),
    ([[0], [5, 6]], [[0], [5, 6]]), ([0], [[0]])])
def test_completion_prompt_forms(prompt, expected):
    assert parse(comp(prompt=prompt)).prompts == expected


def test_requests_are_frozen():
    req = parse(comp())
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.echo = True  # type: ignore[misc]


# -- max_tokens against the prompt's length ------------------------------------------------------------------------

def test_chat_default_max_tokens_is_what_the_context_leaves():
    req = parse(chat())
    assert req.params_for(10).max_tokens == L - 10
    assert req.params_for(L - 1).max_tokens == 1
    with pytest.raises(APIError) as info:
        req.params_for(L)
    assert (info.value.status, info.value.param, info.value.code) == (400, "messages", "context_length_exceeded")


def test_explicit_max_tokens_must_fit_the_prompt():
    req = parse(chat(max_tokens=10))
    assert req.params_for(L - 10).max_tokens == 10
    with pytest.raises(APIError) as info:
        req.params_for(L - 9)
    assert (info.value.param, info.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(APIError) as info:
        parse(comp(max_tokens=5)).params_for(L + 5)
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")
    assert parse(comp(max_tokens=0, echo=True)).params_for(L).max_tokens == 0  # scoring a full-context prompt


def test_completion_default_max_tokens_is_16_or_what_the_context_leaves():
    req = parse(comp())
    assert req.max_tokens is None and req.params.max_tokens == 16
    assert req.params_for(10).max_tokens == 16
    assert req.params_for(L - 3).max_tokens == 3  # a default never fails for lack of room
    with pytest.raises(APIError) as info:
        req.params_for(L)
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")
    small = parse_completion_request(comp(), vocab_size=V, max_model_len=8)
    assert small.params.max_tokens == 7 and small.params_for(2).max_tokens == 6


# -- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,type_", [(400, "invalid_request_error"), (401, "authentication_error"),
                                          (404, "not_found_error"), (413, "invalid_request_error"),
                                          (429, "rate_limit_exceeded"), (500, "server_error"), (503, "server_error")])
def test_error_type_defaults_by_status(status, type_):
    e = APIError(status, "why")
    assert (e.type, e.param, e.code, str(e)) == (type_, None, None, "why")
    assert APIError(status, "why", type="custom", code="c").to_dict()["error"]["type"] == "custom"


def test_error_body_parses_as_openai_error_object():
    from openai.types import ErrorObject

    err = APIError(404, "no model x", param="model", code="model_not_found").to_dict()["error"]
    assert ErrorObject.model_validate(err).model_dump(exclude_none=True) == {
        "message": "no model x", "type": "not_found_error", "param": "model", "code": "model_not_found"}


# -- response builders against the openai package's types ----------------------------------------------------------

def text_of(t: int) -> str:
    return {0: "é", 1: " world", 2: "!", 3: "Hello"}.get(t, f"<{t}>")


SAMPLED = [SampleResult(3, -0.25, [(3, -0.25), (1, -2.0)]), SampleResult(1, -float("inf"), [(3, -0.1), (0, -3.0)])]


def test_chat_completion_matches_openai_types():
    from openai.types.chat import ChatCompletion

    lp = proto.chat_logprobs(SAMPLED, text_of)
    choices = [proto.chat_choice(0, "Hello world", "stop", lp), proto.chat_choice(1, "Hi", "length")]
    body = proto.chat_completion("chatcmpl-1", 1700000000, "m", choices, proto.usage_dict(5, 3))
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "Hello world"
    assert parsed.usage is not None and parsed.usage.total_tokens == 8
    first = body["choices"][0]["logprobs"]["content"]
    assert first[0] == {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello"), "top_logprobs": [
        {"token": "Hello", "logprob": -0.25, "bytes": list(b"Hello")},
        {"token": " world", "logprob": -2.0, "bytes": list(b" world")}]}
    assert first[1]["logprob"] == proto.LOGPROB_FLOOR  # -inf is not JSON
    assert first[1]["top_logprobs"][1]["bytes"] == [0xC3, 0xA9]
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert set(body["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}


def test_chat_logprobs_take_raw_token_bytes():
    lp = proto.chat_logprobs([SampleResult(7, -1.0, [])], lambda t: "\ufffd", token_bytes=lambda t: b"\xe2\x82")
    assert lp["content"][0]["bytes"] == [0xE2, 0x82] and lp["content"][0]["top_logprobs"] == []


def test_chat_chunks_match_openai_types():
    from openai.types.chat import ChatCompletionChunk

    chunks = [proto.chat_chunk("c", 1, "m", 0, {"role": "assistant", "content": ""}, None),
              proto.chat_chunk("c", 1, "m", 0, {"content": "Hello"}, None, proto.chat_logprobs(SAMPLED[:1], text_of)),
              proto.chat_chunk("c", 1, "m", 0, {}, "length")]
    for c in chunks:
        parsed = ChatCompletionChunk.model_validate(c)
        assert parsed.object == "chat.completion.chunk" and len(parsed.choices) == 1
    assert ChatCompletionChunk.model_validate(chunks[1]).choices[0].delta.content == "Hello"
    usage = ChatCompletionChunk.model_validate(proto.chat_usage_chunk("c", 1, "m", proto.usage_dict(4, 2)))
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 2


def test_engine_finish_reasons_must_be_mapped_first():
    with pytest.raises(AssertionError, match="abort"):
        proto.chat_chunk("c", 1, "m", 0, {}, "abort")


def test_completion_matches_openai_types():
    from openai.types import Completion

    lp = proto.completion_logprobs(SAMPLED, text_of)
    body = proto.completion("cmpl-1", 1, "m", [proto.completion_choice(0, "Hello world", "length", lp)],
                            proto.usage_dict(2, 2))
    parsed = Completion.model_validate(body)
    assert parsed.choices[0].text == "Hello world"
    assert lp == {"tokens": ["Hello", " world"], "token_logprobs": [-0.25, proto.LOGPROB_FLOOR],
                  "top_logprobs": [{"Hello": -0.25, " world": -2.0}, {"Hello": -0.1, "é": -3.0,
                                                                      " world": proto.LOGPROB_FLOOR}],
                  "text_offset": [0, 5]}
    done = proto.completion_chunk("cmpl-1", 1, "m", 3, "!", "stop", lp)
    assert Completion.model_validate(done).choices[0].index == 3
    # mid-stream chunks carry finish_reason null, which OpenAI sends but the SDK's (unvalidated) type omits
    running = proto.completion_chunk("cmpl-1", 1, "m", 3, "!", None, lp)
    assert running["choices"][0]["finish_reason"] is None and {**running["choices"][0], "finish_reason": "stop"} \
        == done["choices"][0]
    usage = Completion.model_validate(proto.completion_usage_chunk("cmpl-1", 1, "m", proto.usage_dict(1, 1)))
    assert usage.choices == []


def test_completion_logprobs_with_echo():
    from openai.types import Completion

    prompt = [3, 1]  # "Hello", " world"
    prompt_lps = [None, PromptLogprob(1, -1.5, [(2, -0.5)])]
    lp = proto.completion_logprobs([SampleResult(2, -0.5, [(2, -0.5)])], text_of, echo_prompt=prompt,
                                   prompt_logprobs=prompt_lps)
    assert lp == {"tokens": ["Hello", " world", "!"], "token_logprobs": [None, -1.5, -0.5],
                  "top_logprobs": [None, {"!": -0.5, " world": -1.5}, {"!": -0.5}], "text_offset": [0, 5, 11]}
    # OpenAI sends null for the first prompt token; the SDK's type says float, so validate the rest
    rest = {k: v[1:] for k, v in lp.items()}
    Completion.model_validate(proto.completion("c", 1, "m", [proto.completion_choice(0, "Hello world!", "stop", rest)],
                                               proto.usage_dict(2, 1)))
    offset = proto.completion_logprobs([SampleResult(2, -0.5, [])], text_of, text_offset=11)
    assert offset["text_offset"] == [11] and offset["top_logprobs"] == [{"!": -0.5}]


def test_models_list_shape():
    from openai.types import Model

    body = proto.model_list([proto.model_card("m", 1700000000, 4096)])
    assert body["object"] == "list" and Model.model_validate(body["data"][0]).id == "m"
    assert body["data"][0]["max_model_len"] == 4096


# -- OpenAPI ---------------------------------------------------------------------------------------------------------

ENDPOINTS = {("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"), ("/health", "get"),
             ("/metrics", "get"), ("/tokenize", "post"), ("/detokenize", "post")}


@pytest.mark.parametrize("kwargs", [{}, {"vocab_size": V, "max_model_len": L, "models": ["m"]},
                                    {"vocab_size": 10, "max_model_len": 8}])
def test_openapi_document(kwargs):
    doc = proto.openapi_document(**kwargs)
    assert doc["openapi"].startswith("3.0")
    assert {(p, m) for p, ops in doc["paths"].items() for m in ops} == ENDPOINTS
    schemas = doc["components"]["schemas"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        op = doc["paths"][path]["post"]
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(op["responses"])
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    assert schemas["CompletionRequest"]["required"] == ["model", "prompt"]
    chat_props = schemas["ChatCompletionRequest"]["properties"]
    assert (chat_props["temperature"]["minimum"], chat_props["temperature"]["maximum"]) == (0, 2)
    assert chat_props["top_p"]["exclusiveMinimum"] is True
    assert chat_props["n"]["maximum"] == proto.MAX_N
    for s in (429, 503):
        assert "Retry-After" in doc["components"]["responses"][f"E{s}"]["headers"]
    if kwargs:
        assert chat_props["max_tokens"]["maximum"] == kwargs["max_model_len"] - 1
    if "models" in kwargs:
        assert chat_props["model"]["enum"] == ["m"]
    _check_refs(doc, doc)
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return  # the structural checks above stand
    validate(doc)


def _check_refs(node, doc) -> None:
    """Every $ref resolves; every `nullable` sits beside a `type` (OpenAPI 3.0 ignores it otherwise)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = doc
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
        if node.get("nullable"):
            assert "type" in node, node
        for v in node.values():
            _check_refs(v, doc)
    elif isinstance(node, list):
        for v in node:
            _check_refs(v, doc)


def test_docs_list_every_request_field():
    """docs/openai-api.md has a row for every field the OpenAPI document declares (and the parser reads)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "openai-api.md").read_text()
    schemas = proto.openapi_document()["components"]["schemas"]
    for section, schema in (("/v1/chat/completions", "ChatCompletionRequest"),
                            ("/v1/completions", "CompletionRequest")):
        body = text.split(f"## `POST {section}`")[1].split("\n## ")[0]
        documented = set(re.findall(r"^\| `([a-z_]+)`", body, flags=re.M))
        assert set(schemas[schema]["properties"]) <= documented, set(schemas[schema]["properties"]) - documented


def test_tools_and_structured_output_fields():
    from ferrum_runtime.structured import Constraint

    req = parse(chat(tools=[TOOL], parallel_tool_calls=False))
    assert req.tools == [TOOL] and req.tool_choice == "auto" and req.parallel_tool_calls is False
    req = parse(chat(tools=[{"type": "function", "function": {"name": "noop"}}], tool_choice="required"))
    assert req.tools[0]["function"]["parameters"] == {"type": "object", "properties": {}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert parse(chat(tools=[TOOL], tool_choice=named)).tool_choice == named
    assert parse(chat(tools=[TOOL], tool_choice="none")).tool_choice == "none"
    assert parse(chat(response_format={"type": "json_object"})).constraint == Constraint("json_object", "",
                                                                                          "response_format")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    got = parse(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                            "strict": True}})).constraint
    assert got.kind == "json_schema" and json.loads(got.spec) == schema
    assert parse(comp(grammar='root ::= "yes" | "no"')).constraint.kind == "grammar"
    assert parse(chat(regex="[0-9]+")).constraint == Constraint("regex", "[0-9]+", "regex")
    assert parse(chat(guided_json=json.dumps(schema))).constraint.param == "guided_json"
    assert parse(chat(guided_choice=["a.b", "c"])).constraint.spec == "a\\.b|c"

"""Structured output, tool calls and reasoning through the server, with the official `openai` client: the
real SmolLM2 GGUF (whose template knows no tools: the generic ``<tool_call>`` format, announced in a system
message) and a tiny Qwen3 with the real Qwen3 chat template whose weights follow a fixed token chain
(``<think> Let </think> \\n\\n Paris``), so the reasoning split is deterministic."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field

from .test_server import post, running_server

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 15},
                                                       "maxItems": 3}},
          "required": ["name", "age", "hobbies"], "additionalProperties": False}


def _served(artifact):
    """(base URL, openai client) of a server on ``artifact``, for a module-scoped fixture."""
    import openai

    with running_server(artifact) as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def smol(smollm2_artifact):
    yield from _served(smollm2_artifact)


ASK = [{"role": "user", "content": "Describe a person called Ana who likes chess."}]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answer_validates(smol, stream):
    _base, client = smol
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=ASK, response_format=fmt, stream=True, max_tokens=200, temperature=0.7, seed=1)
            if c.choices)
    else:
        r = client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=200,
                                           temperature=0.7, seed=1)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_parse_with_pydantic(smol):
    _base, client = smol

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    r = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Person, max_tokens=100)
    assert isinstance(r.choices[0].message.parsed, Person)
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                       max_tokens=150, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_required_tool_call_streams_like_the_whole_answer(smol):
    """tool_choice "required": a valid call is guaranteed; the client's stream accumulation rebuilds the
    same call as the non-streamed answer (greedy, so both runs decode the same tokens)."""
    base, client = smol
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = {"model": "tiny", "messages": ask, "tools": [WEATHER, TIME], "tool_choice": "required", "max_tokens": 120, "temperature": 0}
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    with client.chat.completions.stream(**kw) as s:
        final = s.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert final.choices[0].finish_reason == "tool_calls"
    # the raw stream: index, id, type and name first, then the arguments
    events = [json.loads(line[6:]) for line in post(base, "/v1/chat/completions", {**kw, "stream": True}, key=None)
              .text.splitlines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"] and e["choices"][0]["delta"].get("tool_calls")]
    first, second = deltas[0]["tool_calls"][0], deltas[1]["tool_calls"][0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["function"]["arguments"] == ""
    assert second["index"] == 0 and "id" not in second and second["function"]["arguments"]


def test_named_tool_choice_and_tool_results_round_trip(smol):
    _base, client = smol
    ask = [{"role": "user", "content": "What time is it in Lima?"}]
    # greedy: TIME allows extra properties, and an unseeded draw once wandered past 80 tokens inside the
    # call, leaving no complete call to return
    r = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER, TIME], max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and "city" in json.loads(call.function.arguments)
    history = ask + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "10:42"}]
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                        max_tokens=20, temperature=0)
    assert r2.choices[0].message.tool_calls is None and r2.choices[0].message.content


@pytest.mark.parametrize("body,param", [
    ({"regex": "(unclosed"}, "regex"),
    ({"grammar": "root ::= nothing_defined"}, "grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "required": "x"}}}]},
     "tools[0].function.parameters"),
])
def test_bad_constraints_are_400_naming_the_field(smol, body, param):
    base, _ = smol
    r = post(base, "/v1/chat/completions", {"model": "tiny", "messages": ASK, **body}, key=None)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert post(base, "/v1/chat/completions", {"model": "tiny", "messages": ASK, "max_tokens": 2},
                key=None).status_code == 200  # the server is fine


def test_completions_take_a_grammar(smol):
    _base, client = smol
    r = client.completions.create(model="tiny", prompt="Is the sky blue? Answer:", max_tokens=10,
                                  extra_body={"grammar": 'root ::= " yes" | " no"'})
    assert r.choices[0].text in (" yes", " no") and r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- reasoning

THINK_CHAIN = ["<think>", "Let", "</think>", "\n\n", "Paris", "<|im_end|>"]


@pytest.fixture(scope="module")
def thinker(tmp_path_factory, compiled):
    """A tiny Qwen3 whose layers add nothing (o_proj, down_proj = 0) so each next token depends only on the
    current one; lm_head rows make greedy decoding follow THINK_CHAIN from the prompt's last token, and
    prefer '{' then '}' after </think> when '\\n\\n' is masked out."""
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer

    from ferrum_compiler.frontend import open_source

    dest = tmp_path_factory.mktemp("hf") / "thinker"
    dest.mkdir()
    open_source("smollm2").write_tokenizer(dest)
    tok = Tokenizer.from_file(str(dest / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in
                    ("<think>", "</think>", "<tool_call>", "</tool_call>")])
    tok.save(str(dest / "tokenizer.json"))
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config["chat_template"] = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
    (dest / "tokenizer_config.json").write_text(json.dumps(config))

    def tid(text: str) -> int:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert len(ids) == 1, (text, ids)
        return ids[0]

    chain = [tid("\n")] + [tid(t) for t in THINK_CHAIN]
    torch.manual_seed(5)
    cfg = transformers.Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False, max_position_embeddings=512)
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        special = sorted(set(chain + [tid("{"), tid("}")]))
        basis = torch.linalg.qr(torch.randn(64, len(special)))[0].T * 8.0  # orthogonal rows, RMS 1
        for i, t in enumerate(special):
            model.model.embed_tokens.weight[t] = basis[i]
        head = model.lm_head.weight
        head.mul_(0.01)

        def follow(a: int, b: int, strength: float) -> None:
            h = model.model.embed_tokens.weight[a]
            head[b] += strength * h / h.dot(h)

        for a, b in itertools.pairwise(chain):
            follow(a, b, 20.0)
        follow(tid("</think>"), tid("{"), 10.0)  # the best token once "\n\n" is masked by a JSON constraint
        follow(tid("{"), tid("}"), 20.0)
        follow(tid("}"), tid("<|im_end|>"), 20.0)
    model.save_pretrained(dest)
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": tid("<|im_end|>")}))
    return compiled(dest)


@pytest.fixture(scope="module")
def think_client(thinker):
    yield from _served(thinker)


Q = [{"role": "user", "content": "Capital of France?"}]


def test_reasoning_goes_to_reasoning_content(think_client):
    _base, client = think_client
    r = client.chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "Let"
    assert msg.content.strip() == "Paris" and "<think>" not in msg.content and r.choices[0].finish_reason == "stop"
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0, stream=True):
        if chunk.choices:
            d = chunk.choices[0].delta
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            content += d.content or ""
    assert reasoning == "Let" and content == msg.content


def test_enable_thinking_false_answers_directly(think_client):
    _base, client = think_client
    r = client.chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    msg = r.choices[0].message
    assert msg.content.strip() == "Paris" and "reasoning_content" not in (msg.model_extra or {})


@pytest.fixture(scope="module")
def no_think_client(thinker):
    import openai

    with running_server(thinker, "--disable-thinking", "--speculative-tokens", "0") as base:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)


def test_disable_thinking_is_the_servers_default_and_a_request_overrides_it(no_think_client, think_client):
    """``--disable-thinking``: enable_thinking=False unless the request sets it. That server does not
    draft tokens, the default one does (3 on CPUs): the same answers."""
    _base, client = no_think_client
    r = client.chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0)
    assert r.choices[0].message.content.strip() == "Paris"
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    on = {"chat_template_kwargs": {"enable_thinking": True}}
    r = client.chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0, extra_body=on)
    plain = think_client[1].chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0)
    assert r.choices[0].message.model_extra["reasoning_content"] == "Let"
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.completion_tokens == plain.usage.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=Q, max_tokens=20, temperature=0, stream=True) if c.choices)
    assert streamed.strip() == "Paris"
    fmt = {"type": "json_object"}  # the reasoning free, the answer after </think> constrained, drafted or not
    r = client.chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0, extra_body=on,
                                       response_format=fmt)
    plain = think_client[1].chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0,
                                                    response_format=fmt)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.choices[0].message.model_extra["reasoning_content"] == "Let"


def test_constraint_applies_after_the_thinking_block(think_client):
    """json_object: the reasoning is free ('Let' is not JSON), the answer after </think> is constrained
    ('\\n\\n' is masked, so the chain's second choice '{' and then '}' follow)."""
    _base, client = think_client
    r = client.chat.completions.create(model="tiny", messages=Q, max_tokens=20, temperature=0,
                                       response_format={"type": "json_object"})
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "Let"
    assert json.loads(msg.content) == {}
    np.testing.assert_equal(r.choices[0].finish_reason, "stop")

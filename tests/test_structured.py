"""Grammar-constrained decoding in the engine, on a tiny *random-weight* model: nothing but the mask can
make its output valid, so every finished answer validating is a strong test. Schemas come from hypothesis;
answers are checked with ``jsonschema`` / ``re`` / the grammar's language."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrum_runtime.engine import Engine, EngineConfig
from ferrum_runtime.sampler import SamplingParams
from ferrum_runtime.structured import Constraint, ConstraintError

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(chat_artifact):
    return Engine.from_artifact(chat_artifact, EngineConfig(num_blocks=256, max_num_seqs=16))


def generate(engine: Engine, constraint: Constraint | None, n: int = 3, max_tokens: int = 300, seed: int = 0,
             prompt: str = "Answer in JSON:") -> list[tuple[str, str]]:
    """(text, finish_reason) of each of ``n`` samples (temperature 1: the random model's own distribution)."""

    async def run():
        texts = [""] * n
        finish = [""] * n
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, n=n)
        async for d in engine.generate(prompt, params, constraint=constraint):
            texts[d.index] += d.text
            if d.finish_reason:
                finish[d.index] = d.finish_reason
        return list(zip(texts, finish))

    return asyncio.run(run())


# JSON schemas whose every valid instance is short (bounded strings, ranges, item counts), so a random
# model under the mask always finishes well within max_tokens
_leaf = st.one_of(
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": lo + hi},
              st.integers(0, 2), st.integers(0, 5)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 500)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=4), min_size=1, max_size=4, unique=True).map(
        lambda vs: {"enum": vs}),
    st.just({"type": "string", "format": "date"}),
    st.just({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]}),
)


def _object(children):
    names = st.lists(st.text(alphabet="abcdefgh_", min_size=1, max_size=6), min_size=1, max_size=4, unique=True)
    return names.flatmap(lambda ks: st.lists(children, min_size=len(ks), max_size=len(ks)).map(
        lambda vs: {"type": "object", "properties": dict(zip(ks, vs)), "required": list(ks),
                    "additionalProperties": False}))


_node = st.recursive(_leaf, lambda kids: st.one_of(
    _object(kids),
    st.builds(lambda item, hi: {"type": "array", "items": item, "minItems": 0, "maxItems": hi}, kids, st.integers(1, 3)),
), max_leaves=6)
SCHEMAS = _object(_node)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 1000))
def test_random_model_under_a_schema_always_validates(engine, schema, seed):
    for text, finish in generate(engine, Constraint("json_schema", json.dumps(schema), "s"), seed=seed):
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("kind,spec", [
    ("json_schema", json.dumps({"type": "object", "properties": {"s": {"type": "string", "maxLength": 3},
                                                                 "[^t]": {"type": "string"}},
                                "required": ["s", "[^t]"], "additionalProperties": False})),
    ("regex", r'"[^"]{0,3}"'),
])
def test_strings_refuse_surrogate_bytes(engine, kind, spec):
    """xgrammar's negated character classes match the 3-byte encodings of U+D800-DFFF, which are not UTF-8
    (hypothesis found a random model writing ``)\u05a7`` + ED A0 80 into a 3-character string: 5 characters
    once decoded). Our grammars refuse them; real characters of every length still pass, and a literal
    that looks like a class (the key ``[^t]``) is left alone."""
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(
        engine.structured._grammar(Constraint(kind, spec, "s")))

    def accepts(value: bytes) -> bool:
        text = b'{"s": "' + value + b'", "[^t]": "' + value + b'"}' if kind == "json_schema" else b'"' + value + b'"'
        return xgr.GrammarMatcher(compiled).accept_string(text)

    for ok in ("abc", "\u00e9\u4e2d", "\U0001f600", "\ud7ff\ue000"):
        assert accepts(ok.encode("utf-8")), ok
    for lone in (b"\xed\xa0\x80", b"\xed\xbf\xbf", b"a\xed\xb0\x80"):
        assert not accepts(lone), lone


def test_refs_defs_and_nesting_validate(engine):
    schema = {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99},
                                                                   "tag": {"enum": ["a", "b"]}},
                                  "required": ["x", "tag"], "additionalProperties": False}},
              "type": "object", "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/point"},
                                                          "maxItems": 3},
                                               "label": {"type": "string", "maxLength": 8}},
              "required": ["points", "label"], "additionalProperties": False}
    outs = generate(engine, Constraint("json_schema", json.dumps(schema), "s"), n=6, seed=1)
    for text, finish in outs:
        assert finish == "stop"
        jsonschema.validate(json.loads(text), schema)
    assert all("\n" not in t and "  " not in t for t, _ in outs)  # no free whitespace


def test_json_object_answers_parse_or_run_out_of_tokens(engine):
    outs = generate(engine, Constraint("json_object", "", "response_format"), n=8, max_tokens=200, seed=2)
    for text, finish in outs:
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # max_tokens mid-structure: "length", and what came out is an object's beginning
            assert finish == "length" and text.startswith("{")
    assert any(f == "stop" for _, f in outs)


def test_regex_and_grammar(engine):
    pattern = r"[a-c]{2,5}@(x|y)\.com"
    for text, finish in generate(engine, Constraint("regex", pattern, "regex"), n=6, seed=3):
        assert finish == "stop" and re.fullmatch(pattern, text), text
    grammar = 'root ::= ("yes" | "no" | "maybe") " because " [0-9] [0-9]? "!"'
    for text, finish in generate(engine, Constraint("grammar", grammar, "grammar"), n=6, seed=4):
        assert finish == "stop" and re.fullmatch(r"(yes|no|maybe) because [0-9][0-9]?!", text), text


def test_max_tokens_mid_structure_is_length(engine):
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 40, "maxLength": 60}},
              "required": ["a"]}
    for text, finish in generate(engine, Constraint("json_schema", json.dumps(schema), "s"), n=2, max_tokens=5):
        assert finish == "length" and text.startswith('{"a": "')


def test_constrained_requests_survive_preemption(chat_artifact):
    """Few KV blocks and many concurrent constrained requests: preempted ones are recomputed and keep
    their grammar state, so every answer still validates."""
    eng = Engine.from_artifact(chat_artifact, EngineConfig(num_blocks=10, max_num_seqs=8,
                                                           max_num_batched_tokens=64))
    schema = {"type": "object", "properties": {"words": {"type": "array", "maxItems": 6, "minItems": 4,
                                                         "items": {"type": "string", "minLength": 3, "maxLength": 8}}},
              "required": ["words"], "additionalProperties": False}
    c = Constraint("json_schema", json.dumps(schema), "s")

    async def run_all():
        async def one(i):
            text, finish = "", ""
            async for d in eng.generate("List some words:", SamplingParams(max_tokens=120, seed=i), constraint=c):
                text += d.text
                finish = d.finish_reason or finish
            return text, finish
        return await asyncio.gather(*[one(i) for i in range(8)])

    for text, finish in asyncio.run(run_all()):
        assert finish == "stop"
        jsonschema.validate(json.loads(text), schema)
    assert eng.scheduler.num_preemptions > 0


@pytest.mark.parametrize("kind,spec,fragment", [
    ("regex", "(unclosed", "regex"),
    ("grammar", "root ::= undefined_rule", "grammar"),
    ("json_schema", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "json_schema"),
])
def test_uncompilable_constraints_raise_naming_the_field(engine, kind, spec, fragment):
    with pytest.raises(ConstraintError) as info:
        engine.compile_constraint(Constraint(kind, spec, fragment))
    assert info.value.param == fragment and "cannot be compiled" in str(info.value)


@pytest.mark.parametrize("fmt", ["qwen", "llama", "generic"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_parse_and_validate_in_every_format(engine, fmt, choice):
    """tool_choice required / named on random weights: the family's syntax, a declared function, valid
    arguments; the parser of that format recovers the calls."""
    from ferrum_runtime.tool_calls import parse_tool_calls

    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": n, "parameters": params}} for n in ("get_weather", "get_time")]
    c = Constraint.tools(fmt, tools, choice, parallel=False)
    for text, finish in generate(engine, c, n=4, seed=7, max_tokens=120):
        content, calls = parse_tool_calls(text, fmt, {"get_weather", "get_time"})
        assert finish == "stop" and len(calls) == 1, text
        assert isinstance(choice, str) or calls[0].name == "get_time"
        jsonschema.validate(json.loads(calls[0].arguments), params)

"""Speculative decoding by prompt lookup: the proposer against a brute-force search, and the engine with
drafts against the engine without them on real compiled models (the same tokens, logprobs, stops and
counts; fewer steps where the answer repeats its prompt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrum.schedules import sampling as sm
from ferrum_runtime.cli import main as cli_main
from ferrum_runtime.sampler import SamplingParams
from ferrum_runtime.speculative import SpeculativeConfig, propose, worth_drafting
from ferrum_runtime.structured import Constraint

from .test_engine import ORDERS, make_engine, run

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b
'''


def brute_force(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[len(tokens) - n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i:i + n] == suffix]
        if starts:
            return tokens[starts[-1] + n:starts[-1] + n + k]
    return []


@pytest.mark.unit
@given(st.lists(st.integers(0, 4), max_size=40), st.integers(0, 6), st.integers(1, 3), st.integers(0, 3),
       st.integers(0, 8))
def test_propose_is_the_latest_longest_match(tokens, k, lo, extra, limit):
    config = SpeculativeConfig(max(k, 1), lo, lo + extra)
    got = propose(np.array(tokens, np.int32), config, limit)
    assert got == brute_force(tokens, min(config.num_tokens, limit), lo, lo + extra)


@pytest.mark.unit
def test_propose_examples():
    config = SpeculativeConfig(3, 1, 3)
    a = np.array
    assert propose(a([5, 6, 7, 8, 9, 5, 6, 7], np.int32), config, 10) == [8, 9, 5]  # the 3-gram 5 6 7
    assert propose(a([1, 2, 9, 2, 3, 1, 2], np.int32), config, 10) == [9, 2, 3]  # 1 2 beats the later 2
    assert propose(a([1, 2, 3, 4], np.int32), config, 10) == []
    assert propose(a([5, 6, 7, 8, 9, 5, 6, 7], np.int32), config, 1) == [8]  # max_tokens leaves room for 1


def chat_ids(engine, text: str) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.render_chat([{"role": "user", "content": text}]))


def drafting(k: int) -> SpeculativeConfig | None:
    """k drafts a step whatever the batch and the share kept (the mechanism under test, not the policy)."""
    return SpeculativeConfig(k, fixed_cost=1e9) if k else None


def generate(artifact, prompt, params, k=0, step=None, constraint=None, **cfg):
    engine = make_engine(artifact, num_blocks=128, step=step, speculative=drafting(k), **cfg)
    out = run(engine, (prompt, params, None, constraint))[0]
    assert engine.blocks.num_free == engine.blocks.num_blocks
    engine.blocks.check_invariants()
    return out, engine.counters


@ORDERS
def test_greedy_drafts_give_the_same_tokens_in_fewer_steps(smollm2_artifact, step):
    """A copying answer takes most drafts: the same tokens, text and logprobs, in far fewer steps."""
    engine = make_engine(smollm2_artifact)
    ids = chat_ids(engine, f"Repeat this code exactly:\n\n{CODE}")
    params = SamplingParams(max_tokens=80, temperature=0, logprobs=2)
    plain, c0 = generate(smollm2_artifact, ids, params, step=step)
    fast, c1 = generate(smollm2_artifact, ids, params, k=4, step=step)
    assert [o["ids"] for o in fast] == [o["ids"] for o in plain]
    assert fast[0]["text"] == plain[0]["text"] and fast[0]["finish"] == plain[0]["finish"]
    for a, b in zip(fast[0]["logprobs"], plain[0]["logprobs"]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-3
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    assert c1["generation_tokens"] == c0["generation_tokens"] == len(plain[0]["ids"])
    assert c1["accepted_tokens"] >= 20, c1  # it copies the first 4 lines (then SmolLM2 writes its own code)
    assert c1["steps"] <= c0["steps"] - c1["accepted_tokens"] + 1  # each kept draft saved a step
    assert c0["draft_tokens"] == 0


def test_tokens_picked_on_the_device_take_drafts_too(smollm2_artifact):
    """Greedy without logprobs: the artifact's argmax picks every row; the same tokens."""
    engine = make_engine(smollm2_artifact)
    ids = chat_ids(engine, f"Repeat this code exactly:\n\n{CODE}")
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    plain, _ = generate(smollm2_artifact, ids, params)
    fast, c = generate(smollm2_artifact, ids, params, k=5)
    assert fast[0]["ids"] == plain[0]["ids"] and len(fast[0]["ids"]) == 60 and fast[0]["finish"] == "length"
    assert c["accepted_tokens"] > 20


@ORDERS
def test_seeded_sampling_with_penalties_draws_the_same_tokens(smollm2_artifact, step):
    """A kept draft is the token the row's own draw picked: one draw per output token, in order, so a
    seeded request gives the same tokens as without drafts; its penalties see each kept token."""
    engine = make_engine(smollm2_artifact)
    ids = chat_ids(engine, f"Repeat this code exactly:\n\n{CODE}")
    params = SamplingParams(max_tokens=60, temperature=0.7, top_p=0.95, seed=5, repetition_penalty=1.05,
                            frequency_penalty=0.1, n=2)
    plain, _ = generate(smollm2_artifact, ids, params, step=step)
    fast, c = generate(smollm2_artifact, ids, params, k=4, step=step)
    assert [o["ids"] for o in fast] == [o["ids"] for o in plain]
    assert plain[0]["ids"] != plain[1]["ids"]
    assert c["accepted_tokens"] > 0


@ORDERS
def test_a_stop_string_inside_kept_drafts_ends_the_answer_there(smollm2_artifact, step):
    engine = make_engine(smollm2_artifact)
    ids = chat_ids(engine, f"Repeat this code exactly:\n\n{CODE}")
    params = SamplingParams(max_tokens=80, temperature=0, stop=("< 2",))
    plain, c0 = generate(smollm2_artifact, ids, params)
    assert plain[0]["finish"] == "stop" and plain[0]["text"].endswith("if n "), plain[0]["text"]
    fast, c1 = generate(smollm2_artifact, ids, params, k=6, step=step)
    assert fast[0]["text"] == plain[0]["text"] and fast[0]["ids"] == plain[0]["ids"]
    assert fast[0]["finish"] == "stop"
    assert c1["generation_tokens"] == c0["generation_tokens"]  # tokens kept after the stop are taken back
    assert c1["accepted_tokens"] > 0


def test_max_tokens_and_stop_ids_cut_drafts(tiny, prompts):
    """On a random model (which loops, so its own text gives drafts): the same tokens, exactly
    max_tokens of them, a stop token id ends the answer where it would without drafts."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for p in prompts[:4]:
        plain, _ = generate(tiny, p, params)
        fast, c = generate(tiny, p, params, k=8)
        assert fast[0]["ids"] == plain[0]["ids"] and len(fast[0]["ids"]) == 40
        stop = plain[0]["ids"][25]
        cut = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=(stop,))
        fast, _ = generate(tiny, p, cut, k=8)
        assert fast[0]["ids"] == plain[0]["ids"][:plain[0]["ids"].index(stop)] and fast[0]["finish"] == "stop"


def test_a_batch_with_drafts_equals_each_alone(tiny, prompts):
    """Sequences with and without drafts in one step (a constrained budget trims drafts)."""
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    alone = [generate(tiny, p, params)[0][0]["ids"] for p in prompts]
    engine = make_engine(tiny, num_blocks=128, speculative=drafting(6), max_num_batched_tokens=24)
    outs = run(engine, *[(p, params) for p in prompts])
    assert [o[0]["ids"] for o in outs] == alone
    assert engine.counters["accepted_tokens"] > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_drafts_stop_where_they_cannot_pay(tiny, prompts):
    """The policy: a draft kept at rate p pays in a step of T sequences when p > T / (T + fixed_cost). A
    fixed cost of 0 (as if the weights cost nothing to read) never drafts; of 4 (a CPU's), drafts a lone
    sequence that keeps a fifth of them, not 16 that keep three quarters."""
    assert worth_drafting(0.25, 1, 4.0) and not worth_drafting(0.15, 1, 4.0)
    assert worth_drafting(0.85, 16, 4.0) and not worth_drafting(0.75, 16, 4.0)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine = make_engine(tiny, num_blocks=128, speculative=SpeculativeConfig(4, fixed_cost=0.0))
    run(engine, *[(p, params) for p in prompts])
    assert engine.counters["draft_tokens"] == 0


def test_structured_output_takes_drafts(smollm2_artifact):
    """A JSON schema's answer repeats its keys: drafts that the grammar allows are kept, each row masked
    after the tokens before it; the same tokens as without drafts."""
    schema = {"type": "object", "properties": {"people": {"type": "array", "minItems": 4, "maxItems": 4, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "city": {"type": "string", "maxLength": 12}},
        "required": ["name", "city"], "additionalProperties": False}}},
        "required": ["people"], "additionalProperties": False}
    engine = make_engine(smollm2_artifact)
    ids = chat_ids(engine, "Give four people with their city, as JSON.")
    constraint = Constraint("json_schema", json.dumps(schema), "response_format")
    params = SamplingParams(max_tokens=150, temperature=0)
    plain, _ = generate(smollm2_artifact, ids, params, constraint=constraint)
    fast, c = generate(smollm2_artifact, ids, params, k=4, constraint=constraint)
    assert fast[0]["ids"] == plain[0]["ids"]
    assert len(json.loads(fast[0]["text"])["people"]) == 4
    assert c["accepted_tokens"] >= 10, c


class _Picked:
    def __init__(self, ids):
        self.ids = ids

    def numpy(self):
        return self.ids


@ORDERS
def test_draws_of_rows_after_a_rejected_draft_are_given_back(tiny, prompts, step):
    """A GPU artifact samples on the device with a draw per row, drafts' rows included; the draws of
    rows after the first rejected draft go back to the generator, so the tokens are those without
    drafts. The device's sampler here is its kernel's numpy reference (no GPU on CI)."""
    params = SamplingParams(max_tokens=40, temperature=0.05, top_k=3, seed=9, ignore_eos=True)

    def sampled_on_the_device(k):
        engine = make_engine(tiny, num_blocks=128, step=step, speculative=drafting(k))
        draws = []

        def sample(logits, params, uniform):
            draws.append(len(uniform.numpy()))
            return _Picked(sm.sample_ref(logits.numpy(), params.numpy(), uniform.numpy()))

        engine.model._sample_fn = sample
        out = [o[0]["ids"] for o in run(engine, *[(p, params) for p in prompts[:3]])]
        return out, sum(draws), engine.counters

    plain, plain_draws, _ = sampled_on_the_device(0)
    fast, fast_draws, c = sampled_on_the_device(6)
    assert fast == plain
    assert c["draft_tokens"] > c["accepted_tokens"] > 0 and fast_draws > plain_draws, (c, fast_draws, plain_draws)


def test_cli_refuses_a_bad_draft_count(smollm2_artifact, capsys):
    for command in ("run", "serve"):
        assert cli_main([command, str(smollm2_artifact), "--speculative-tokens", "-1"]) == 2
        err = capsys.readouterr().err
        assert "--speculative-tokens -1: pass 1-16" in err and "Traceback" not in err

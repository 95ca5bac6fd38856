"""The engine on real compiled models: batching invariance, prefix reuse, oversubscription with
preemption, cancellation, seeded sampling, n > 1, prompt logprobs, stop strings, refusals."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ferrum_runtime.engine import Engine, EngineConfig, RequestError, StepFailed
from ferrum_runtime.model import CompiledModel
from ferrum_runtime.sampler import SamplingError, SamplingParams
from ferrum_runtime.tokenizer import TokenizerFiles

from .conftest import log_softmax

pytestmark = pytest.mark.e2e

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def make_engine(artifact, num_blocks=64, step=None, **cfg) -> Engine:
    """An engine on ``artifact``; ``step``: its actions' order ("overlap" as on a GPU; default: the
    device's, "serial" on a CPU)."""
    model = CompiledModel.load(artifact, num_blocks=num_blocks)
    tok = TokenizerFiles(artifact) if (artifact / "tokenizer.json").is_file() else None
    engine = Engine(model, tok, EngineConfig(**cfg))
    if step is not None:
        engine.STEP = {"overlap": Engine.OVERLAP_STEP, "serial": Engine.SERIAL_STEP}[step]
    return engine


ORDERS = pytest.mark.parametrize("step", ["overlap", "serial"])


async def collect(engine: Engine, prompt, params: SamplingParams, request_id=None, constraint=None):
    outs: dict[int, dict] = {}
    async for d in engine.generate(prompt, params, request_id=request_id, constraint=constraint):
        o = outs.setdefault(d.index, {"ids": [], "text": "", "finish": None, "prompt_logprobs": None, "logprobs": []})
        o["ids"] += d.token_ids
        o["text"] += d.text
        o["finish"] = d.finish_reason or o["finish"]
        o["prompt_logprobs"] = o["prompt_logprobs"] or d.prompt_logprobs
        o["logprobs"] += d.logprobs or []
    return [outs[i] for i in sorted(outs)]


async def settle(engine: Engine) -> None:
    """Wait until the engine has no work left: no request, and no launched step to collect (the one
    launched before a stop string ended its sequence)."""
    for _ in range(500):
        s = engine.stats()
        if not (s["running"] or s["waiting"] or s["in_flight"]):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine did not settle: {engine.stats()}")


def run(engine, *jobs):
    async def main():
        try:
            out = await asyncio.gather(*(collect(engine, *j) for j in jobs))
            await settle(engine)
            return out
        finally:
            await engine.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def alone(tiny, prompts):
    return [run(make_engine(tiny), (p, GREEDY))[0][0]["ids"] for p in prompts]


def test_concurrent_greedy_equals_alone(tiny, prompts, alone):
    engine = make_engine(tiny, max_num_batched_tokens=64)
    outs = run(engine, *[(p, GREEDY) for p in prompts])
    assert [o[0]["ids"] for o in outs] == alone
    assert all(o[0]["finish"] == "length" and len(o[0]["ids"]) == 12 for o in outs)
    assert engine.stats()["steps"] < 8 * 12  # really batched


def counting(engine: Engine) -> dict:
    """Count the engine's model calls by kind: ids picked on the device ("forward_picked"), or logits only."""
    calls = {"forward_picked": 0, "forward": 0}
    launch = engine.model.launch

    def counted(batch, pick, *a, **k):
        calls["forward_picked" if pick else "forward"] += 1
        return launch(batch, pick, *a, **k)

    engine.model.launch = counted  # type: ignore[method-assign]
    return calls


def test_greedy_tokens_picked_on_the_device_equal_the_host_argmax(tiny, prompts, alone):
    """Plain greedy rows take the artifact's argmax entry point (ids back, no logits); the same requests
    with the host picking the argmax from the logits give the same tokens. A logprobs row needs the logits:
    its steps bring them back too, and its tokens are still the argmax."""
    engine = make_engine(tiny)
    calls = counting(engine)
    outs = run(engine, *[(p, GREEDY) for p in prompts[:4]])
    assert [o[0]["ids"] for o in outs] == alone[:4]
    assert engine.model.has_device_argmax and calls["forward_picked"] >= 11 and calls["forward"] == 0
    host = make_engine(tiny)
    host.model._argmax_fn = None
    assert [o[0]["ids"] for o in run(host, *[(p, GREEDY) for p in prompts[:4]])] == alone[:4]
    engine = make_engine(tiny)
    calls = counting(engine)
    with_logprobs = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    outs = run(engine, (prompts[0], with_logprobs), (prompts[1], GREEDY))
    assert outs[0][0]["ids"] == alone[0] and outs[1][0]["ids"] == alone[1]
    assert calls["forward_picked"] >= 11 and outs[0][0]["logprobs"] and len(outs[0][0]["logprobs"]) == 12


def test_oversubscribed_cache_completes_with_identical_outputs(tiny, prompts, alone):
    need = sum(-(-(len(p) + 12) // 16) for p in prompts)
    engine = make_engine(tiny, num_blocks=need // 3, max_num_batched_tokens=128)
    outs = run(engine, *[(p, GREEDY) for p in prompts])
    assert [o[0]["ids"] for o in outs] == alone
    assert engine.stats()["preemptions"] > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_reuse_on_and_off(tiny):
    rng = np.random.default_rng(2)
    system = [int(t) for t in rng.integers(0, 256, 48)]
    prompts = [system + [int(t) for t in rng.integers(0, 256, 5)] for _ in range(4)]
    results = {}
    for caching in (True, False):
        engine = make_engine(tiny, enable_prefix_caching=caching, max_num_seqs=1)
        results[caching] = ([o[0]["ids"] for o in run(engine, *[(p, GREEDY) for p in prompts])], engine.stats())
    assert results[True][0] == results[False][0]
    saved = results[False][1]["computed_tokens"] - results[True][1]["computed_tokens"]
    assert saved == results[True][1]["prefix_saved_tokens"] == 3 * 48  # 3 full blocks of 16 reused 3 times


def after_the_end(engine: Engine) -> list:
    """Deltas the engine makes for a choice after its last one (none may follow), collected as it runs."""
    ended: set = set()
    late: list = []
    delta = engine._delta

    def made(*a):
        d = delta(*a)
        if (d.request_id, d.index) in ended:
            late.append(d)
        if d.finish_reason is not None:
            ended.add((d.request_id, d.index))
        return d

    engine._delta = made  # type: ignore[method-assign]
    return late


@ORDERS
def test_cancel_returns_every_block(tiny, prompts, step):
    engine = make_engine(tiny, step=step)
    late = after_the_end(engine)

    async def main():
        other = asyncio.create_task(collect(engine, prompts[1], GREEDY))
        got = 0
        async for _ in engine.generate(prompts[4], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)):
            got += 1
            if got == 3:
                break  # leaving the stream aborts the request
        await other
        await settle(engine)
        await engine.close()

    asyncio.run(main())
    assert engine.stats()["aborted"] == 1
    assert not late  # the aborted request's row in the step running when the abort came is dropped
    assert engine.blocks.num_free == engine.blocks.num_blocks
    engine.blocks.check_invariants()


def test_close_ends_the_steps_of_a_running_request(tiny, prompts):
    """Steps run back to back in the engine's thread while there is work; ``close()`` ends them after the
    current step even while a request still has tokens to go, and returns."""
    engine = make_engine(tiny)
    budget = engine.capacity - len(prompts[1])

    async def main():
        got = []

        async def consume():
            params = SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True)
            async for d in engine.generate(prompts[1], params):
                got.extend(d.token_ids)

        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.001)
        await engine.close()
        steps = engine.counters["steps"]
        await asyncio.sleep(0.05)
        task.cancel()
        return steps, len(got)

    steps, got = asyncio.run(main())
    assert 3 <= got <= steps < budget and engine.counters["steps"] == steps


def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_goes_on(tiny, prompts, alone):
    """A step that raises (here the model call, as a lost device would) must not leave requests waiting
    forever or take the engine down: the requests it held get ``StepFailed``, their blocks come back, and
    the next request is served as if nothing happened."""
    engine = make_engine(tiny)
    forward, calls = engine.model._fn, [0]

    def flaky(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("device lost")
        return forward(*args)

    engine.model._fn = flaky

    async def main():
        try:
            failed = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts[:2]), return_exceptions=True)
            after = await collect(engine, prompts[0], GREEDY)
        finally:
            await engine.close()
        return failed, after

    failed, after = asyncio.run(main())
    assert [type(f) for f in failed] == [StepFailed, StepFailed] and "device lost" in str(failed[0])
    assert after[0]["ids"] == alone[0] and calls[0] > 3
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.scheduler.has_work
    engine.blocks.check_invariants()


def test_a_failed_step_reaches_the_server_as_an_error(tiny, prompts):
    """The server merges a request's streams in ``Server._generate``: an engine step that fails must come
    out of it as the exception (answered 500, or an error event on a stream), not as a stream that just
    stops with no finish reason."""
    from ferrum_runtime.server import Server

    engine = make_engine(tiny)
    forward = engine.model._fn

    def broken(*args):
        raise RuntimeError("device lost")

    server = Server(tiny)  # not started: only its stream merging runs

    async def main():
        got = []
        try:
            async for item in server._generate(engine, [prompts[0], prompts[1]], GREEDY, "cmpl-x"):
                got.append(item)
        finally:
            engine.model._fn = forward
            await engine.close()
        return got

    engine.model._fn = broken
    with pytest.raises(StepFailed, match="device lost"):
        asyncio.run(main())


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny, prompts):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run(make_engine(tiny), (prompts[2], params))[0][0]["ids"]
    crowd = run(make_engine(tiny), *[(p, SamplingParams(max_tokens=10, temperature=1.0, seed=i)) for i, p in
                                     enumerate(prompts[:2])], (prompts[2], params))
    assert crowd[2][0]["ids"] == alone
    other_seed = run(make_engine(tiny), (prompts[2], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99,
                                                                    ignore_eos=True)))
    assert other_seed[0][0]["ids"] != alone


def test_n_samples_share_the_prompt_blocks(tiny):
    prompt = list(range(70))
    engine = make_engine(tiny)
    outs = run(engine, (prompt, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)))[0]
    assert len(outs) == 3 and len({tuple(o["ids"]) for o in outs}) > 1
    assert engine.stats()["prefix_saved_tokens"] == 2 * 64  # siblings reuse the 4 full blocks of the prompt
    again = run(make_engine(tiny), (prompt, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)))
    assert [o["ids"] for o in again[0]] == [o["ids"] for o in outs]


def test_prompt_logprobs_match_transformers(tiny, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = [int(t) for t in np.random.default_rng(4).integers(0, 256, 40)]
    engine = make_engine(tiny, max_num_batched_tokens=16)  # the prompt is scored over three chunks
    out = run(engine, (prompt, SamplingParams(max_tokens=0, prompt_logprobs=2)))[0][0]
    assert out["finish"] == "length" and out["ids"] == []
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = log_softmax(hf(torch.tensor([prompt])).logits[0].numpy())
    lps = out["prompt_logprobs"]
    assert lps[0] is None and len(lps) == len(prompt)
    for i in range(1, len(prompt)):
        assert lps[i].token_id == prompt[i]
        assert abs(lps[i].logprob - ref[i - 1, prompt[i]]) < 1e-3
        assert [t for t, _ in lps[i].top_logprobs] == list(np.argsort(-ref[i - 1])[:2])


def test_logprobs_of_generated_tokens(tiny, prompts):
    out = run(make_engine(tiny), (prompts[3], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)))
    lps = out[0][0]["logprobs"]
    assert len(lps) == 4
    for lp in lps:
        assert lp.top_logprobs[0][0] == lp.token_id  # greedy: the chosen token is the most likely
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0


def test_refusals_reach_nothing(tiny):
    engine = make_engine(tiny, num_blocks=4)  # 64 tokens of cache

    async def attempt(prompt, params):
        async for _ in engine.generate(prompt, params):
            pass

    with pytest.raises(RequestError, match="context holds 64") as e:
        asyncio.run(attempt(list(range(60)), SamplingParams(max_tokens=10)))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError, match="outside the vocabulary"):
        asyncio.run(attempt([1, 256], GREEDY))
    with pytest.raises(SamplingError) as e2:
        asyncio.run(attempt([1, 2], SamplingParams(temperature=-1)))
    assert e2.value.param == "temperature"
    assert not engine.scheduler.has_work and engine.blocks.num_free == 4


@ORDERS
def test_stop_strings_on_smollm2(smollm2_artifact, step):
    engine = make_engine(smollm2_artifact)
    tok = engine.tokenizer
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Count from 1 to 20, separated by commas."}]))
    full = run(engine, (ids, SamplingParams(max_tokens=40, temperature=0)))[0][0]
    text = full["text"]
    assert "5" in text, text
    stop = text[text.index("5"):text.index("5") + 3]  # a stop string that spans token boundaries
    engine = make_engine(smollm2_artifact, step=step)
    late = after_the_end(engine)
    cut = run(engine, (ids, SamplingParams(max_tokens=40, temperature=0, stop=(stop,))))[0][0]
    assert cut["finish"] == "stop"
    assert cut["text"] == text[:text.index(stop)]
    assert stop not in cut["text"]
    # launching first, the stop string is found while the step after its token runs: that step's row is
    # dropped (its token neither output nor counted); text first, no step is wasted. Blocks all free.
    assert engine.counters["steps"] == len(cut["ids"]) + (step == "overlap")
    assert engine.counters["generation_tokens"] == len(cut["ids"]) and not late
    assert engine.blocks.num_free == engine.blocks.num_blocks
    engine.blocks.check_invariants()


@pytest.mark.parametrize("step, behind", [("overlap", 1), ("serial", 0)])
def test_text_work_runs_while_the_next_step_computes(tiny, prompts, alone, step, behind):
    """Launching first (a GPU's order), each decode step is launched with the previous step's token taken
    (the sequence is one longer) but not yet turned into text and a delta: that work runs after the
    launch, while the device computes. Text first (a CPU's), every token taken is in a delta by then.
    Either way every delta made is handed to the event loop before the next launch. The CPU engine takes
    the CPU's order."""
    engine = make_engine(tiny, step=step)
    seen = []  # per launch: tokens taken, tokens in deltas so far
    emitted = [0]
    held = []  # per launch: deltas made but not handed over
    launch, delta = engine.model.launch, engine._delta

    def launched(*a, **k):
        seen.append((engine.counters["generation_tokens"], emitted[0]))
        held.append(sum(len(items) for items in engine._outbox.values()))
        return launch(*a, **k)

    def counted(req, ch, text, token_ids, *rest):
        emitted[0] += len(token_ids)
        return delta(req, ch, text, token_ids, *rest)

    engine.model.launch, engine._delta = launched, counted  # type: ignore[method-assign]
    out = run(engine, (prompts[0], GREEDY))[0][0]
    assert out["ids"] == alone[0] and emitted[0] == 12
    assert seen == [(0, 0)] + [(k, k - behind) for k in range(1, 12)]
    assert held == [0] * 12
    assert make_engine(tiny).STEP == Engine.SERIAL_STEP


def test_stop_token_ids_and_eos(tiny, prompts, alone, smollm2_artifact):
    third = alone[0][2]
    out = run(make_engine(tiny), (prompts[0], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(third,))))
    first_hit = alone[0].index(third)
    assert out[0][0]["finish"] == "stop" and out[0][0]["ids"] == alone[0][:first_hit]  # the stop token is not output

    engine = make_engine(smollm2_artifact)
    ids = engine.tokenizer.encode(engine.tokenizer.render_chat([{"role": "user", "content": "Say hi."}]))
    natural = run(engine, (ids, SamplingParams(max_tokens=64, temperature=0)))[0][0]
    assert natural["finish"] == "stop" and len(natural["ids"]) < 64  # the model ends its turn with EOS
    forced = run(make_engine(smollm2_artifact), (ids, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)))
    assert forced[0][0]["finish"] == "length" and len(forced[0][0]["ids"]) == 64
    assert forced[0][0]["ids"][:len(natural["ids"])] == natural["ids"]


def test_prompt_logprobs_survive_preemption(tiny):
    """A scoring request preempted after its prompt was scored, and recomputed, reports each prompt
    position once, with the same values."""
    rng = np.random.default_rng(8)
    older = [int(t) for t in rng.integers(0, 256, 30)]
    scored = [int(t) for t in rng.integers(0, 256, 40)]
    params = SamplingParams(max_tokens=20, temperature=0, prompt_logprobs=1, ignore_eos=True)
    ref = run(make_engine(tiny), (scored, params))[0][0]
    engine = make_engine(tiny, num_blocks=6)  # 96 positions: both fit at first, not once both have grown
    outs = run(engine, (older, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)), (scored, params))
    assert engine.stats()["preemptions"] > 0
    got = outs[1][0]["prompt_logprobs"]
    assert len(got) == len(scored) and outs[1][0]["ids"] == ref["ids"]
    assert [None if e is None else (e.token_id, round(e.logprob, 5)) for e in got] == \
        [None if e is None else (e.token_id, round(e.logprob, 5)) for e in ref["prompt_logprobs"]]

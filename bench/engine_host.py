"""The engine's own time per decode step: what a step costs beyond the compiled model's call.

On a GPU a step's kernels take a few milliseconds and the engine's Python work between them (scheduling,
building the batch, copying it in, appending tokens, handing deltas to the server's event loop) is time
the GPU waits, so it caps served tok/s below `bench/gpu_proof.py`'s (which drives the model directly).
This measures it on any artifact, on this CPU: B requests of random P-token prompts, G greedy tokens each
(ignore_eos) through `Engine.generate`, detokenized when the artifact has a tokenizer, and per step the
wall time, the time in the compiled model's functions (the "kernels": on a GPU, what the device would
do) and the rest ("host": the engine's actions, copying the step's inputs in and the picked tokens out,
handing deltas over). The kernels' time is the peer measured in the same run.

    python bench/engine_host.py ARTIFACT [--batches 1,16,32] [--prompt 256] [--gen 128] [--reps 3] [--json F] [--ab]

``--ab`` runs each rep twice, paired: the engine with a step's text work (detokenizing, deltas) after the
next launch (``Engine.OVERLAP_STEP``, a GPU's default) and before it (``SERIAL_STEP``, a CPU's, and every
device's before 2026-11-27). Only a GPU can tell them apart: on a CPU ``launch`` runs the step.

Not a test. Prints one line per batch (median of --reps runs) and writes --json with every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_kernels(model) -> list[float]:
    """Wrap the model's compiled entry points so that the seconds spent in them add up in the list."""
    spent = [0.0]

    def timed(fn):
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            spent[0] += time.perf_counter() - t0
            return out
        return call

    for name, fn in list(vars(model).items()):
        if name.endswith("_fn") and fn is not None:
            setattr(model, name, timed(fn))
    return spent


def measure(model, batch: int, prompt: int, gen: int, temperature: float, rng,
            kernels: list[float] | None = None, step: tuple[str, ...] | None = None) -> dict:
    """One run of ``batch`` requests through a fresh engine on ``model``: microseconds per step (all of
    the run's steps, prefill ones too), and decode tok/s once every request has its first token.
    ``kernels``: ``time_kernels(model)``'s list, for the time in the model's functions (else 0)."""
    kernels = kernels if kernels is not None else [0.0]
    from ferrum_runtime.engine import Engine, EngineConfig
    from ferrum_runtime.sampler import SamplingParams
    from ferrum_runtime.tokenizer import TokenizerFiles

    # with the artifact's tokenizer when it has one: detokenizing each token is part of a step
    engine = Engine(model, TokenizerFiles.of(model.manifest.path),
                    EngineConfig(enable_prefix_caching=False, max_num_seqs=max(batch, 1)))
    if step is not None:
        engine.STEP = step
    params = SamplingParams(max_tokens=gen, temperature=temperature, ignore_eos=True, seed=0)
    arrivals: list[tuple[float, int, int]] = []  # (when, tokens, request) of every delta

    async def one(i: int, ids: list[int]) -> None:
        async for d in engine.generate(ids, params):
            arrivals.append((time.perf_counter(), len(d.token_ids), i))

    async def run() -> float:
        prompts = [[int(t) for t in rng.integers(0, model.vocab_size, prompt)] for _ in range(batch)]
        arrivals.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - t0

    asyncio.run(run())  # warm-up (a fresh engine on the same model)
    before, steps0, k0 = dict(engine.seconds), engine.counters["steps"], kernels[0]
    wall = asyncio.run(run())
    # decode: the tokens after the moment every request has its first one
    start = max(min(t for t, _, r in arrivals if r == i) for i in range(batch))
    end = max(t for t, _, _ in arrivals)
    decode_tok_s = sum(n for t, n, _ in arrivals if t > start) / (end - start)
    steps = engine.counters["steps"] - steps0
    spent = {k: (engine.seconds[k] - before[k]) / steps * 1e6 for k in engine.seconds}
    step_us, kernels_us = wall / steps * 1e6, (kernels[0] - k0) / steps * 1e6
    return {"batch": batch, "order": "serial" if engine.STEP == Engine.SERIAL_STEP else "overlap", "steps": steps,
            "decode_tok_s": decode_tok_s, "step_us": step_us, "kernels_us": kernels_us,
            "model_call_us": spent["model_call"], "host_us": step_us - kernels_us,
            "model_wait_us": spent["model_wait"], "actions_us": {k.strip("_"): spent[k] for k in engine.STEP},
            "between_steps_us": step_us - sum(spent[k] for k in engine.STEP)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ab", action="store_true", help="also the text work before the launch, paired per rep")
    args = ap.parse_args()
    from ferrum_runtime.model import CompiledModel

    model = CompiledModel.load(args.artifact, kv_cache_bytes=512 << 20)
    kernels = time_kernels(model)
    rng = np.random.default_rng(0)
    out = []
    from ferrum_runtime.engine import Engine

    orders = [Engine.OVERLAP_STEP, Engine.SERIAL_STEP] if args.ab else [None]
    for b in (int(x) for x in args.batches.split(",")):
        runs = [measure(model, b, args.prompt, args.gen, args.temperature, rng, kernels, order)
                for _ in range(args.reps) for order in orders]
        out.append({"batch": b, "runs": runs})
        host = {}
        for order in sorted({r["order"] for r in runs}):
            mine = [r for r in runs if r["order"] == order]
            med = {k: statistics.median(r[k] for r in mine) for k in ("step_us", "kernels_us", "model_call_us",
                                                                       "host_us", "between_steps_us")}
            acts = {k: statistics.median(r["actions_us"][k] for r in mine) for k in mine[0]["actions_us"]}
            rate = statistics.median(r["decode_tok_s"] for r in mine)
            host[order] = med["host_us"]
            print(f"b{b} {order}: decode {rate:.1f} tok/s, step {med['step_us']:.0f} us = kernels "
                  f"{med['kernels_us']:.0f} + host {med['host_us']:.0f} (model call {med['model_call_us']:.0f}, "
                  f"between steps {med['between_steps_us']:.0f}; " + ", ".join(f"{k} {v:.0f}" for k, v in acts.items())
                  + ")", flush=True)
        if args.ab:
            print(f"b{b}: host µs per step, overlap / serial x{host['overlap'] / host['serial']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"artifact": args.artifact, "prompt": args.prompt, "gen": args.gen,
                                         "temperature": args.temperature, "batches": out}, indent=1))


if __name__ == "__main__":
    main()

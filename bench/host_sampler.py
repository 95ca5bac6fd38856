"""The host sampler (CPU artifacts sample on the host) per row, in µs. Not a test.

    python bench/host_sampler.py ROOT [--logits FILE.npy]     # time ROOT's ferrum_runtime.sampler
    python bench/host_sampler.py --record ARTIFACT FILE.npy   # save a model's decode logits to FILE.npy

ROOT is a checkout whose sampler is timed (run it for two checkouts, alternately, to compare them). Without
``--logits`` the rows are random (std 3, SmolLM2's vocabulary of 49,152): flatter than a model's, so top-p
keeps more. ``--record`` runs ARTIFACT through the engine on eight chat prompts (temperature 0.7, top_p 0.9,
seed 1, 64 tokens each) and saves every row the sampler saw. Three settings, 1 and 16 rows a call: the best
of 5 x 20 calls over the first 16 rows, then the mean over all rows one at a time.
"""

import argparse
import asyncio
import sys
import time

import numpy as np

PROMPTS = ["Write a short poem about the sea.", "Explain what a hash table is.",
           "List three fruits and their colors.", "What is the capital of France? Answer in one sentence.",
           "Tell me a story about a robot who learns to paint.", "Write a Python function for fibonacci numbers.",
           "Translate 'good morning' into Spanish and German.", "Why is the sky blue?"]


def record(artifact: str, out: str) -> None:
    import ferrum_runtime.engine as engine_mod
    from ferrum_runtime.sampler import SamplingParams

    rows: list[np.ndarray] = []
    sample = engine_mod.sample

    def recording(logits, seqs):
        rows.extend(np.array(logits, dtype=np.float32))
        return sample(logits, seqs)

    engine_mod.sample = recording
    engine = engine_mod.Engine.from_artifact(artifact)

    async def run() -> None:
        for prompt in PROMPTS:
            ids = engine.tokenizer.encode(engine.tokenizer.render_chat([{"role": "user", "content": prompt}]))
            async for _ in engine.generate(ids, SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, seed=1)):
                pass
        await engine.close()

    asyncio.run(run())
    np.save(out, np.stack(rows))
    print(f"{len(rows)} rows -> {out}")


def time_sampler(root: str, logits_file: str | None) -> None:
    sys.path.insert(0, root)
    from ferrum_runtime.sampler import SamplingParams, SequenceSampler, sample

    if logits_file:
        logits = np.load(logits_file).astype(np.float32)
    else:
        logits = (np.random.default_rng(0).standard_normal((16, 49152)) * 3).astype(np.float32)
    V = logits.shape[1]
    out = []
    for params in [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
                   SamplingParams(temperature=0.7, top_k=40, top_p=0.9)]:
        for B in (1, 16):
            seqs = [SequenceSampler(params, [1, 2, 3], V, sample_index=i) for i in range(B)]
            sample(logits[:B], seqs)
            best = 1e9
            for _ in range(5):
                n = 20
                t0 = time.perf_counter()
                for _ in range(n):
                    sample(logits[:B], seqs)
                best = min(best, (time.perf_counter() - t0) / n * 1e6 / B)
            out.append(f"T{params.temperature} p{params.top_p} k{params.top_k} B{B}: {best:.0f}")
        one = [SequenceSampler(params, [1, 2, 3], V)]
        t0 = time.perf_counter()
        for row in logits:
            sample(row[None], one)
        out.append(f"all rows: {(time.perf_counter() - t0) / len(logits) * 1e6:.0f}")
    print(root, logits_file or "random", "; ".join(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", nargs="?")
    ap.add_argument("--logits")
    ap.add_argument("--record", nargs=2, metavar=("ARTIFACT", "FILE"))
    args = ap.parse_args()
    if args.record:
        sys.path.insert(0, ".")
        record(*args.record)
    elif args.root:
        time_sampler(args.root, args.logits)
    else:
        ap.error("pass ROOT to time, or --record ARTIFACT FILE")


if __name__ == "__main__":
    main()

"""Paired decode timing of two artifacts of one model in one process (e.g. a change against the build before
it): rounds alternate A and B, each round ``--steps`` greedy decode steps of ``--batch`` sequences after a
16-token prompt, so both see the same machine state. On a shared, noisy box this resolves differences of a
few percent that separate `ferrum bench` processes do not.

    python bench/ab_decode.py ARTIFACT_A ARTIFACT_B [--batch 1,16] [--rounds 12] [--steps 32] [--prefill 512]

Not a test. Prints, per batch size, each artifact's minimum and median ms per step and the ratio A / B
(above 1: B is faster), and the raw per-round times as JSON on the last line. ``--prefill N`` adds a row
for one N-token prompt (ms for the whole prompt, fed in one call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferrum_runtime.bench import _Seqs  # noqa: E402
from ferrum_runtime.model import CompiledModel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--batch", default="1,16", help="comma-separated decode batch sizes")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=0, help="also time one prompt of this many tokens")
    args = ap.parse_args()
    models = {name: CompiledModel.load(path) for name, path in (("A", args.a), ("B", args.b))}
    rng = np.random.default_rng(0)
    vocab = min(m.vocab_size for m in models.values())
    raw: dict[str, dict[str, list[float]]] = {}
    print(f"A = {args.a}\nB = {args.b}\n")
    print("| batch | A min / median ms | B min / median ms | A / B (median) | A / B (min) |")
    print("|---|---|---|---|---|")
    cases = [("prefill", args.prefill)] if args.prefill else []
    for kind, size in cases + [("decode", int(b)) for b in args.batch.split(",")]:
        times: dict[str, list[float]] = {"A": [], "B": []}
        for _ in range(args.rounds):
            for name, model in models.items():
                if kind == "prefill":  # one prompt of `size` tokens in one call
                    seqs = _Seqs(model, 1, size)
                    prompt = [int(t) for t in rng.integers(0, vocab, size)]
                    t0 = time.perf_counter()
                    seqs.step([prompt])
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    continue
                seqs = _Seqs(model, size, 16 + args.steps + 1)
                seqs.step([[int(t) for t in rng.integers(0, vocab, 16)] for _ in range(size)])
                tokens = [[1]] * size
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tokens = [[int(t)] for t in seqs.step(tokens, greedy=True)]
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        a, b = times["A"], times["B"]
        label = f"prefill {size}" if kind == "prefill" else str(size)
        print(f"| {label} | {min(a):.2f} / {statistics.median(a):.2f} | {min(b):.2f} / {statistics.median(b):.2f} "
              f"| x{statistics.median(a) / statistics.median(b):.3f} | x{min(a) / min(b):.3f} |", flush=True)
        raw[label] = times
    print(json.dumps(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

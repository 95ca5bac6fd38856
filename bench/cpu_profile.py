"""Where a CPU step's time goes: the time of every kernel call of one prefill and of decode steps, from
an instrument on the VM (``set_instrument``: a Python callback before and after each call, a few µs of
its own per call), summed per kernel. Not a test.

    python bench/cpu_profile.py ARTIFACT [--prompt 512] [--decode 16] [--top 25]

The artifact runs as ``ferrum run`` runs it (``CompiledModel``). CPU kernels return when done, so a call's
wall time is its kernel's. Threads: ``TVM_NUM_THREADS`` as for any run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    ap.add_argument("--decode", type=int, default=16, help="decode steps profiled after the prefill")
    ap.add_argument("--top", type=int, default=25, help="kernels shown per step kind")
    args = ap.parse_args()

    import time

    from ferrum_runtime.model import CompiledModel
    from tests.ragged import RaggedDriver

    model = CompiledModel.load(args.artifact, num_blocks=4 + -(-(args.prompt + args.decode) // 16))
    totals: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
    kind, started = ["prefill"], [0.0]

    def instrument(func, symbol, before, ret, *call_args) -> int:  # every VM call, before and after
        now = time.perf_counter()
        if before:
            started[0] = now
        else:
            totals[kind[0]][str(symbol)] = totals[kind[0]].get(str(symbol), 0.0) + (now - started[0]) * 1e6
        return 0  # VMInstrumentReturnKind.NO_OP

    model.vm.set_instrument(instrument)
    rng = np.random.default_rng(0)
    drv = RaggedDriver(model, 1, args.prompt + args.decode, rng)
    prompt = [int(t) for t in rng.integers(100, model.vocab_size, args.prompt)]
    logits = drv.step([prompt])
    kind[0] = "decode"
    for _ in range(args.decode):
        logits = drv.step([[int(logits[-1].argmax())]])
    for name, steps in (("prefill", 1), ("decode", args.decode)):
        table = sorted(totals[name].items(), key=lambda kv: -kv[1])
        whole = sum(totals[name].values())
        print(f"\n{name}: {whole / steps / 1000:.2f} ms a step in kernels ({steps} step{'s' * (steps > 1)})")
        for kernel, us in table[: args.top]:
            print(f"  {us / steps / 1000:8.3f} ms  {100 * us / whole:5.1f}%  {kernel}")


if __name__ == "__main__":
    main()

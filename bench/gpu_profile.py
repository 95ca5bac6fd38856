"""Where a GPU step's time goes: per-kernel device time of ferrum's decode and prefill steps, recorded with
torch's profiler (CUPTI sees every kernel of the process, TVM's included). Runs on the device machine
after the same set-up as the proof (`bench/gpu_proof.sh profile --models qwen3-4b`); writes
gpu-profile.json and prints one table per model and step kind."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_proof import configs, make_checkpoint, pack  # noqa: E402


def profile_steps(run, steps: int) -> dict:
    """Device time per kernel over ``steps`` calls of ``run`` (after one untimed call), and the wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels: dict[str, list[float]] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = e.self_cuda_time_total if us is None else us
        if us > 0:
            kernels[e.key] = [e.count / steps, us / steps]
    busy = sum(v[1] for v in kernels.values())
    return {"wall_ms_per_step": 1e3 * wall / steps, "kernel_ms_per_step": busy / 1e3,
            "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1][1]))}


def report(name: str, kind: str, r: dict) -> None:
    print(f"\n## {name} {kind}: wall {r['wall_ms_per_step']:.3f} ms/step, kernels {r['kernel_ms_per_step']:.3f} ms/step")
    print(f"{'us/step':>9} {'calls':>6}  kernel")
    for k, (n, us) in list(r["kernels"].items())[:25]:
        print(f"{us:9.1f} {n:6.1f}  {k[:110]}")


def main() -> None:
    from ferrum_runtime.bench import _Seqs
    from ferrum_runtime.model import CompiledModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default=str(ROOT / ".gpu"))
    ap.add_argument("--work", default="/tmp/gpu-proof")
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="qwen3-4b")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    result: dict = {}
    for name in args.models.split(","):
        cfg, gptq = configs(False)[name]
        artifact = Path(args.artifacts) / name
        src, _ = make_checkpoint(name, cfg, gptq, work, "cuda")
        pack(artifact, src)
        model = CompiledModel.load(artifact, device="cuda", kv_cache_bytes=8 << 30)
        model.cuda_graph = False  # kernels launched one by one: each is its own record
        res = result[name] = {}
        for b in (1, 16):
            seqs = _Seqs(model, b, 512)
            for i in range(b):
                seqs.step([[int(t) for t in rng.integers(0, model.vocab_size, 256)] if j == i else [] for j in range(b)])
            toks = [[1]] * b

            def decode() -> None:
                nonlocal toks
                toks = [[int(t)] for t in seqs.step(toks, greedy=True)]

            res[f"decode b{b}"] = profile_steps(decode, 20)
            report(name, f"decode b{b}", res[f"decode b{b}"])
            if model.has_device_sampler:  # the same steps, tokens drawn by the sampler (T 0.7, top-k 40, top-p 0.9)
                params = np.tile(np.array([[0.7, 40, 0.9, 0.0]], np.float32), (b, 1))

                def sampled() -> None:
                    nonlocal toks
                    ids, _ = model.forward_picked(seqs.batch(toks), (params, rng.random(b).astype(np.float32)),
                                                  False, check=False)
                    toks = [[int(t)] for t in ids]

                try:
                    res[f"decode b{b} sampled"] = profile_steps(sampled, 20)
                    report(name, f"decode b{b} sampled", res[f"decode b{b} sampled"])
                except Exception as e:  # noqa: BLE001 - the prefill profile still runs
                    print(f"{name} decode b{b} sampled FAILED: {e!r}", flush=True)
        prompt = [int(t) for t in rng.integers(0, model.vocab_size, 2048)]

        def prefill() -> None:
            _Seqs(model, 1, 2049).step([prompt])

        res["pp2048"] = profile_steps(prefill, 3)
        report(name, "pp2048", res["pp2048"])
        (out / "gpu-profile.json").write_text(json.dumps(result, indent=1))
        del model
        shutil.rmtree(artifact / "weights", ignore_errors=True)


if __name__ == "__main__":
    main()

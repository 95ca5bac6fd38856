"""Decode kernels alone: read bandwidth of each Qwen3-4B linear's GEMV, float16 and GPTQ INT4, for the
layout ``quant_linear.gemv_layout`` picks and the alternatives around it (lanes per row, chunks in flight).

Here (nvcc, no GPU): ``bench/gpu_kernels.py --prepare .gpu/kernels`` compiles every variant for sm_90
into one library each (a few MiB in all; ``bench/gpu_proof.sh prepare`` runs it). On the device, after the
proof's set-up: ``bench/gpu_proof.sh kernels`` runs ``--run .gpu/kernels``, which times each variant at 1
and 4 tokens (device time from torch's profiler, random weights rotated over copies so that no call finds
them in L2), next to a torch copy of the same process, and
writes gpu-kernels.json and a table (µs, GB/s of weight bytes read, % of the copy bandwidth). The best
variant of each shape is what ``gemv_layout`` should pick; the table says where it does not. Also
``decode_wide``'s tensor-core GEMM for few tokens (float16 and INT4) at 16, 32 and 64 tokens. Then the
token pickers alone: the argmax and the sampler (greedy, temperature, top-p, top-k + top-p) over 1 and
16 rows of Qwen3's 151936 logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (in_features, out_features, gated) of Qwen3-4B's decode linears (q|k|v and gate|up fused)
SHAPES = {"qkv": (2560, 6144, False), "o": (4096, 2560, False), "gate_up": (2560, 19456, False),
          "down": (9728, 2560, True)}
FORMATS = {"fp16": None, "int4": (4, 128, True)}
TOKENS = (1, 4)
WIDE_TOKENS = (16, 32, 64)  # decode_wide's tensor-core GEMM ("skinny")
VOCAB = 151936  # Qwen3's, for the token pickers
# (temperature, top_k, top_p, min_p) of the sampler timings: the proof's sampled decode, then top-k too
SAMPLING = {"greedy": (0.0, 0, 1.0, 0.0), "T0.7 p0.9": (0.7, 0, 0.9, 0.0), "T0.7 k40 p0.9": (0.7, 40, 0.9, 0.0),
            "T1": (1.0, 0, 1.0, 0.0)}


def variants(chunks: int, rows: int) -> list[tuple[int, int, int]]:
    """The picked layout first, then each lane count that idles at most a quarter of its lanes, with 1, 2
    and 4 chunks in flight (rows per block as ``gemv_layout`` would set them for that lane count)."""
    from ferrum.schedules import quant_linear as ql

    picked = ql.gemv_layout(chunks, rows)
    out = [picked]
    for kt in (16, 32, 64, 128):
        steps = -(-chunks // kt)
        if (steps * kt - chunks) > steps * kt // 4:
            continue
        rt = ql.gemv_row_groups(kt, rows)
        for u in (1, 2, 4):
            if u <= steps and (kt, rt, u) not in out:
                out.append((kt, rt, u))
    return out


def prepare(dest: Path) -> None:
    import tvm

    from ferrum.schedules import quant_linear as ql
    from ferrum.schedules import sampling
    from ferrum_compiler.gpu_build import prepare_cuda_build

    prepare_cuda_build()
    dest.mkdir(parents=True, exist_ok=True)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    entries = []
    t0 = time.perf_counter()

    def build(name: str, func, symbol: str = "gemv") -> None:
        """``func`` compiled for sm_90 into ``dest/name.so``, its entry named ``symbol``."""
        with target:
            lib = tvm.compile(tvm.IRModule({symbol: func.with_attr("global_symbol", symbol)}), target=target)
        lib.export_library(str(dest / f"{name}.so"))
        print(f"{time.perf_counter() - t0:6.1f}s {name}", flush=True)

    for fname, f in FORMATS.items():
        fmt = None if f is None else ql.QuantFormat(*f)
        for shape, (k, n, gated) in SHAPES.items():
            chunks = k // ql.gemv_chunk(fmt, "float16", k)
            for i, layout in enumerate(variants(chunks, n)):
                name = f"{fname}-{shape}-{'-'.join(map(str, layout))}"
                build(name, ql.make_gemv_gpu(k, n, fmt, "" if fmt else "float16", "float16", "float16", None,
                                             gated=gated, layout=layout))
                entries.append({"name": name, "format": fname, "shape": shape, "in": k, "out": n, "gated": gated,
                                "layout": layout, "picked": i == 0})
            # decode_wide's tensor-core GEMM, in its layout
            build(f"{fname}-{shape}-skinny", ql.make_skinny_gemm_gpu(k, n, "float16", "float16", None, gated=gated,
                                                                     fmt=fmt))
            entries.append({"name": f"{fname}-{shape}-skinny", "format": fname, "shape": shape, "in": k, "out": n,
                            "gated": gated, "layout": list(ql.skinny_layout(k, n, 32 if fmt else 16)),
                            "picked": False, "skinny": True})
    build("argmax", sampling.make_argmax(VOCAB, "gpu"), "argmax")
    build("sample", sampling.make_sample_gpu(VOCAB), "sample")
    (dest / "kernels.json").write_text(json.dumps(entries, indent=1))


def _weights(fmt, k: int, n: int, rng) -> list[np.ndarray]:
    if fmt is None:
        return [(rng.standard_normal((n, k), np.float32) * 0.02).astype(np.float16)]
    return [rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
            (rng.random((n, k // fmt[1]), np.float32) * 0.01).astype(np.float16)]


def run(src: Path, out: Path) -> None:
    """Device time of each variant (torch's profiler, so launch overhead is not counted), with the weights
    rotated over copies of 256 MiB in all so that no call finds them in the 50 MiB L2."""
    import tvm

    from bench.gpu_profile import profile_steps
    from bench.gpu_proof import hbm_bandwidth
    from ferrum_runtime.model import load_cuda_runtime

    entries = json.loads((src / "kernels.json").read_text())
    load_cuda_runtime()  # the runtime-only TVM keeps its CUDA device API in a library of its own
    dev = tvm.cuda(0)
    bw = hbm_bandwidth("cuda")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rng = np.random.default_rng(0)
    copies: list[list] = []
    loaded, nbytes = None, 0
    rows = []
    for e in entries:
        k, n, fmt = e["in"], e["out"], FORMATS[e["format"]]
        if loaded != (e["format"], e["shape"]):
            host = _weights(fmt, k, n, rng)
            nbytes = sum(w.nbytes for w in host)
            copies = []  # one shape's weights on the device at a time
            copies = [[tvm.runtime.tensor(w, dev) for w in host] for _ in range(max(1, -(-(256 << 20) // nbytes)))]
            loaded = (e["format"], e["shape"])
        try:
            f = tvm.runtime.load_module(str(src / f"{e['name']}.so"))["gemv"]
            for ntok in (WIDE_TOKENS if e.get("skinny") else TOKENS):
                x = tvm.runtime.tensor(rng.standard_normal((ntok, 2 * k if e["gated"] else k)).astype(np.float16), dev)
                y = tvm.runtime.empty((ntok, n), "float16", dev)
                turn = [0]

                def call(f=f, x=x, y=y, turn=turn):
                    f(x, *copies[turn[0] % len(copies)], y)
                    turn[0] += 1

                us = profile_steps(call, 3 * len(copies))["kernel_ms_per_step"] * 1e3
                row = {**e, "tokens": ntok, "us": us, "GBps": nbytes / us / 1e3,
                       "of_copy": nbytes / us / 1e3 / (bw / 1e9), "weight_bytes": nbytes}
                rows.append(row)
                print(f"{e['name']:28s} {'*' if e['picked'] else ' '} T={ntok}  {us:8.2f} us  {row['GBps']:7.0f} GB/s "
                      f"{100 * row['of_copy']:5.1f}% of copy", flush=True)
        except Exception as exc:  # one variant failing must not cost the others
            rows.append({**e, "error": repr(exc)})
            print(f"{e['name']}: FAILED {exc!r}", flush=True)
    report: dict = {"copy_GBps": bw / 1e9, "rows": rows}
    (out / "gpu-kernels.json").write_text(json.dumps(report, indent=1))
    report["pickers"] = pickers_time(src, dev, rng)
    (out / "gpu-kernels.json").write_text(json.dumps(report, indent=1))
    best: dict[tuple, dict] = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["format"], r["shape"], r["tokens"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("\nbest per shape (* = the picked layout is the best)")
    for (fm, sh, t), r in best.items():
        layout = "-".join(map(str, r["layout"]))
        print(f"{fm} {sh:8s} T={t}: {layout:10s} {r['GBps']:6.0f} GB/s {'*' if r['picked'] else ''}")


def pickers_time(src: Path, dev, rng) -> list[dict]:
    """Device time of the argmax and of the sampler over Qwen3-sized logits rows, 1 and 16 rows."""
    import tvm

    from bench.gpu_profile import profile_steps

    out = []
    for rows in (1, 16):
        logits = tvm.runtime.tensor((rng.standard_normal((rows, VOCAB)) * 3).astype(np.float32), dev)
        ids = tvm.runtime.empty((rows,), "int32", dev)
        try:
            argmax = tvm.runtime.load_module(str(src / "argmax.so"))["argmax"]
            us = profile_steps(lambda: argmax(logits, ids), 20)["kernel_ms_per_step"] * 1e3
            out.append({"kernel": "argmax", "rows": rows, "us": us})
            print(f"argmax  rows={rows:2d}  {us:8.1f} us", flush=True)
            sample = tvm.runtime.load_module(str(src / "sample.so"))["sample"]
            for name, params in SAMPLING.items():
                p = tvm.runtime.tensor(np.tile(np.array(params, np.float32), (rows, 1)), dev)
                u = tvm.runtime.tensor(rng.random(rows).astype(np.float32), dev)
                us = profile_steps(lambda p=p, u=u: sample(logits, p, u, ids), 20)["kernel_ms_per_step"] * 1e3
                out.append({"kernel": "sample", "sampling": name, "rows": rows, "us": us})
                print(f"sample  rows={rows:2d}  {name:14s} {us:8.1f} us", flush=True)
        except Exception as exc:  # keep what ran
            out.append({"rows": rows, "error": repr(exc)})
            print(f"pickers rows={rows}: FAILED {exc!r}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", type=Path, help="compile the variants into this folder (here, with nvcc)")
    ap.add_argument("--run", type=Path, help="time the variants compiled into this folder (on the GPU)")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
    if args.run:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.run, args.out)


if __name__ == "__main__":
    main()

"""Decode kernels alone: read bandwidth of each Qwen3-4B linear's GEMV, float16 and GPTQ INT4, for the
layout ``quant_linear.gemv_layout`` picks and the alternatives around it (lanes per row, loads issued a
step ahead, passes of one token instead of four, 2 rows per thread instead of 4, the RMSNorm folded into
the prologue or the residual add into the epilogue, beside the add + RMSNorm kernel they replace; the down
GEMV without SiLU·mul inside, ``-plain``), and for INT4 the float16-pair math (``half_math``) and
integer dot products on int8 activations (``-dp4a``: ``make_quantize_dp4a_gpu`` then
``make_gemv_dp4a_gpu``, both in the time; ``-dp4aq``: its lanes quantizing the activations); each variant's
output is checked against the picked layout's (max difference over the largest output, printed
as ``diff``).

Here (nvcc, no GPU): ``bench/gpu_kernels.py --prepare .gpu/kernels`` compiles every variant for sm_90
into one library each (a few MiB in all; ``bench/gpu_proof.sh prepare`` runs it). On the device, after the
proof's set-up: ``bench/gpu_proof.sh kernels`` runs ``--run .gpu/kernels``, which times each variant at 1
and 4 tokens (device time from torch's profiler, random weights rotated over copies so that no call finds
them in L2), next to a torch copy of the same process, and
writes gpu-kernels.json and a table (µs, GB/s of weight bytes read, % of the copy bandwidth). The best
variant of each shape is what ``gemv_layout`` should pick; the table says where it does not. Then the
token pickers alone: the argmax and the sampler (greedy, temperature, top-p, top-k, top-k + top-p, min_p)
over 1 and 16 rows of Qwen3's 151936 logits, flat and peaked, each beside the same picker as of
``PICKERS_BASE`` (the revision before 16-byte row loads and multisection searches; built from git here)
with the same inputs, and whether the two picked the same ids. Then one layer's decode attention (split
kernel and merge) at 1 and 16 sequences of 384 and 2048 keys, for 64-, 32- and 16-key tiles and split
counts from 1 to 64. First of all, the many-token linears on tensor-core mma's (``FERRUM_MMA_LINEAR``,
``mma_linear.make_mma_linear_gpu``) at 16, 32 and 64 tokens, float16, in the picked layout and the ones
around it (column splits, row fragments a warp, tokens a pass, steps loaded at a time), beside torch's
``F.linear`` (cuBLAS) on the same weights and activations, each checked against a float32 product. Second,
one layer's prefill attention (Qwen3-4B's heads; 1 x 2048, 4 x 512 and 16 x 128 prompt tokens): the
two-pass wmma kernel ``forward`` runs today, the one-pass ``mma.sync`` one (``FERRUM_FLASH_ATTENTION``) and
torch's ``scaled_dot_product_attention`` on the same tensors, each checked against torch's output. Third,
the prefill linears (512 and 2048 tokens) on ``mma_linear.make_mma_gemm_gpu``, float16 and INT4 weights,
beside torch's ``F.linear`` (cuBLAS) on the same (dequantized) float16 weights, each checked against it.
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
VOCAB = 151936  # Qwen3's, for the token pickers
# (temperature, top_k, top_p, min_p) of the sampler timings: the proof's sampled decode, then top-k too
SAMPLING = {"greedy": (0.0, 0, 1.0, 0.0), "T0.7 p0.9": (0.7, 0, 0.9, 0.0), "T0.7 k40 p0.9": (0.7, 40, 0.9, 0.0),
            "T0.7 k40": (0.7, 40, 1.0, 0.0), "T1 min_p0.05": (1.0, 0, 1.0, 0.05), "T1": (1.0, 0, 1.0, 0.0)}


# the token pickers' baseline: schedules/{sampling,block_reduce}.py at this revision, built beside today's
PICKERS_BASE = "e83894c"

# Qwen3-4B's attention, for the decode attention's split sweep; shared bytes that give 64-, 32- and 16-key tiles
ATTENTION = {"heads": 32, "kv_heads": 8, "head_dim": 128, "block_size": 16}
ATTENTION_SHARED = (40 * 1024, 24 * 1024, 12 * 1024)
MMA_TOKENS = (16, 32, 64)  # decode steps of many sequences: decode's largest, decode_wide's
PREFILL = ((1, 2048), (4, 512), (16, 128))  # (sequences, prompt tokens each) of a prefill step's attention
GEMM_TOKENS = (512, 2048)  # prefill steps for the mma.sync GEMM against cuBLAS
GEMM_INT4 = (4, 128, True)  # the INT4 GEMM's format: GPTQ's symmetric groups of 128


def mma_variants(k: int, n: int, fmt=None) -> list[tuple[tuple[int, int], int, int]]:
    """``(layout, n_frags, unroll)`` of ``make_mma_linear_gpu``: the picked ones first (what the lowering
    builds: 32 tokens a pass dense, 16 INT4; ``mma_unroll``'s steps at a time), then each changed alone:
    twice and half the column splits, the other row-fragment count, the other tokens a pass, 2 or 1 steps
    loaded at a time (whichever is not the pick) and 4 (those that build for the shape)."""
    from ferrum.schedules import mma_linear as ml

    rf, ks = ml.mma_linear_layout(k, n, fmt)
    u = ml.mma_unroll(ks)
    nf, other = (ml.MMA_N_FRAGS, 2) if fmt is None else (2, ml.MMA_N_FRAGS)
    todo = [((rf, ks), nf, u), ((rf, ks * 2), nf, ml.mma_unroll(ks * 2)), ((rf, ks // 2), nf, ml.mma_unroll(ks // 2)),
            ((3 - rf, ks), nf, u), ((rf, ks), other, u), ((rf, ks), nf, 3 - u), ((rf, ks), nf, 4)]
    return [(lay, f, un) for lay, f, un in todo if 1 <= lay[1] <= ml.MMA_WARPS_MAX and n % (16 * lay[0]) == 0
            and ml.mma_shared_bytes(lay[0], lay[1], f) <= ml.MMA_SHARED]
CONTEXTS = (384, 2048)  # keys per sequence: the proof's decode (256 + 128) and a long one


def pa_rows() -> int:
    """Query rows of a decode attention tile: one token's query heads per KV head."""
    return ATTENTION["heads"] // ATTENTION["kv_heads"]


def variants(chunks: int, rows: int, gated: bool = False, parts: int = 1) -> list[tuple[tuple[int, int, int], dict]]:
    """``(layout, make_gemv_gpu options)``: the picked layout first, then with the next step group's loads
    issued ahead (``prefetch``), then passes of one token (``tokens=1``: a quarter of the accumulators, so
    more blocks per SM) with and without, then at one token per pass each lane count that idles at most a
    quarter of its lanes (rows per block as ``gemv_layout`` would set them for that lane count), and with 2
    and 8 rows per thread instead of 4 (``-r2``, ``-r8``); FERRUM_GEMV_NORMS's forms (``parts``: the
    partial sums of squares a deferred norm's reader adds). More chunks
    in flight per step (2, 4) and 4-token passes at other lane counts lost on the H200 runs of 2026-11-26."""
    from ferrum.schedules import quant_linear as ql

    picked = ql.gemv_layout(chunks, rows)
    out = [(picked, {}), (picked, {"prefetch": True}), (picked, {"tokens": 1}),
           (picked, {"tokens": 1, "prefetch": True})]
    # FERRUM_GEMV_NORMS's kernels, at 1 token per pass and 4: those that read a norm finish it (float32
    # input, the partial sums of squares), those whose output is a residual add it and begin the next norm
    reads = gated is False and rows != 2560
    fold = {"norm_eps": 1e-6, "norm_parts": parts} if reads else {"residual": True, "norm_next": "float16"}
    out += [(ql.gemv_norm_layout(chunks, rows, t) if reads else picked, dict(fold, tokens=t))
            for t in (1, ql.GEMV_TOKENS)]
    out.append((picked, {"tokens": 1, "rows_per_thread": 2}))  # twice the threads for the same rows
    # half the threads: each activation a lane loads (and, gated, SiLU-multiplies) serves 8 rows, not 4; INT4
    # rows are 4 bits a weight, so at 4 rows a team loads as many bytes of activations as of weights
    out.append((picked, {"tokens": 1, "rows_per_thread": 8}))
    for kt in (16, 32, 64, 128):
        steps = -(-chunks // kt)
        if (steps * kt - chunks) > steps * kt // 4 or kt == picked[0]:
            continue
        out.append(((kt, ql.gemv_row_groups(kt, rows), 1), {"tokens": 1}))
    return out


def variant_name(fname: str, shape: str, layout, opts: dict) -> str:
    return "-".join([fname, shape, *map(str, layout)] + (["t1"] if opts.get("tokens") == 1 else [])
                    + (["pf"] if opts.get("prefetch") else []) + (["h2"] if opts.get("half_math") else [])
                    + (["norm"] if opts.get("norm_eps") else []) + (["res"] if opts.get("residual") else [])
                    + (["nx"] if opts.get("norm_next") else [])
                    + ([f"r{opts['rows_per_thread']}"] if "rows_per_thread" in opts else [])
                    + (["plain"] if opts.get("gated") is False else []) + (["dp4a"] if opts.get("dp4a") else [])
                    + (["dp4aq"] if opts.get("dp4aq") else []) + (["silu"] if opts.get("gate_out") else []))


def prepare(dest: Path) -> None:
    import tvm

    from ferrum.schedules import mma_linear as ml
    from ferrum.schedules import norm, sampling
    from ferrum.schedules import paged_attention as pa
    from ferrum.schedules import quant_linear as ql
    from ferrum_compiler.gpu_build import prepare_cuda_build

    prepare_cuda_build()
    dest.mkdir(parents=True, exist_ok=True)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    entries = []
    t0 = time.perf_counter()

    def build(name: str, func, symbol: str = "gemv", more: dict | None = None) -> None:
        """``func`` compiled for sm_90 into ``dest/name.so``, its entry named ``symbol`` (and ``more``:
        other entries by name)."""
        funcs = {symbol: func, **(more or {})}
        with target:
            lib = tvm.compile(tvm.IRModule({s: f.with_attr("global_symbol", s) for s, f in funcs.items()}),
                              target=target)
        lib.export_library(str(dest / f"{name}.so"))
        print(f"{time.perf_counter() - t0:6.1f}s {name}", flush=True)

    for fname, f in FORMATS.items():
        fmt = None if f is None else ql.QuantFormat(*f)
        for shape, (k, n, gated) in SHAPES.items():
            chunks = k // ql.gemv_chunk(fmt, "float16", k)
            # a deferred norm's partial sums: one per block of the o GEMV that begins it
            parts = ql.gemv_row_blocks(SHAPES["o"][0], SHAPES["o"][1], fmt, "" if fmt else "float16")
            todo = variants(chunks, n, gated, parts)
            if fmt is not None and fmt.bits == 4 and fmt.sym:  # the float16-pair INT4 math, in the picked layout,
                todo += [(todo[0][0], {"half_math": True}), (todo[0][0], {"half_math": True, "tokens": 1}),
                         (todo[0][0], {"dp4a": True, "tokens": 1}), (todo[0][0], {"dp4a": True}),  # and dp4a's,
                         (todo[0][0], {"dp4aq": True, "tokens": 1}), (todo[0][0], {"dp4aq": True})]  # in-lane too
            if gated:  # the down GEMV reading SiLU·mul's output instead of computing it per block (what the
                todo += [(todo[0][0], {"gated": False, "tokens": 1}), (todo[0][0], {"gated": False})]  # lowering
            if shape == "gate_up":  # builds since 2026-11-27k, beside the gate|up GEMV writing that output)
                todo += [(todo[0][0], {"gate_out": True, "tokens": 1}), (todo[0][0], {"gate_out": True})]
            for i, (layout, opts) in enumerate(todo):
                name = variant_name(fname, shape, layout, opts)
                opts = {"gated": gated, **opts}
                if opts.get("dp4a"):  # the activations' quantize kernel beside it, in the same library
                    build(name, ql.make_gemv_dp4a_gpu(k, n, fmt, "float16", layout=layout,
                                                      tokens=opts.get("tokens", ql.GEMV_TOKENS)),
                          more={"quantize": ql.make_quantize_dp4a_gpu(k, "float16", gated)})
                elif opts.get("dp4aq"):  # ... or quantized by its lanes (the float GEMV's arguments)
                    build(name, ql.make_gemv_dp4a_gpu(k, n, fmt, "float16", layout=layout, x_dtype="float16",
                                                      gated=gated, tokens=opts.get("tokens", ql.GEMV_TOKENS)))
                else:
                    x_dtype = "float32" if opts.get("norm_eps") else "float16"  # a deferred norm's h * w
                    build(name, ql.make_gemv_gpu(k, n, fmt, "" if fmt else "float16", x_dtype, "float16", None,
                                                 layout=layout, **opts))
                entries.append({"name": name, "format": fname, "shape": shape, "in": k, "out": n,
                                "layout": layout, "picked": i == 0, **opts})
                if opts.get("norm_next"):  # the partial sums of squares it writes per token
                    entries[-1]["norm_blocks"] = ql.gemv_row_blocks(k, n, fmt, "" if fmt else "float16")
    mma_entries = []
    for fname, f in FORMATS.items():
        fmt = None if f is None else ql.QuantFormat(*f)
        for shape, (k, n, _gated) in SHAPES.items():  # the down linear reads SiLU·mul's output on this path
            for i, (layout, nf, u) in enumerate(mma_variants(k, n, fmt)):
                name = f"mma-{fname}-{shape}-{layout[0]}x{layout[1]}-n{nf}-u{u}"
                build(name, ml.make_mma_linear_gpu(k, n, "float16", "float16", layout=layout, n_frags=nf, unroll=u,
                                                   fmt=fmt), "mma")
                mma_entries.append({"name": name, "format": fname, "shape": shape, "in": k, "out": n,
                                    "layout": layout, "n_frags": nf, "unroll": u, "picked": i == 0})
    (dest / "mma.json").write_text(json.dumps(mma_entries, indent=1))
    for sb in ATTENTION_SHARED:  # decode attention at 64-, 32- and 16-key tiles, and the merge
        kc = pa.split_key_tile(pa_rows(), ATTENTION["head_dim"], "float16", sb)
        build(f"attention-{kc}", pa.make_attention_gpu(ATTENTION["heads"], ATTENTION["kv_heads"], ATTENTION["head_dim"],
                                                       ATTENTION["block_size"], "float16", tile_tokens=1,
                                                       shared_bytes=sb), "attention")
    h, kvh, d, bs = (ATTENTION[k] for k in ("heads", "kv_heads", "head_dim", "block_size"))
    build("prefill-tc", pa.make_prefill_attention_tc(h, kvh, d, bs, "float16"), "attention")
    build("prefill-fa", pa.make_prefill_attention_mma(h, kvh, d, bs, "float16"), "attention")
    build("prefill-fa32", pa.make_prefill_attention_mma(h, kvh, d, bs, "float16", keys=32), "attention")
    for shape, (k, n, _gated) in SHAPES.items():  # the prefill linears on mma.sync (make_mma_gemm_gpu)
        build(f"gemm-{shape}", ml.make_mma_gemm_gpu(k, n, "float16", "float16"), "gemm")
        build(f"gemm4-{shape}", ml.make_mma_gemm_gpu(k, n, "float16", "float16", fmt=ql.QuantFormat(*GEMM_INT4)),
              "gemm")
    build("attention-merge", pa.make_attention_merge_gpu(ATTENTION["heads"], ATTENTION["head_dim"], "float16"),
          "merge")
    build("attention-merged", pa.make_attention_gpu(h, kvh, d, bs, "float16", tile_tokens=1, merged=True),
          "attention")  # FERRUM_MERGED_ATTENTION's split kernel, merging itself (the 64-key tile)
    build("add-rms-norm", norm.make_add_rms_norm_gpu(SHAPES["qkv"][0], "float16", "float16", 1e-6), "norm")
    build("argmax", sampling.make_argmax(VOCAB, "gpu"), "argmax")
    build("sample", sampling.make_sample_gpu(VOCAB), "sample")
    base = _sampling_at(PICKERS_BASE, dest / "pickers-base")
    build("argmax-base", base.make_argmax(VOCAB, "gpu"), "argmax")
    build("sample-base", base.make_sample_gpu(VOCAB), "sample")
    (dest / "kernels.json").write_text(json.dumps(entries, indent=1))


def _sampling_at(rev: str, where: Path):
    """``schedules/sampling.py`` as of git revision ``rev``, imported (with the ``block_reduce.py`` of
    that revision beside it) from a package written under ``where``."""
    import importlib
    import subprocess

    pkg = where / "pickers_base"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in ("sampling.py", "block_reduce.py"):
        (pkg / name).write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:schedules/{name}"],
                                               check=True, capture_output=True, text=True).stdout)
    sys.path.insert(0, str(where))
    return importlib.import_module("pickers_base.sampling")


def _weights(fmt, k: int, n: int, rng) -> list[np.ndarray]:
    if fmt is None:
        return [(rng.standard_normal((n, k), np.float32) * 0.02).astype(np.float16)]
    return [rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
            (rng.random((n, k // fmt[1]), np.float32) * 0.01).astype(np.float16)]


def _weights_and_twin(fmt, k: int, n: int, rng) -> tuple[list[np.ndarray], np.ndarray]:
    """``_weights`` and their dense float16 twin (the dequantized weights for INT4), which torch's
    ``F.linear`` multiplies by as the peer."""
    from ferrum.schedules.quant_linear import QuantFormat, dequantize_ref

    host = _weights(fmt, k, n, rng)
    if fmt is None:
        return host, host[0]
    return host, dequantize_ref(QuantFormat(*fmt), host[0], host[1].astype(np.float32), None).astype(np.float16)


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
    report: dict = {"copy_GBps": bw / 1e9}
    for key, section in (("mma", lambda: mma_time(src, dev, rng, bw)),  # the unmeasured kernels first, each
                         ("prefill_attention", lambda: prefill_attention_time(src, dev, rng)),  # kept as it ends
                         ("gemm", lambda: gemm_time(src, dev, rng))):
        report[key] = section()
        (out / "gpu-kernels.json").write_text(json.dumps(report, indent=1))
    copies: list[list] = []
    loaded, nbytes = None, 0
    rows = []
    inputs: dict[tuple, object] = {}  # (format, shape, tokens, gated): the activations every variant gets
    picked_out: dict[tuple, np.ndarray] = {}  # ... and the picked layout's output for them
    for e in entries:
        k, n, fmt = e["in"], e["out"], FORMATS[e["format"]]
        if loaded != (e["format"], e["shape"]):
            host = _weights(fmt, k, n, rng)
            nbytes = sum(w.nbytes for w in host)
            copies = []  # one shape's weights on the device at a time
            copies = [[tvm.runtime.tensor(w, dev) for w in host] for _ in range(max(1, -(-(256 << 20) // nbytes)))]
            loaded = (e["format"], e["shape"])
        try:
            lib = tvm.runtime.load_module(str(src / f"{e['name']}.so"))
            gemv = lib["gemv"]
            for ntok in TOKENS:
                key = (e["format"], e["shape"], ntok, e["gated"])
                if key not in inputs:
                    xh = rng.standard_normal((ntok, 2 * k if e["gated"] else k))
                    inputs[key] = tvm.runtime.tensor(xh.astype(np.float16), dev)
                    inputs[key + ("float32",)] = tvm.runtime.tensor(xh.astype(np.float16).astype(np.float32), dev)
                x = inputs[key + ("float32",)] if e.get("norm_eps") else inputs[key]
                y = tvm.runtime.empty((ntok, n // 2 if e.get("gate_out") else n), "float16", dev)
                f = gemv
                if e.get("dp4a"):  # its activations quantized first, as a model would: both kernels timed
                    bufs = [tvm.runtime.empty((ntok, k // 4), "int32", dev),
                            tvm.runtime.empty((ntok, k // 32), "float32", dev),
                            tvm.runtime.empty((ntok, k // 32), "int32", dev)]

                    def quantized(x, *rest, quantize=lib["quantize"], gemv=gemv, bufs=bufs):
                        quantize(x, *bufs)
                        gemv(*bufs, *rest)

                    f = quantized
                # a deferred norm's partial sums of squares (making its 1 / rms 1: the output stays comparable),
                # the residual (zeros), the next norm's weights (ones) and what a GEMV that begins it writes
                pre = []
                if e.get("norm_eps"):
                    ss = np.zeros((ntok, e["norm_parts"]), np.float32)
                    ss[:, 0] = k * (1 - 1e-6)
                    pre = [tvm.runtime.tensor(ss, dev)]
                post = [tvm.runtime.tensor(np.zeros((ntok, n), np.float16), dev)] if e.get("residual") else []
                extra = []
                if e.get("norm_next"):
                    blocks = e["norm_blocks"]
                    post.append(tvm.runtime.tensor(np.ones(n, np.float16), dev))
                    extra = [tvm.runtime.empty((ntok, n), "float32", dev),
                             tvm.runtime.empty((ntok, blocks), "float32", dev)]
                f(x, *pre, *copies[0], *post, y, *extra)  # the output, against the picked layout's on the same input
                got = y.numpy().astype(np.float32)
                if e["picked"]:
                    picked_out[key] = got
                ref = picked_out.get(key)
                if e.get("gate_out") and ref is not None:  # SiLU·mul of the picked layout's gate|up output
                    ref = ref[:, :n // 2] / (1 + np.exp(-ref[:, :n // 2])) * ref[:, n // 2:]
                diff = None if ref is None else float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
                turn = [0]

                def call(f=f, x=x, y=y, turn=turn, pre=pre, post=post, extra=extra):
                    f(x, *pre, *copies[turn[0] % len(copies)], *post, y, *extra)
                    turn[0] += 1

                us = profile_steps(call, 3 * len(copies))["kernel_ms_per_step"] * 1e3
                row = {**e, "tokens": ntok, "us": us, "GBps": nbytes / us / 1e3,
                       "of_copy": nbytes / us / 1e3 / (bw / 1e9), "weight_bytes": nbytes, "max_rel_diff": diff}
                rows.append(row)
                print(f"{e['name']:28s} {'*' if e['picked'] else ' '} T={ntok}  {us:8.2f} us  {row['GBps']:7.0f} GB/s "
                      f"{100 * row['of_copy']:5.1f}% of copy" + ("" if diff is None else f"  diff {diff:.1e}"),
                      flush=True)
        except Exception as exc:  # one variant failing must not cost the others
            rows.append({**e, "error": repr(exc)})
            print(f"{e['name']}: FAILED {exc!r}", flush=True)
    report["rows"] = rows
    (out / "gpu-kernels.json").write_text(json.dumps(report, indent=1))
    report["norm"] = norm_time(src, dev, rng)
    (out / "gpu-kernels.json").write_text(json.dumps(report, indent=1))
    report["pickers"] = pickers_time(src, dev, rng)
    (out / "gpu-kernels.json").write_text(json.dumps(report, indent=1))
    report["attention"] = attention_time(src, dev, rng)
    (out / "gpu-kernels.json").write_text(json.dumps(report, indent=1))
    best: dict[tuple, dict] = {}
    for r in rows:
        if "error" in r or r.get("gated") is False and r["shape"] == "down" or r.get("gate_out"):  # another
            # split of the work (plain: no SiLU·mul; silu: SiLU·mul's output written), not a layout candidate
            continue
        key = (r["format"], r["shape"], r["tokens"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("\nbest per shape (* = the picked layout is the best)")
    for (fm, sh, t), r in best.items():
        print(f"{fm} {sh:8s} T={t}: {r['name']:28s} {r['us']:7.2f} us {r['GBps']:6.0f} GB/s "
              f"{'*' if r['picked'] else ''}")


def mma_time(src: Path, dev, rng, bw: float) -> list[dict]:
    """Device time of each ``make_mma_linear_gpu`` variant and of torch's ``F.linear`` (cuBLAS, float16
    weights: for the INT4 rows, what the same linear costs dense) at ``MMA_TOKENS`` tokens, the weights
    rotated over 256 MiB of copies (both sides), each output against the float32 product of the
    (dequantized) weights (``max_rel_diff``: over the largest output)."""
    import torch
    import tvm

    from bench.gpu_profile import profile_steps

    path = src / "mma.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    rows: list[dict] = []
    loaded: dict = {}  # variant -> its kernel, loaded once for the 3 token counts
    for fname, shape in dict.fromkeys((e.get("format", "fp16"), e["shape"]) for e in entries):
        group = [e for e in entries if (e.get("format", "fp16"), e["shape"]) == (fname, shape)]
        k, n, f = group[0]["in"], group[0]["out"], FORMATS[fname]
        try:
            host, w = _weights_and_twin(f, k, n, rng)
            nbytes = sum(t.nbytes for t in host)
            count = max(1, -(-(256 << 20) // nbytes))
            copies = [[tvm.runtime.tensor(t, dev) for t in host] for _ in range(count)]
            peer = [torch.from_numpy(w).cuda() for _ in range(max(1, -(-(256 << 20) // w.nbytes)))]
        except Exception as exc:  # noqa: BLE001 - keep what ran
            rows.append({"format": fname, "shape": shape, "error": repr(exc)})
            print(f"mma {fname} {shape}: FAILED {exc!r}", flush=True)
            continue
        for ntok in MMA_TOKENS:
            xh = rng.standard_normal((ntok, k)).astype(np.float16)
            ref = xh.astype(np.float32) @ w.astype(np.float32).T
            x, tx = tvm.runtime.tensor(xh, dev), torch.from_numpy(xh).cuda()
            y = tvm.runtime.empty((ntok, n), "float16", dev)
            for e in [{"name": f"torch-linear-{fname}", "format": fname, "shape": shape, "in": k, "out": n,
                       "picked": False}] + group:
                try:
                    turn = [0]
                    if e["name"].startswith("torch-linear"):
                        got = torch.nn.functional.linear(tx, peer[0]).float().cpu().numpy()
                        moved = w.nbytes

                        def call(turn=turn, tx=tx, peer=peer):
                            torch.nn.functional.linear(tx, peer[turn[0] % len(peer)])
                            turn[0] += 1
                    else:
                        if e["name"] not in loaded:
                            loaded[e["name"]] = tvm.runtime.load_module(str(src / f"{e['name']}.so"))["mma"]
                        fn = loaded[e["name"]]
                        fn(x, *copies[0], y)
                        got = y.numpy().astype(np.float32)
                        moved = nbytes

                        def call(fn=fn, x=x, y=y, turn=turn, copies=copies, count=count):
                            fn(x, *copies[turn[0] % count], y)
                            turn[0] += 1

                    us = profile_steps(call, 3 * count)["kernel_ms_per_step"] * 1e3
                    diff = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
                    row = {**e, "tokens": ntok, "us": us, "GBps": moved / us / 1e3,
                           "of_copy": moved / us / 1e3 / (bw / 1e9), "max_rel_diff": diff}
                    rows.append(row)
                    print(f"{e['name']:28s} {'*' if e['picked'] else ' '} T={ntok:2d}  {us:8.2f} us  "
                          f"{row['GBps']:7.0f} GB/s {100 * row['of_copy']:5.1f}% of copy  diff {diff:.1e}", flush=True)
                except Exception as exc:  # noqa: BLE001 - one variant failing must not cost the others
                    rows.append({**e, "tokens": ntok, "error": repr(exc)})
                    print(f"{e['name']} T={ntok}: FAILED {exc!r}", flush=True)
    return rows


def _time_against(call, out, ref: np.ndarray, flops: float, row: dict, label: str) -> dict:
    """``row`` with the device time of ``call`` (20 calls, torch's profiler), its TFLOP/s for ``flops`` and
    the largest difference from ``ref`` (relative to ``ref``'s largest) of ``out``, the tensor one ``call``
    writes (None: ``call`` is the peer that computed ``ref``); printed after ``label``. A failure becomes
    the row's ``error``: one kernel failing must not cost the others."""
    from bench.gpu_profile import profile_steps

    try:
        got = ref
        if out is not None:
            call()
            got = out.numpy().astype(np.float32)
        us = profile_steps(call, 20)["kernel_ms_per_step"] * 1e3
    except Exception as exc:  # noqa: BLE001 - reported in the row and the log
        print(f"{label}: FAILED {exc!r}", flush=True)
        return {**row, "error": repr(exc)}
    diff = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
    print(f"{label} {us:9.1f} us {flops / us / 1e6:6.1f} TFLOP/s diff {diff:.1e}", flush=True)
    return {**row, "us": us, "TFLOPs": flops / us / 1e6, "max_rel_diff": diff}


def prefill_attention_time(src: Path, dev, rng) -> list[dict]:
    """Device time of one layer's prefill attention (Qwen3-4B's heads, float16; ``PREFILL``'s fresh prompts,
    each token attending causally to its own prompt) for the two-pass wmma kernel ``forward`` runs
    (``prefill-tc``), FERRUM_FLASH_ATTENTION's one-pass ``mma.sync`` kernel (``prefill-fa``; ``-fa32``: its
    steps of 32 keys instead of 64, 176 registers instead of 255) and torch's
    causal ``scaled_dot_product_attention`` (``torch-sdpa``, the KV heads repeated for it beforehand) on the
    same queries, keys and values; TFLOP/s of the causal products (4 x heads x head size x the keys each
    query attends); each output against torch's (``max_rel_diff``: over its largest)."""
    import torch
    import tvm

    h, kvh, d, bs = (ATTENTION[k] for k in ("heads", "kv_heads", "head_dim", "block_size"))
    rows: list[dict] = []
    try:
        kernels = {name: tvm.runtime.load_module(str(src / f"{name}.so"))["attention"]
                   for name in ("prefill-tc", "prefill-fa", "prefill-fa32")}
    except Exception as exc:  # noqa: BLE001 - keep what ran before
        print(f"prefill attention: FAILED to load {exc!r}", flush=True)
        return [{"error": repr(exc)}]
    for seqs, plen in PREFILL:
        try:
            ntok, m = seqs * plen, -(-plen // bs)
            qh = rng.standard_normal((ntok, h, d)).astype(np.float16)
            kv = rng.standard_normal((2, seqs, m * bs, kvh, d)).astype(np.float16)  # padded to whole blocks
            # sequence s's position p: block s * m + p // bs, slot p % bs
            cache = kv.reshape(2, seqs, m, bs, kvh, d).transpose(1, 2, 0, 4, 3, 5).reshape(seqs * m, 2, kvh, bs, d)
            args = [tvm.runtime.tensor(a, dev) for a in (
                qh, np.ascontiguousarray(cache), np.tile(np.arange(plen, dtype=np.int32), seqs),
                np.arange(seqs + 1, dtype=np.int32) * plen, np.arange(seqs * m, dtype=np.int32).reshape(seqs, m))]
            y = tvm.runtime.empty((ntok, h, d), "float16", dev)
            tq = torch.from_numpy(qh).cuda().view(seqs, plen, h, d).transpose(1, 2)
            tk, tv = (torch.from_numpy(np.ascontiguousarray(kv[i, :, :plen])).cuda().transpose(1, 2)
                      .repeat_interleave(h // kvh, dim=1) for i in (0, 1))
            ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            ref_np = ref.transpose(1, 2).reshape(ntok, h, d).float().cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - keep what ran
            rows.append({"seqs": seqs, "tokens": plen, "error": repr(exc)})
            print(f"prefill attention {seqs}x{plen}: FAILED {exc!r}", flush=True)
            continue
        flops = 4 * h * d * seqs * plen * (plen + 1) / 2
        for name in ("torch-sdpa", "prefill-tc", "prefill-fa", "prefill-fa32"):
            if name == "torch-sdpa":
                def call(tq=tq, tk=tk, tv=tv):
                    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            else:
                def call(fn=kernels[name], args=args, y=y):
                    fn(*args, y)
            rows.append(_time_against(call, None if name == "torch-sdpa" else y, ref_np, flops,
                                      {"kernel": name, "seqs": seqs, "tokens": plen},
                                      f"prefill attention {seqs:2d}x{plen:4d} {name:12s}"))
    return rows


def gemm_time(src: Path, dev, rng) -> list[dict]:
    """Device time of each Qwen3-4B linear at ``GEMM_TOKENS`` prefill tokens on ``make_mma_gemm_gpu``, float16
    weights (``mma-gemm``) and INT4 ones (``mma-gemm-int4``, ``GEMM_INT4``: what FERRUM_MMA_GEMM gives the
    GPTQ model), and on torch's ``F.linear`` (cuBLAS) over the same float16 weights (for INT4: dequantized),
    same activations; TFLOP/s, and each GEMM's output against cuBLAS's (``max_rel_diff``: over its largest).
    dlight's matmuls, which ``forward`` runs today, did 204-245 TFLOP/s at 2048 tokens on an H200 (float16,
    docs/bench/2026-11-26b-gpu-h200.md)."""
    import torch
    import tvm

    rows: list[dict] = []
    for shape, (k, n, _gated) in SHAPES.items():
        for kind in ("float16", "int4"):
            try:
                gemm = tvm.runtime.load_module(str(src / f"gemm{'4' if kind == 'int4' else ''}-{shape}.so"))["gemm"]
                host, wh = _weights_and_twin(GEMM_INT4 if kind == "int4" else None, k, n, rng)
                weights = [tvm.runtime.tensor(t, dev) for t in host]
                tw = torch.from_numpy(wh).cuda()
            except Exception as exc:  # noqa: BLE001 - keep what ran
                rows.append({"shape": shape, "weights": kind, "error": repr(exc)})
                print(f"gemm {shape} {kind}: FAILED {exc!r}", flush=True)
                continue
            for ntok in GEMM_TOKENS:
                xh = rng.standard_normal((ntok, k)).astype(np.float16)
                x, tx = tvm.runtime.tensor(xh, dev), torch.from_numpy(xh).cuda()
                y = tvm.runtime.empty((ntok, n), "float16", dev)
                ref = torch.nn.functional.linear(tx, tw).float().cpu().numpy()
                flops = 2 * ntok * k * n
                ours = "mma-gemm" if kind == "float16" else "mma-gemm-int4"
                for name in ("torch-linear", ours):
                    if name == "torch-linear":
                        def call(tx=tx, tw=tw):
                            torch.nn.functional.linear(tx, tw)
                    else:
                        def call(gemm=gemm, x=x, weights=weights, y=y):
                            gemm(x, *weights, y)
                    rows.append(_time_against(call, None if name == "torch-linear" else y, ref, flops,
                                              {"kernel": name, "weights": kind, "shape": shape, "in": k, "out": n,
                                               "tokens": ntok}, f"gemm {shape:8s} T={ntok:4d} {name:13s}"))
    return rows


def norm_time(src: Path, dev, rng) -> list[dict]:
    """Device time of the residual add + RMSNorm kernel a Qwen3-4B decode layer runs twice (what
    FERRUM_GEMV_NORMS folds into the GEMVs), at 1 and 4 tokens."""
    import tvm

    from bench.gpu_profile import profile_steps

    d, out = SHAPES["qkv"][0], []
    try:
        f = tvm.runtime.load_module(str(src / "add-rms-norm.so"))["norm"]
        w = tvm.runtime.tensor(np.ones(d, np.float16), dev)
        for ntok in TOKENS:
            x, r = (tvm.runtime.tensor(rng.standard_normal((ntok, d)).astype(np.float16), dev) for _ in range(2))
            h, y = (tvm.runtime.empty((ntok, d), "float16", dev) for _ in range(2))
            us = profile_steps(lambda: f(x, r, w, h, y), 50)["kernel_ms_per_step"] * 1e3
            out.append({"kernel": "add_rms_norm", "tokens": ntok, "us": us})
            print(f"add_rms_norm {d} T={ntok}  {us:8.2f} us", flush=True)
    except Exception as exc:  # noqa: BLE001 - keep what ran
        out.append({"kernel": "add_rms_norm", "error": repr(exc)})
        print(f"add_rms_norm: FAILED {exc!r}", flush=True)
    return out


def pickers_time(src: Path, dev, rng) -> list[dict]:
    """Device time of the argmax and of the sampler over Qwen3-sized logits rows, 1 and 16 rows: flat ones
    (random-weight models' kind, where a top-p nucleus holds much of the vocabulary and the search starts
    over the whole row) and peaked ones (a trained model's kind: few candidates, searched in shared memory),
    each beside the pickers of ``PICKERS_BASE`` on the same inputs (the same ids unless a draw falls within
    float32 rounding of a boundary)."""
    import tvm

    from bench.gpu_profile import profile_steps

    out = []
    for rows, shape in ((1, "flat"), (16, "flat"), (1, "peaked"), (16, "peaked")):
        x = rng.standard_normal((rows, VOCAB)).astype(np.float32) * 3
        if shape == "peaked":  # a language model's: a bulk near 0, some tens of tokens 12-24 above it
            x = x * (2.5 / 3)
            for row in x:
                row[rng.choice(VOCAB, 64, replace=False)] += rng.uniform(12, 24, 64).astype(np.float32)
        logits = tvm.runtime.tensor(x, dev)
        ids = tvm.runtime.empty((rows,), "int32", dev)
        try:
            for tag in ("", "-base"):  # today's pickers, then PICKERS_BASE's on the same inputs
                argmax = tvm.runtime.load_module(str(src / f"argmax{tag}.so"))["argmax"]
                us = profile_steps(lambda: argmax(logits, ids), 20)["kernel_ms_per_step"] * 1e3
                out.append({"kernel": f"argmax{tag}", "rows": rows, "logits": shape, "us": us,
                            "ids": ids.numpy().tolist()})
                print(f"argmax{tag:5s} rows={rows:2d} {shape:6s}  {us:8.1f} us", flush=True)
            sample, sample_base = (tvm.runtime.load_module(str(src / f"sample{tag}.so"))["sample"]
                                   for tag in ("", "-base"))
            for name, params in SAMPLING.items():
                p = tvm.runtime.tensor(np.tile(np.array(params, np.float32), (rows, 1)), dev)
                u = tvm.runtime.tensor(rng.random(rows).astype(np.float32), dev)
                for tag, f in (("", sample), ("-base", sample_base)):
                    us = profile_steps(lambda p=p, u=u, f=f: f(logits, p, u, ids), 20)["kernel_ms_per_step"] * 1e3
                    out.append({"kernel": f"sample{tag}", "sampling": name, "rows": rows, "logits": shape,
                                "us": us, "ids": ids.numpy().tolist()})
                    same = "" if not tag else ("  same ids" if out[-1]["ids"] == out[-2]["ids"] else "  OTHER ids")
                    print(f"sample{tag:5s} rows={rows:2d} {shape:6s}  {name:14s} {us:8.1f} us{same}", flush=True)
        except Exception as exc:  # keep what ran
            out.append({"rows": rows, "logits": shape, "error": repr(exc)})
            print(f"pickers rows={rows} {shape}: FAILED {exc!r}", flush=True)
    return out


def attention_time(src: Path, dev, rng) -> list[dict]:
    """Device time of a decode step's attention for one layer (the split kernel and the merge) at 1 and 16
    sequences of 384 and 2048 keys, for each key tile and split count; ``*`` marks the split count that
    ``paged_attention.gpu_num_splits`` picks (with the block table as wide as the context). For the 64-key
    tile, FERRUM_MERGED_ATTENTION's kernel too (``merged_time``): its time, its output against the merge
    kernel's, its counters back at zero."""
    import tvm

    from bench.gpu_profile import profile_steps
    from ferrum.schedules import paged_attention as pa

    h, kvh, d, bs = (ATTENTION[k] for k in ("heads", "kv_heads", "head_dim", "block_size"))
    out = []
    try:
        merge = tvm.runtime.load_module(str(src / "attention-merge.so"))["merge"]
        merged = tvm.runtime.load_module(str(src / "attention-merged.so"))["attention"]
        tiles = sorted({pa.split_key_tile(pa_rows(), d, "float16", sb) for sb in ATTENTION_SHARED}, reverse=True)
        kernels = {str(kc): (kc, tvm.runtime.load_module(str(src / f"attention-{kc}.so"))["attention"]) for kc in tiles}
    except Exception as exc:  # noqa: BLE001 - keep what ran before
        print(f"attention: FAILED to load {exc!r}", flush=True)
        return [{"error": repr(exc)}]
    for ctx in CONTEXTS:
        for seqs in (1, 16):
            m = ctx // bs
            cache = tvm.runtime.tensor((rng.standard_normal((seqs * m, 2, kvh, bs, d)) * 0.5).astype(np.float16), dev)
            q = tvm.runtime.tensor(rng.standard_normal((seqs, h, d)).astype(np.float16), dev)
            positions = tvm.runtime.tensor(np.full(seqs, ctx - 1, np.int32), dev)
            starts = tvm.runtime.tensor(np.arange(seqs + 1, dtype=np.int32), dev)
            tables = tvm.runtime.tensor(np.arange(seqs * m, dtype=np.int32).reshape(seqs, m), dev)
            y = tvm.runtime.empty((seqs, h, d), "float16", dev)
            picked = pa.gpu_num_splits_of(seqs, m, bs)
            for name, (kc, split) in kernels.items():
                for ns in (1, 2, 4, 6, 8, 12, 16, 32, 64):
                    if -(-ctx // ns) < kc // 2 or ns > ctx // bs:
                        continue
                    try:
                        acc = tvm.runtime.empty((seqs, h, ns, d), "float32", dev)
                        ml = tvm.runtime.empty((seqs, h, ns, 2), "float32", dev)

                        def step(split=split, acc=acc, ml=ml):
                            split(q, cache, positions, starts, tables, acc, ml)
                            merge(acc, ml, y)

                        us = profile_steps(step, 50)["kernel_ms_per_step"] * 1e3
                        out.append({"keys": ctx, "seqs": seqs, "key_tile": name, "splits": ns, "us": us,
                                    "picked": name == str(tiles[0]) and ns == picked})
                        print(f"attention keys={ctx:5d} seqs={seqs:2d} tile={name:>2s} splits={ns:2d} "
                              f"{'*' if out[-1]['picked'] else ' '} {us:7.2f} us", flush=True)
                        if name == str(tiles[0]):  # FERRUM_MERGED_ATTENTION's kernel on the same inputs
                            out[-1].update(merged_time(merged, step, (q, cache, positions, starts, tables),
                                                       acc, ml, y, seqs, kvh, dev))
                            print(f"attention keys={ctx:5d} seqs={seqs:2d} merged   splits={ns:2d}   "
                                  f"{out[-1]['merged_us']:7.2f} us  diff {out[-1]['merged_diff']:.1e}  counters "
                                  f"{'zero' if out[-1]['counters_zero'] else 'NOT ZERO'}", flush=True)
                    except Exception as exc:  # noqa: BLE001 - keep what ran
                        out.append({"keys": ctx, "seqs": seqs, "key_tile": name, "splits": ns, "error": repr(exc)})
                        print(f"attention keys={ctx} seqs={seqs} tile={name} splits={ns}: FAILED {exc!r}", flush=True)
    return out


def merged_time(merged, step, inputs, acc, ml, y, seqs: int, kvh: int, dev) -> dict:
    """The merged split kernel (``make_attention_gpu(merged=True)``) against ``step`` (split + merge) on the
    same inputs: its time, its output's largest difference from the merge kernel's (after 50 timed calls:
    a count that went wrong once would leave a stale or missing merge), and whether its counters are back
    to zero."""
    import tvm

    from bench.gpu_profile import profile_steps

    counters = tvm.runtime.tensor(np.zeros((seqs, kvh), np.int32), dev)
    y2 = tvm.runtime.empty(y.shape, "float16", dev)

    def call():
        merged(*inputs, counters, acc, ml, y2)

    us = profile_steps(call, 50)["kernel_ms_per_step"] * 1e3
    y2.copyfrom(np.full(y.shape, np.nan, np.float16))  # the last call must write every output
    call()
    step()
    ref, got = y.numpy().astype(np.float32), y2.numpy().astype(np.float32)
    return {"merged_us": us, "merged_diff": float(np.nan_to_num(np.abs(got - ref), nan=np.inf).max()),
            "counters_zero": not counters.numpy().any()}


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

"""Every environment variable ferrum reads, in one place (all prefixed FERRUM_)."""

from __future__ import annotations

import os
from pathlib import Path


_OFF = ("", "0", "false", "no")  # what turns a flag off


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in _OFF


DEBUG = _flag("FERRUM_DEBUG")  # show tracebacks instead of one-line errors


def cache_dir() -> Path:
    """FERRUM_CACHE, else $XDG_CACHE_HOME/ferrum, else ~/.cache/ferrum: compiled aliases, build helpers."""
    if os.environ.get("FERRUM_CACHE"):
        return Path(os.environ["FERRUM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ferrum"


def cpu_threads() -> int:
    """FERRUM_NUM_THREADS, else every CPU this process may run on."""
    if os.environ.get("FERRUM_NUM_THREADS"):
        return max(1, int(os.environ["FERRUM_NUM_THREADS"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads() -> None:
    """Give TVM's thread pool every CPU (its own default used one of two cores on 2-vCPU machines,
    halving decode speed). Must run before the pool starts; an explicit TVM_NUM_THREADS wins."""
    os.environ.setdefault("TVM_NUM_THREADS", str(cpu_threads()))


def tvm_without_torch() -> None:
    """Import TVM without torch. Where torch is installed, TVM's FFI layer imports it first (a workaround for a
    symbol clash seen on Windows) and asks CUDA whether a GPU is there, and `tvm.relax` imports it for its
    Python-function modules: here that made `ferrum run --prompt` take 3.2 s instead of 1.3 and 494 MB of
    memory instead of 298, for nothing, since ferrum never hands torch tensors to TVM. Call it before the
    process's first TVM import. A process that imported torch already is left as it is, and torch still
    imports afterwards."""
    import sys

    if "tvm" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError: "not installed"
    try:
        import tvm  # noqa: F401
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def decode_max_tokens(artifact_limit: int) -> int:
    """FERRUM_DECODE_MAX_TOKENS, else the artifact's limit: the largest batch (in tokens) that a GPU
    artifact's ``decode`` entry point takes (0 turns it off, for measuring both paths)."""
    value = os.environ.get("FERRUM_DECODE_MAX_TOKENS", "")
    if not value:
        return artifact_limit
    if not value.isdigit():
        raise ValueError(f"FERRUM_DECODE_MAX_TOKENS must be a token count, not {value!r}")
    return int(value)


def cuda_graph() -> bool:
    """CUDA artifacts run decode steps through ``decode_graph`` (captured once per shape, then replayed);
    FERRUM_CUDA_GRAPH=0 turns that off. On by default since an H200 served both Qwen3-4B models with them
    (the direct tokens over HTTP, no errors) and batch-1 decode gained 16% float16, 34% INT4
    (docs/bench/2026-11-27-gpu-h200.md)."""
    return os.environ.get("FERRUM_CUDA_GRAPH", "1") not in _OFF


def gemv_norms() -> bool:
    """FERRUM_GEMV_NORMS=1 at ``ferrum compile`` (GPU targets; an experiment, off until an H200 says it
    pays): the decode entries' RMSNorms deferred into the GEMVs around them and their residual adds folded
    in (``lowering.lower``'s ``gemv_norms``), 7 launches per decoder layer instead of 9. Recorded in the
    manifest's ``compile_options``."""
    return _flag("FERRUM_GEMV_NORMS")


DP4A_MODES = ("lanes", "kernel")


def gemv_dp4a() -> str:
    """FERRUM_GEMV_DP4A at ``ferrum compile`` (CUDA targets; an experiment, off until a GPU says it pays):
    the decode entries' symmetric INT4 GEMVs (no bias, groups of a multiple of 32) run on integer dot
    products over activations rounded to int8 per 32 columns (``quant_linear.make_gemv_dp4a_gpu``). The
    mode, "" when unset or 0: ``1`` (``lanes``) each lane rounds the activations it reads; ``kernel`` a
    quantize kernel does, before each such GEMV (one launch more; in SASS ~4 instructions per weight byte
    in the GEMV against ~6 in-lane: docs/bench/2026-11-27c-pdl-sass.md). Recorded in the manifest's
    ``compile_options`` (``gemv_dp4a``)."""
    return _mode("FERRUM_GEMV_DP4A", "lanes")


MMA_LINEAR_MODES = ("wide", "decode")


def mma_linear() -> str:
    """FERRUM_MMA_LINEAR at ``ferrum compile`` (CUDA targets; an experiment, off until a GPU says it pays):
    the float16/bfloat16 and INT4 (float16 activations) linears of steps of many decode tokens on
    ``mma_linear.make_mma_linear_gpu`` (tensor-core mma's that stream each weight once per 16-32 tokens)
    instead of dlight's matmuls, which read Qwen3-4B's weights at 0.6 TB/s at 16 tokens on an H200, or
    the GEMVs' passes of 4. The mode, "" when unset or 0: ``1`` (``wide``)
    in ``decode_wide`` (steps of more than 16 decode tokens); ``decode`` in ``decode`` too (2-16 tokens,
    in place of the GEMVs' passes of 4; not with FERRUM_GEMV_NORMS). Recorded in the manifest's
    ``compile_options`` (``mma_linear``)."""
    return _mode("FERRUM_MMA_LINEAR", "wide")


def flash_attention() -> bool:
    """FERRUM_FLASH_ATTENTION=1 at ``ferrum compile`` (CUDA targets; an experiment, off until a GPU says it
    pays): ``forward``'s attention on ``paged_attention.make_prefill_attention_mma`` (one pass over the keys,
    the scores and the online softmax in registers, ``mma.sync``) instead of the two-pass wmma kernel, which
    took 36 of Qwen3-4B's 107 ms at a 2048-token prefill on an H200 (docs/bench/2026-11-26b-gpu-h200.md),
    where the head fits it (float16 or bfloat16, head_dim 32, 64 or 128). Recorded in the manifest's
    ``compile_options`` (``flash_attention``)."""
    return _flag("FERRUM_FLASH_ATTENTION")


def mma_gemm() -> bool:
    """FERRUM_MMA_GEMM=1 at ``ferrum compile`` (CUDA targets; an experiment, off until a GPU says it pays):
    ``forward``'s dense float16/bfloat16 and INT4 (float16 activations) linears (not the lm_head) on
    ``mma_linear.make_mma_gemm_gpu`` (128 x 128 tiles on ``mma.sync``, double-buffered shared memory,
    INT4 decoded when staged) where the shape fits it (``N`` a multiple of 128, ``K`` of 32, INT4 groups of
    a multiple of 32), instead of dlight's matmuls (dequantizing ones for INT4), which took 64 of Qwen3-4B's
    107 ms at a 2048-token prefill on an H200 at 150-245 TFLOP/s (docs/bench/2026-11-26b-gpu-h200.md), or,
    for bfloat16, the wmma tiled GEMM. Recorded in the manifest's ``compile_options`` (``mma_gemm``)."""
    return _flag("FERRUM_MMA_GEMM")


def merged_attention() -> bool:
    """FERRUM_MERGED_ATTENTION=1 at ``ferrum compile`` (CUDA targets; an experiment, off until a GPU says it
    is right and pays): the decode entries' split attention merges its own splits, the last split block of
    each token and KV head to count itself on a zeroed counter (``make_attention_gpu(merged=True)``), so
    the merge kernel, one launch per decoder layer (1.9 us each and a gap on an H200 at 384 keys,
    docs/bench/2026-11-26d-gpu-h200.md), goes. Off by default because its correctness rests on
    ``__threadfence`` and ``atomicAdd`` ordering across blocks, which the tests' emulator, running blocks one
    after another, cannot show wrong. Recorded in the manifest's ``compile_options``
    (``merged_attention``)."""
    return _flag("FERRUM_MERGED_ATTENTION")


PDL_MODES = ("early", "late", "first", "deep")


def pdl() -> str:
    """FERRUM_PDL at ``ferrum compile`` (cuda-sm90; an experiment, off by default): every CUDA kernel
    launched as a programmatic dependent launch (``gpu_build.with_programmatic_launch``). The mode, "" when
    unset or 0:

    - ``1`` (``early``): the decode GEMVs issue their first weight loads and the split attention its first
      key tile before they wait for the kernel before them, and let the next kernel launch first thing;
    - ``late``: the same early loads, the next kernel let launch only after the wait;
    - ``first``: every kernel waits first, then lets the next one launch (no early loads);
    - ``deep``: ``early``, with the one-token GEMVs (``decode_one``) issuing up to 3 step groups' weight
      loads before their wait instead of 1-2 (``quant_linear.gemv_slots``): Qwen3-4B's INT4 q|k|v and
      down GEMVs all their weights.

    On an H200 on 2026-11-27 ``1`` failed parity (max logit error 6.5): ptxas had issued GEMVs' activation
    loads before the wait (they were ``__restrict__``, so non-coherent); the launch pass now drops
    ``__restrict__`` (docs/bench/2026-11-27c-pdl-sass.md). Recorded in the manifest's ``compile_options``
    (``pdl``)."""
    return _mode("FERRUM_PDL", "early")


def _mode(name: str, on: str) -> str:
    """An experiment's mode from the environment variable ``name``: "" when unset or 0/false/no, ``on``
    for 1/true/yes, else the value itself (lowercase; the caller checks it against its modes)."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in _OFF:
        return ""
    return on if raw in ("1", "true", "yes") else raw

"""Dense linear ``out[T, N] = x[T, K] @ w[N, K]^T (+ bias[N])`` for steps of a few dozen tokens on tensor
cores (CUDA ``mma.sync.m16n8k16``), streaming each weight once per pass of up to 32 tokens; with its
numpy reference.

A batch of 16-64 decode tokens (``decode_wide``) multiplies every weight by few activations: the work is
reading the weights, as for the GEMV, but a GEMV reads them once per 4 tokens and dlight's tiled matmuls,
built for large M, read them at 0.6 TB/s on an H200 (docs/bench/2026-11-26b-gpu-h200.md). Here the weights
are the mma's A operand (16 rows x 16 columns) and the tokens its B operand (16 columns x 8 tokens), so a
warp streams its rows' weights straight from memory into registers, 16 bytes per lane per load, and
multiplies each load by up to 32 tokens in 8 mma's; no shared memory, no barrier until the end.

The trick that makes the loads wide: a dot product does not care in which order its columns are summed,
so the 16 columns of one mma step need not be 16 consecutive columns, as long as the weights and the
activations agree. Lane ``l`` of a warp (``g = l // 4``, ``c = l % 4``) holds in the mma's A operand the
columns ``2c, 2c+1, 2c+8, 2c+9`` of rows ``g`` and ``g + 8``; here it loads 8 consecutive columns
``32 s + 8 c .. +8`` of both rows (two 16-byte loads per 32-column step ``s``) and feeds the first 4 to
step ``2s`` as those logical columns, the last 4 to step ``2s+1``. Its B operand (columns ``2c, 2c+1,
2c+8, 2c+9`` of token ``g``) is then the same 8 consecutive columns of token ``g``'s activations: one
16-byte load per 8 tokens.

Grid: one block per ``16 * row_frags`` output rows; its ``k_splits`` warps split the columns (each a
contiguous range, ``K / k_splits``, a multiple of 32) and sum their float32 accumulators through shared
memory at the end, adding the bias once. A warp loads ``unroll`` steps (weights and activations) before
it multiplies the first. Tokens come in passes of ``8 * n_frags``; activations of tokens past the count
are zeros (their products are discarded). ``mma_linear_layout`` picks ``(row_frags, k_splits)`` from
the shape.

float16 and bfloat16 (the mma's input types), float32 accumulators; ``K % 32 == 0`` and ``N % 16 == 0``
(``mma_linear_fits``). Runs on sm_80 and newer. The CPU emulator of the tests (tests/gpu_emu.py) runs
the mma with the PTX ISA's fragment layouts.
"""

from __future__ import annotations

import numpy as np

MMA_WARPS_MAX = 16  # warps of a block at most (512 threads)
MMA_MIN_WARPS = 2048  # a grid of this many warps or more: about 16 resident warps on each of 132 SMs
MMA_N_FRAGS = 4  # 8-token fragments per pass: 32 tokens
MMA_UNROLL = 2  # 32-column steps loaded before the first is used
MMA_SHARED = 48 * 1024  # a block's static shared memory


def mma_linear_fits(in_features: int, out_features: int, dtype: str) -> bool:
    """Whether ``make_mma_linear_gpu`` builds for this shape and activation dtype."""
    return dtype in ("float16", "bfloat16") and in_features % 32 == 0 and out_features % 16 == 0


def mma_linear_layout(in_features: int, out_features: int) -> tuple[int, int]:
    """``(row_frags, k_splits)``: 2 row fragments a warp (half the activation loads per weight) where
    ``N`` allows, and the fewest k-splits (warps per block, at most ``MMA_WARPS_MAX``) whose grid has
    ``MMA_MIN_WARPS`` warps, each over a column range of at least two 32-column steps."""
    for rf in (2, 1) if out_features % 32 == 0 else (1,):
        blocks = out_features // (16 * rf)
        ks = 1
        while (ks * 2 <= MMA_WARPS_MAX and blocks * ks < MMA_MIN_WARPS and mma_shared_bytes(rf, ks * 2) <= MMA_SHARED
               and in_features % (32 * ks * 2) == 0 and in_features // (ks * 2) >= 64):
            ks *= 2
        if blocks * ks >= MMA_MIN_WARPS or rf == 1:
            return rf, ks
    raise AssertionError("unreachable")


def mma_shared_bytes(row_frags: int, k_splits: int, n_frags: int = MMA_N_FRAGS) -> int:
    """Shared memory of a block: every lane's float32 accumulators, for the sum over its warps."""
    return k_splits * row_frags * n_frags * 4 * 32 * 4


def make_mma_linear_gpu(in_features: int, out_features: int, dtype: str, out_dtype: str,
                        bias_dtype: str | None = None, layout: tuple[int, int] | None = None,
                        n_frags: int = MMA_N_FRAGS, unroll: int = MMA_UNROLL):
    """PrimFunc ``mma_linear(x[T, K], w[N, K], [bias[N],] out[T, N])`` (see the module docstring)."""
    from tvm import tirx
    from tvm.script import tirx as T

    K, N = in_features, out_features
    # bfloat16 zero as its bits: TVM's OpenCL bfloat16 code turns a cast or constant into invalid C
    ZERO = tirx.reinterpret(dtype, tirx.const(0, "uint16")) if dtype == "bfloat16" else tirx.const(0, dtype)
    assert mma_linear_fits(K, N, dtype), (K, N, dtype)
    RF, KS = layout or mma_linear_layout(K, N)
    NF, PT = n_frags, 8 * n_frags  # 8-token fragments and tokens per pass
    assert N % (16 * RF) == 0 and K % (32 * KS) == 0 and 1 <= NF <= 4, (N, K, RF, KS, NF)
    assert mma_shared_bytes(RF, KS, NF) <= MMA_SHARED, (RF, KS, NF)
    KW = K // KS  # columns of a warp
    STEPS = KW // 32
    U = max(1, min(unroll, STEPS))
    while STEPS % U:
        U -= 1
    NT = 32 * KS
    ab = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
    has_bias = bias_dtype is not None
    ACC = RF * NF * 4  # a lane's accumulators
    OUTS = 16 * RF * PT  # a block's outputs per pass

    @T.macro
    def body(x, w, bias, out, ntok):
        for blk in T.thread_binding(N // (16 * RF), thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                wl = T.alloc_buffer((U * RF * 2 * 8,), dtype, scope="local")  # (step, frag, row g / g+8, 8 columns)
                xl = T.alloc_buffer((U * NF * 8,), dtype, scope="local")  # (step, token frag, 8 columns)
                af = T.alloc_buffer((8,), dtype, scope="local")  # one mma's A operand
                acc = T.alloc_buffer((ACC,), "float32", scope="local")  # (frag, token frag, 4)
                red = T.alloc_buffer((KS * ACC * 32,), "float32", scope="shared")
                sm = T.alloc_buffer((1,), "float32", scope="local")
                lane: T.let[T.int32] = T.Cast("int32", tx) % 32
                warp: T.let[T.int32] = T.Cast("int32", tx) // 32
                g: T.let[T.int32] = lane // 4
                c: T.let[T.int32] = lane % 4
                for p in T.serial((ntok + PT - 1) // PT):
                    for i in T.unroll(ACC):
                        acc[i] = T.float32(0)
                    for sg in T.serial(STEPS // U):
                        for u in T.unroll(U):
                            col: T.let[T.int32] = warp * KW + (sg * U + u) * 32 + c * 8
                            for rf in T.unroll(RF):
                                for h in T.unroll(2):
                                    for v in T.vectorized(8):
                                        wl[((u * RF + rf) * 2 + h) * 8 + v] = w[blk * 16 * RF + rf * 16 + h * 8 + g,
                                                                                col + v]
                            for f in T.unroll(NF):
                                if p * PT + f * 8 + g < ntok:
                                    for v in T.vectorized(8):
                                        xl[(u * NF + f) * 8 + v] = x[p * PT + f * 8 + g, col + v]
                                else:  # element by element: TVM's OpenCL bfloat16 pass cannot store a vector constant
                                    for v in T.unroll(8):
                                        xl[(u * NF + f) * 8 + v] = ZERO
                        for u in T.unroll(U):
                            for t in T.unroll(2):  # the step's first 4 columns, then its last 4
                                for rf in T.unroll(RF):
                                    # A: (row g, 2 columns), (row g+8, 2), (row g, next 2), (row g+8, next 2)
                                    for i in T.unroll(8):
                                        af[i] = wl[((u * RF + rf) * 2 + i % 4 // 2) * 8 + t * 4 + i // 4 * 2 + i % 2]
                                    for f in T.unroll(NF):
                                        T.evaluate(T.ptx_legacy.mma(
                                            "m16n8k16", "row", "col", ab, ab, "fp32", af.data, 0, xl.data,
                                            (u * NF + f) * 8 + t * 4, acc.data, (rf * NF + f) * 4, False,
                                            dtype="float32"))
                    # the warps' partial sums: (warp, accumulator, lane), then each output summed over warps
                    for i in T.unroll(ACC):
                        red[(warp * ACC + i) * 32 + lane] = acc[i]
                    T.tvm_storage_sync("shared")
                    for e in T.serial((OUTS + NT - 1) // NT):
                        if e * NT + tx < OUTS:
                            # output o: token o // (16 RF), row o % (16 RF) (neighbouring threads, neighbouring rows)
                            tk: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) // (16 * RF)
                            rw: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) % (16 * RF)
                            # its accumulator: fragment rw // 16, token fragment tk // 8, element (rw % 16 // 8) * 2
                            # + tk % 2, of lane (rw % 8) * 4 + tk % 8 // 2
                            ai: T.let[T.int32] = ((rw // 16 * NF + tk // 8) * 4 + rw % 16 // 8 * 2 + tk % 2) * 32 + (
                                rw % 8 * 4 + tk % 8 // 2)
                            sm[0] = T.float32(0)
                            for k in T.unroll(KS):
                                sm[0] = sm[0] + red[k * ACC * 32 + ai]
                            if p * PT + tk < ntok:
                                out[p * PT + tk, blk * 16 * RF + rw] = T.Cast(out_dtype, sm[0] + (
                                    T.Cast("float32", bias[blk * 16 * RF + rw]) if has_bias else T.float32(0)))
                    T.tvm_storage_sync("shared")

    if has_bias:
        @T.prim_func(private=True)
        def mma_linear_bias(x_h: T.handle, w: T.Buffer((N, K), dtype), b: T.Buffer((N,), bias_dtype),  # type: ignore[valid-type]
                            o_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            ntok = T.int64()
            body(T.match_buffer(x_h, (ntok, K), dtype), w, b, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)

        return mma_linear_bias

    @T.prim_func(private=True)
    def mma_linear(x_h: T.handle, w: T.Buffer((N, K), dtype), o_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok = T.int64()
        body(T.match_buffer(x_h, (ntok, K), dtype), w, None, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)

    return mma_linear


def mma_linear_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T + bias`` with float32 sums of the exact products (as the mma's float32 accumulators),
    as float32."""
    out = x.astype(np.float32) @ w.astype(np.float32).T
    return out if bias is None else out + bias.astype(np.float32)

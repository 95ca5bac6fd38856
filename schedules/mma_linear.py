"""Linear ``out[T, N] = x[T, K] @ W[N, K]^T (+ bias[N])`` for steps of a few dozen tokens on tensor cores
(CUDA ``mma.sync.m16n8k16``), streaming each weight once per pass of 16 or 32 tokens: dense float16 /
bfloat16 weights, or INT4 ones (``quant_linear``'s row layout, any group of a multiple of 32, symmetric or
with mins) under float16 activations; with its numpy reference.

A batch of 16-64 decode tokens (``decode_wide``) multiplies every weight by few activations: the work is
reading the weights, as for the GEMV, but a GEMV reads them once per 4 tokens and dlight's tiled matmuls,
built for large M, read them at 0.6 TB/s on an H200 (docs/bench/2026-11-26b-gpu-h200.md). Here the weights
are the mma's A operand (16 rows x 16 columns) and the tokens its B operand (16 columns x 8 tokens), so a
warp streams its rows' weights straight from memory into registers, 16 bytes per lane per load, and
multiplies each load by up to 32 tokens; no shared memory, no barrier until the end.

The trick that makes the loads wide: a dot product does not care in which order its columns are summed,
so the 16 columns of one mma need not be 16 consecutive columns, as long as the weights and the
activations agree. Lane ``l`` of a warp (``g = l // 4``, ``c = l % 4``) holds in the mma's A operand the
logical columns ``2c, 2c+1, 2c+8, 2c+9`` of rows ``g`` and ``g + 8``, and in its B operand the same
columns of token ``g``. Here those are 4 consecutive physical columns of the lane's 16-byte load:

- dense: a step of 32 columns; the lane loads columns ``8c .. 8c+8`` of both rows and feeds the first 4
  to the step's first mma, the last 4 to its second; its activations are the same 8 columns of its token.
- INT4: a step of 128 columns; the lane loads the 32-column block ``c`` (4 words) of both rows. Word
  ``wd`` holds columns ``4 wd + b`` (low nibbles of its bytes ``b``) and ``4 wd + 16 + b`` (high). With
  its two middle bytes swapped, the nibbles of bytes (0, 2) are 2 consecutive columns and those of (1, 3)
  the next 2, so OR-ing a masked pair into float16's 1024 (``quant_linear.half_pair``'s decode) gives the
  float16 pair of columns ``c0, c0+1`` and ``c0+2, c0+3`` (``c0 = 4 wd + 16 run``) exactly; one paired
  multiply-add leaves ``q - zero point``, one more the weight (times the row's group scale, plus its
  min: both, and the product, in float16, as the mma's A operand is anyway; the GEMV keeps the float32
  min). Mma ``j`` of the step takes word ``j // 2``, low (even ``j``) or high nibbles; its activations
  are 4 consecutive columns of the lane's 32.

Grid: one block per ``16 * row_frags`` output rows; its ``k_splits`` warps split the steps (``ceil(steps
/ k_splits)`` each, the last warps' past the last step are zero weights and load nothing) and sum their
float32 accumulators through shared memory at the end, adding the bias once. A warp loads ``unroll``
steps (weights and activations) before it multiplies the first. Tokens come in passes of ``8 *
n_frags``; every fragment's mma runs whether its tokens exist or not (an mma in a branch would hang the
test emulator's barriers), an absent token's column of the products is never stored (mma columns do not
mix). ``mma_linear_layout`` picks ``(row_frags, k_splits)`` from the shape.

``K`` a multiple of the step, ``N`` of 16 (``mma_linear_fits``). Runs on sm_80 and newer. The CPU
emulator of the tests (tests/gpu_emu.py) runs the mma with the PTX ISA's fragment layouts.

``make_mma_gemm_gpu`` is the same family for prefill (hundreds to thousands of tokens): a tiled GEMM with
the tokens as the A operand, double-buffered shared-memory tiles and its operands loaded by ``ldmatrix``; an
experiment that bench/gpu_kernels.py times against cuBLAS, and ``forward``'s dense and INT4 linears with
FERRUM_MMA_GEMM=1 (``lowering.lower(mma_gemm=True)``).
"""

from __future__ import annotations

import numpy as np

from . import mma_operand_type, zero_const
from .quant_linear import _MAGIC_H2, QuantFormat, half_pair, opaque_magic

MMA_WARPS_MAX = 16  # warps of a block at most (512 threads)
MMA_MIN_WARPS = 2048  # a grid of this many warps or more: about 16 resident warps on each of 132 SMs
MMA_N_FRAGS = 4  # 8-token fragments per pass: 32 tokens
MMA_UNROLL = 2  # steps (32 columns, INT4 128) a warp loads before it multiplies the first
MMA_SHARED = 48 * 1024  # a block's static shared memory


def mma_linear_fits(in_features: int, out_features: int, dtype: str, fmt: QuantFormat | None = None) -> bool:
    """Whether ``make_mma_linear_gpu`` builds for this shape, activation dtype and weight format: float16
    or bfloat16 dense weights; INT4 ones (groups of a multiple of 32) with float16 activations."""
    if fmt is not None:
        return (dtype == "float16" and fmt.bits == 4 and fmt.group_size % 32 == 0 and in_features % 128 == 0
                and out_features % 16 == 0)
    return dtype in ("float16", "bfloat16") and in_features % 32 == 0 and out_features % 16 == 0


def swap_middle_bytes(word):
    """Bytes (0, 1, 2, 3) -> (0, 2, 1, 3) of a uint32 TIR value: a nibble pair of bytes 0 and 2 is then
    columns ``c, c+1`` of an INT4 word (``int4_pair``). One byte permute (PRMT; written with masks and
    shifts, ptxas folded the swap into every pair's mask: about 5 integer operations a pair instead of 1,
    in the SASS of 2026-11-27)."""
    from tvm import tirx

    return tirx.call_pure_extern("uint32", "__byte_perm", word, tirx.const(0, "uint32"), tirx.const(0x3120, "uint32"))


def int4_pair(word, run, odd, magic, fmt: QuantFormat, scale2, min2):
    """float16x2 of a byte-swapped INT4 word's bytes ``odd``, ``odd + 2`` (columns ``4 wd + 16 run + 2 odd``
    and the next of word ``wd``), low (``run`` 0) or high nibbles: ``q - zero point`` (``half_pair``),
    then times the group's scale (``scale2``, a float16 pair), plus its min (``min2``) when asymmetric: in
    float16, as the mma's operands are anyway (the GEMV keeps the float32 min)."""
    q = half_pair(word, run, odd, magic, float(fmt.zero_point if fmt.sym else 0))
    return q * scale2 if fmt.sym else q * scale2 + min2


def mma_step(fmt: QuantFormat | None) -> int:
    """Columns of one step of a warp: 32 (a lane's 8 float16 columns of each row), 128 INT4 (its 32)."""
    return 32 if fmt is None else 128


def mma_linear_layout(in_features: int, out_features: int, fmt: QuantFormat | None = None) -> tuple[int, int]:
    """``(row_frags, k_splits)``: 2 row fragments a warp (half the activation loads per weight) where
    ``N`` allows, and the fewest k-splits (warps per block, a power of two up to ``MMA_WARPS_MAX``) whose
    grid has ``MMA_MIN_WARPS`` warps, each over at least 2 steps on average (the last warps may have fewer:
    Qwen3-4B's INT4 down linear has 76 steps of 128 columns, 16 warps take 5 each but the last)."""
    steps = in_features // mma_step(fmt)
    for rf in (2, 1) if out_features % 32 == 0 else (1,):
        blocks = out_features // (16 * rf)
        ks = 1
        while (ks * 2 <= MMA_WARPS_MAX and blocks * ks < MMA_MIN_WARPS and mma_shared_bytes(rf, ks * 2) <= MMA_SHARED
               and steps >= 2 * ks * 2):
            ks *= 2
        if blocks * ks >= MMA_MIN_WARPS or rf == 1:
            return rf, ks
    raise AssertionError("unreachable")


def mma_unroll(k_splits: int) -> int:
    """Steps a warp loads before it multiplies the first, by default: ``MMA_UNROLL``, 1 in blocks of 16
    warps (512 threads leave ptxas 128 registers a thread: Qwen3-4B's INT4 o linear spilled at 2)."""
    return MMA_UNROLL if k_splits <= 8 else 1


def mma_shared_bytes(row_frags: int, k_splits: int, n_frags: int = MMA_N_FRAGS) -> int:
    """Shared memory of a block: every lane's float32 accumulators, for the sum over its warps."""
    return k_splits * row_frags * n_frags * 4 * 32 * 4


def make_mma_linear_gpu(in_features: int, out_features: int, dtype: str, out_dtype: str,
                        bias_dtype: str | None = None, layout: tuple[int, int] | None = None,
                        n_frags: int | None = None, unroll: int | None = None, fmt: QuantFormat | None = None,
                        scale_dtype: str = "float16"):
    """PrimFunc ``mma_linear(x[T, K], w | (qweight, scales, [mins]), [bias[N],] out[T, N])`` (see the module
    docstring; ``n_frags``: ``MMA_N_FRAGS`` dense, 2 INT4, whose steps hold 4 times the activations;
    ``unroll``: ``MMA_UNROLL``, 1 in blocks of 16 warps)."""
    import tvm
    from tvm import tirx
    from tvm.script import tirx as T

    K, N = in_features, out_features
    assert mma_linear_fits(K, N, dtype, fmt), (K, N, dtype, fmt)
    quant = fmt is not None
    RF, KS = layout or mma_linear_layout(K, N, fmt)
    NF = n_frags or (2 if quant else MMA_N_FRAGS)  # 8-token fragments per pass
    PT = 8 * NF  # tokens per pass
    SC = mma_step(fmt)
    CW = SC // 4  # a lane's columns of a step (16 bytes of each row)
    J = SC // 16  # mma's (16 columns each) per step
    assert N % (16 * RF) == 0 and K % SC == 0 and 1 <= NF <= 4 and KS >= 1, (N, K, RF, KS, NF)
    assert mma_shared_bytes(RF, KS, NF) <= MMA_SHARED, (RF, KS, NF)
    S_ALL = K // SC
    STEPS = -(-S_ALL // KS)  # a warp's steps (the last warps' may end past the last column: zero weights)
    U = max(1, min(unroll or mma_unroll(KS), STEPS))
    GROUPS = -(-STEPS // U)  # of U steps, the last one's past STEPS absent too
    NT = 32 * KS
    ZERO = zero_const(dtype)
    WZERO = tirx.const(0, "uint32") if quant else ZERO
    ab = mma_operand_type(dtype)
    has_bias = bias_dtype is not None
    sym = fmt is not None and fmt.sym
    G = fmt.group_size if fmt is not None else K
    ACC = RF * NF * 4  # a lane's accumulators
    OUTS = 16 * RF * PT  # a block's outputs per pass
    WL = 4 if quant else 8  # a row's 16 bytes: 4 words, 8 float16 values

    def a_dense(wl, u, rf, j, i):
        """Value ``i`` of mma ``j``'s A operand: (row g, 2 columns), (row g+8, 2), (row g, next 2), (row g+8,
        next 2) of the lane's 8, the first 4 for mma 0, the last 4 for mma 1."""
        return wl[((u * RF + rf) * 2 + i % 4 // 2) * WL + j * 4 + i // 4 * 2 + i % 2]

    def b_offset(u, f, j):
        """Where mma ``j``'s B operand (4 consecutive columns of the lane's token) starts in ``xl``: INT4 mma
        ``j`` reads word ``j // 2``'s low (even ``j``) or high nibbles: columns ``4 (j // 2) + 16 (j % 2)``."""
        return (u * NF + f) * CW + (j * 4 if not quant else j // 2 * 4 + j % 2 * 16)

    @T.macro
    def body(x, w, wq, scales, mins, bias, out, ntok):
        for blk in T.thread_binding(N // (16 * RF), thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                # (step, row fragment, row g / g+8, the lane's 16 bytes)
                wl = T.alloc_buffer((U * RF * 2 * WL,), "uint32" if quant else dtype, scope="local")
                xl = T.alloc_buffer((U * NF * CW,), dtype, scope="local")  # (step, token fragment, CW columns)
                # one mma's A and B operands, each its own array passed at offset 0: TVM passes an operand as
                # ``array + offset`` in the array's C type, which for an array it vectorizes (xl: uint4) would
                # count in 16-byte units
                af = T.alloc_buffer((8,), dtype, scope="local")
                bf = T.alloc_buffer((4,), dtype, scope="local")
                sc2 = T.alloc_buffer((RF * 2 * 2,), "float16", scope="local")  # INT4: rows' scales (as pairs)
                mn2 = T.alloc_buffer((RF * 2 * 2,), "float16", scope="local")  # ... and mins
                acc = T.alloc_buffer((ACC,), "float32", scope="local")  # (row fragment, token fragment, 4)
                red = T.alloc_buffer((KS * ACC * 32,), "float32", scope="shared")
                sm = T.alloc_buffer((1,), "float32", scope="local")
                lane: T.let[T.int32] = T.Cast("int32", tx) % 32
                warp: T.let[T.int32] = T.Cast("int32", tx) // 32
                g: T.let[T.int32] = lane // 4
                c: T.let[T.int32] = lane % 4
                magic: T.let[T.uint32] = opaque_magic(T.Cast("int32", ntok), _MAGIC_H2)
                for p in T.serial((ntok + PT - 1) // PT):
                    for i in T.unroll(ACC):
                        acc[i] = T.float32(0)
                    for sg in T.serial(GROUPS):
                        for u in T.unroll(U):
                            gs: T.let[T.int32] = warp * STEPS + sg * U + u  # the step of the row
                            col: T.let[T.int32] = gs * SC + c * CW
                            here: T.let[T.bool] = sg * U + u < STEPS and gs < S_ALL  # a step of this warp
                            for rf in T.unroll(RF):
                                for h in T.unroll(2):
                                    if here:
                                        if quant:
                                            for v in T.vectorized(4):
                                                wl[((u * RF + rf) * 2 + h) * WL + v] = wq[
                                                    blk * 16 * RF + rf * 16 + h * 8 + g, col // 8 + v]
                                        else:
                                            for v in T.vectorized(8):
                                                wl[((u * RF + rf) * 2 + h) * WL + v] = w[
                                                    blk * 16 * RF + rf * 16 + h * 8 + g, col + v]
                                    else:  # past the last step: zero weights (INT4: zero scales, below)
                                        for v in T.unroll(WL):
                                            wl[((u * RF + rf) * 2 + h) * WL + v] = WZERO
                            # the lane's token of each fragment (an absent one's column of the products, whatever
                            # the registers hold, is never stored: mma columns do not mix)
                            # (past the last step, zeros: zero weights times stale registers could be NaN)
                            for f in T.unroll(NF):
                                if p * PT + f * 8 + g < ntok:
                                    for v0 in T.unroll(CW // 8):
                                        if here:
                                            for v in T.vectorized(8):
                                                xl[(u * NF + f) * CW + v0 * 8 + v] = x[p * PT + f * 8 + g,
                                                                                        col + v0 * 8 + v]
                                        else:  # element by element: TVM's OpenCL bfloat16 pass cannot store a
                                            for v in T.unroll(8):  # vector constant
                                                xl[(u * NF + f) * CW + v0 * 8 + v] = ZERO
                        for u in T.unroll(U):
                            if quant:  # the rows' group scales (and mins) of the lane's 32 columns, as pairs
                                gq: T.let[T.int32] = warp * STEPS + sg * U + u
                                hq: T.let[T.bool] = sg * U + u < STEPS and gq < S_ALL
                                for r2 in T.unroll(RF * 2):
                                    row: T.let[T.int32] = blk * 16 * RF + r2 // 2 * 16 + r2 % 2 * 8 + g
                                    grp: T.let[T.int32] = T.min(gq * SC + c * CW, K - 1) // G
                                    for v in T.unroll(2):
                                        sc2[r2 * 2 + v] = T.if_then_else(hq, T.Cast("float16", scales[
                                            row, grp]), T.float16(0))
                                        if not sym:
                                            mn2[r2 * 2 + v] = T.if_then_else(hq, T.Cast("float16", mins[
                                                row, grp]), T.float16(0))
                            for j in T.unroll(J):
                                for rf in T.unroll(RF):
                                    if quant:  # mma j: word j // 2 of rows g and g+8, low or high nibbles
                                        for h in T.unroll(2):
                                            for odd in T.unroll(2):
                                                af[T.Ramp(odd * 4 + h * 2, 1, 2)] = int4_pair(
                                                    swap_middle_bytes(wl[((u * RF + rf) * 2 + h) * WL + j // 2]),
                                                    j % 2, odd, magic, fmt, sc2[T.Ramp((rf * 2 + h) * 2, 1, 2)],
                                                    mn2[T.Ramp((rf * 2 + h) * 2, 1, 2)])
                                    else:
                                        for i in T.unroll(8):
                                            af[i] = a_dense(wl, u, rf, j, i)
                                    # every fragment, present tokens or not (an mma in a branch would hang
                                    # the emulator's barriers); an absent token's column is never stored
                                    for f in T.unroll(NF):
                                        for i in T.unroll(4):
                                            bf[i] = xl[b_offset(u, f, j) + i]
                                        T.evaluate(T.ptx_legacy.mma(
                                            "m16n8k16", "row", "col", ab, ab, "fp32", af.data, 0, bf.data, 0,
                                            acc.data, (rf * NF + f) * 4, False, dtype="float32"))
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

    wshape, wdt = ((N, K // 2), "uint8") if quant else ((N, K), dtype)
    KG = K // G
    bdt = bias_dtype or "float32"

    # one signature with every tensor; those this variant does not read are dropped below
    @T.prim_func(private=True)
    def mma_linear(x_h: T.handle, w: T.Buffer(wshape, wdt),  # type: ignore[valid-type]
                   s: T.Buffer((N, KG), scale_dtype), m: T.Buffer((N, KG), "float32"),  # type: ignore[valid-type]
                   b: T.Buffer((N,), bdt), o_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok = T.int64()
        xb = T.match_buffer(x_h, (ntok, K), dtype)
        ob = T.match_buffer(o_h, (ntok, N), out_dtype)
        wq = T.decl_buffer((N, K // 8), "uint32", data=w.data)  # INT4: a row's 16-byte chunks as words
        body(xb, w, wq, s, m, b, ob, ntok)

    x_h, w, s, m, b, o_h = mma_linear.params
    keep = [x_h, w] + ([s] if quant else []) + ([m] if quant and not sym else []) + ([b] if has_bias else []) + [o_h]
    return tvm.tirx.PrimFunc(keep, mma_linear.body, mma_linear.ret_type, mma_linear.attrs)


# Prefill: a tiled GEMM on the same mma's, operands by ldmatrix, 128 tokens x 128 outputs a block
GEMM_BM, GEMM_BN, GEMM_BK = 128, 128, 32  # tokens, outputs, columns of a step
GEMM_WARPS = 8  # 2 (tokens) x 4 (outputs): a warp's 64 x 32 outputs, 4 x 4 accumulator fragments


def mma_gemm_fits(in_features: int, out_features: int, dtype: str, fmt: QuantFormat | None = None) -> bool:
    """Whether ``make_mma_gemm_gpu`` builds: float16 or bfloat16, ``K`` a multiple of 32, ``N`` of 128; INT4
    weights (groups of a multiple of 32, so a step of 32 columns is in one group) with float16 activations."""
    if fmt is not None and not (dtype == "float16" and fmt.bits == 4 and fmt.group_size % GEMM_BK == 0
                                and fmt.check(in_features) is None):
        return False
    return dtype in ("float16", "bfloat16") and in_features % GEMM_BK == 0 and out_features % GEMM_BN == 0


def make_mma_gemm_gpu(in_features: int, out_features: int, dtype: str, out_dtype: str,
                      bias_dtype: str | None = None, fmt: QuantFormat | None = None, scale_dtype: str = "float16"):
    """PrimFunc ``mma_gemm(x[T, K], w | (qweight, scales, [mins]), [bias[N],] out[T, N])``: ``x @ w^T (+
    bias)`` for many tokens (prefill) on ``mma.sync.m16n8k16``, float32 accumulators; dense
    float16/bfloat16 weights, or INT4 ones (``quant_linear``'s row layout) under float16 activations.

    A block computes 128 tokens x 128 outputs (``GEMM_BM`` x ``GEMM_BN``) with 8 warps, each 64 tokens x 32
    outputs: 4 token fragments (the mma's A operand, 16 rows) x 4 output fragments (its B operand, 8
    columns). Per step of 32 columns of ``K`` the block stages both tiles in shared memory, double
    buffered: each thread loads its 16-byte chunks of the next step from global memory before the mma's
    of this one and stores them into the other buffer after them, one barrier a step. The operands come
    out of shared memory by ``ldmatrix.x4``, which hands each lane its elements of four 8 x 8 matrices in
    the mma's fragment layout: one per token fragment and 16 columns (A), one per pair of output
    fragments and 16 columns (B; ``x`` and ``w`` are both K-contiguous, as the row-major A and the
    "col" B of the mma want them). So the registers an mma reads are the ones a load wrote: no moves
    between them (the first form, 16-byte shared loads and the mma's fragments gathered from them, issued
    3 register moves per mma in SASS). Staged rows are 32 elements and 8 of padding (80 bytes): the 8 rows
    of each 8 x 8 matrix lie on distinct banks. Tokens past ``T`` load zeros and are never stored.
    INT4: a row's step is 16 bytes (32 nibbles), a thread loads half of it (2 words) and its group's scale
    (and min), and turns them into 16 float16 weights when it stores them (after this step's mma's):
    ``int4_pair``'s exact nibble decode times the scale, rounded to float16 once, as a dense float16
    weight of that value would be (an asymmetric min added in float16). The weight tile's global bytes a
    step are a quarter of float16's. ``mma_gemm_fits`` shapes; sm_80 and newer."""
    from tvm import tirx
    from tvm.script import tirx as T

    K, N = in_features, out_features
    assert mma_gemm_fits(K, N, dtype, fmt), (K, N, dtype, fmt)
    quant = fmt is not None
    sym = fmt is not None and fmt.sym
    G = fmt.group_size if fmt is not None else K
    BM, BN, BK = GEMM_BM, GEMM_BN, GEMM_BK
    BP = BK + 8  # a staged row with its padding
    NT = 32 * GEMM_WARPS
    KS = K // BK
    XC, WC = BM * BK // 8 // NT, BN * BK // 8 // NT  # 16-byte chunks of each tile a thread stages
    ab = mma_operand_type(dtype)
    ZERO = zero_const(dtype)
    has_bias = bias_dtype is not None

    @T.macro
    def load(x, w, wq, scales, mins, xr, wr, qr, sr, ntok, bm, bn, k0, tx):
        """Thread ``tx``'s chunks of the step at column ``k0`` into registers (zeros past the last token);
        INT4: its 2 words of row ``tx // 2`` and their group's scale (and min)."""
        for e in T.unroll(XC):
            r: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) // (BK // 8)
            cc: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) % (BK // 8) * 8
            if bm * BM + r < ntok:
                for v in T.vectorized(8):
                    xr[e * 8 + v] = x[bm * BM + r, k0 + cc + v]
            else:  # element by element: TVM's OpenCL bfloat16 pass cannot store a vector constant
                for v in T.unroll(8):
                    xr[e * 8 + v] = ZERO
        if quant:
            for v in T.vectorized(2):
                qr[v] = wq[bn * BN + T.Cast("int32", tx) // 2, k0 // 8 + T.Cast("int32", tx) % 2 * 2 + v]
            for v in T.unroll(2):
                sr[v] = T.Cast("float16", scales[bn * BN + T.Cast("int32", tx) // 2, k0 // G])
                if not sym:
                    sr[2 + v] = T.Cast("float16", mins[bn * BN + T.Cast("int32", tx) // 2, k0 // G])
        else:
            for e in T.unroll(WC):
                r2: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) // (BK // 8)
                c2: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) % (BK // 8) * 8
                for v in T.vectorized(8):
                    wr[e * 8 + v] = w[bn * BN + r2, k0 + c2 + v]

    @T.macro
    def store(xs, ws, xr, wr, qr, sr, wd, magic, buf, tx):
        """The staged chunks into shared buffer ``buf``; INT4: thread ``tx``'s 2 words (``tx % 2`` the
        first half of the row's 4 or the second) decoded into ``wd`` (16 float16: columns ``8 h`` .. ``8 h
        + 8`` of the low nibbles, then of the high ones: word ``2 h + v`` holds ``4 (2 h + v) + 16 run +
        b``), stored as two 16-byte rows' pieces."""
        for e in T.unroll(XC):
            r: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) // (BK // 8)
            cc: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) % (BK // 8) * 8
            for v in T.vectorized(8):
                xs[buf * BM * BP + r * BP + cc + v] = xr[e * 8 + v]
        if quant:
            for v in T.unroll(2):
                for run in T.unroll(2):
                    for odd in T.unroll(2):
                        wd[T.Ramp(run * 8 + v * 4 + odd * 2, 1, 2)] = int4_pair(
                            swap_middle_bytes(qr[v]), run, odd, magic, fmt, sr[T.Ramp(0, 1, 2)], sr[T.Ramp(2, 1, 2)])
            for run in T.unroll(2):
                for v in T.vectorized(8):
                    ws[buf * BN * BP + T.Cast("int32", tx) // 2 * BP + run * 16 + T.Cast("int32", tx) % 2 * 8
                       + v] = wd[run * 8 + v]
        else:
            for e in T.unroll(WC):
                r2: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) // (BK // 8)
                c2: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) % (BK // 8) * 8
                for v in T.vectorized(8):
                    ws[buf * BN * BP + r2 * BP + c2 + v] = wr[e * 8 + v]

    bdt = bias_dtype or "float32"
    KG = K // G
    wshape, wdt = ((N, K // 2), "uint8") if quant else ((N, K), dtype)

    # one signature with every tensor; those this variant does not read are dropped below
    @T.prim_func(private=True)
    def mma_gemm(x_h: T.handle, w: T.Buffer(wshape, wdt),  # type: ignore[valid-type]
                 s: T.Buffer((N, KG), scale_dtype), m: T.Buffer((N, KG), "float32"),  # type: ignore[valid-type]
                 b: T.Buffer((N,), bdt), o_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok = T.int64()
        x = T.match_buffer(x_h, (ntok, K), dtype)
        out = T.match_buffer(o_h, (ntok, N), out_dtype)
        wq = T.decl_buffer((N, K // 8), "uint32", data=w.data)  # INT4: a row's 16-byte steps as words
        # blockIdx.x the tokens: neighbouring blocks share a weight tile (the weights are the big operand)
        for bm in T.thread_binding((ntok + BM - 1) // BM, thread="blockIdx.x"):
            for bn in T.thread_binding(N // BN, thread="blockIdx.y"):
                for tx in T.thread_binding(NT, thread="threadIdx.x"):
                    xs = T.alloc_buffer((2 * BM * BP,), dtype, scope="shared")  # [buffer][token][32 + 8]
                    ws = T.alloc_buffer((2 * BN * BP,), dtype, scope="shared")  # [buffer][output][32 + 8]
                    xr = T.alloc_buffer((XC * 8,), dtype, scope="local")  # the next step's chunks
                    wr = T.alloc_buffer((WC * 8,), dtype, scope="local")
                    qr = T.alloc_buffer((2,), "uint32", scope="local")  # INT4: the next step's 2 words
                    sr = T.alloc_buffer((4,), "float16", scope="local")  # ... their scale, min (as pairs)
                    wd = T.alloc_buffer((16,), "float16", scope="local")  # ... decoded
                    # the step's operands as ldmatrix leaves them: A (token frag, 16-column half, 8 values),
                    # B (pair of output frags, half, 8 values: the pair's first frag's 4, then the second's);
                    # never vector-accessed, so the mma's offsets count elements
                    af = T.alloc_buffer((4 * 2 * 8,), dtype, scope="local")
                    bf = T.alloc_buffer((2 * 2 * 8,), dtype, scope="local")
                    acc = T.alloc_buffer((4 * 4 * 4,), "float32", scope="local")  # (token frag, output frag, 4)
                    warp: T.let[T.int32] = T.Cast("int32", tx) // 32
                    lane: T.let[T.int32] = T.Cast("int32", tx) % 32
                    g: T.let[T.int32] = lane // 4
                    c: T.let[T.int32] = lane % 4
                    m0: T.let[T.int32] = warp // 4 * 64  # the warp's first token and output in the block
                    n0: T.let[T.int32] = warp % 4 * 32
                    magic: T.let[T.uint32] = opaque_magic(T.Cast("int32", ntok), _MAGIC_H2)
                    for i in T.unroll(64):
                        acc[i] = T.float32(0)
                    load(x, w, wq, s, m, xr, wr, qr, sr, ntok, bm, bn, 0, tx)
                    store(xs, ws, xr, wr, qr, sr, wd, magic, 0, tx)
                    T.tvm_storage_sync("shared")
                    for ks in T.serial(KS):
                        if ks + 1 < KS:  # the next step's loads in flight during this step's mma's
                            load(x, w, wq, s, m, xr, wr, qr, sr, ntok, bm, bn, (ks + 1) * BK, tx)
                        for kk in T.unroll(2):
                            # A: lanes 0-15 name rows 0-15 at column 0 of the half, lanes 16-31 at column 8
                            for mf in T.unroll(4):
                                T.evaluate(T.ptx_legacy.ldmatrix(
                                    False, 4, ".b16", af.data, (mf * 2 + kk) * 8, T.address_of(xs[
                                        ks % 2 * BM * BP + (m0 + mf * 16 + lane % 16) * BP + kk * 16
                                        + lane // 16 * 8]), 0, dtype=dtype))
                            # B: lanes 8j..8j+7 name matrix j's rows: outputs 0-7 (j 0, 1) or 8-15 (j 2, 3) of
                            # the pair, at column 0 (j even) or 8 of the half
                            for p in T.unroll(2):
                                T.evaluate(T.ptx_legacy.ldmatrix(
                                    False, 4, ".b16", bf.data, (p * 2 + kk) * 8, T.address_of(ws[
                                        ks % 2 * BN * BP + (n0 + p * 16 + lane // 16 * 8 + lane % 8) * BP
                                        + kk * 16 + lane // 8 % 2 * 8]), 0, dtype=dtype))
                        for kk in T.unroll(2):
                            for mf in T.unroll(4):
                                for nf in T.unroll(4):
                                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32", af.data,
                                                                (mf * 2 + kk) * 8, bf.data,
                                                                (nf // 2 * 2 + kk) * 8 + nf % 2 * 4, acc.data,
                                                                (mf * 4 + nf) * 4, False, dtype="float32"))
                        if ks + 1 < KS:  # the other buffer: last read a step ago, before that barrier
                            store(xs, ws, xr, wr, qr, sr, wd, magic, (ks + 1) % 2, tx)
                        T.tvm_storage_sync("shared")
                    for mf in T.unroll(4):
                        for h in T.unroll(2):
                            if bm * BM + m0 + mf * 16 + h * 8 + g < ntok:
                                for nf in T.unroll(4):
                                    for e in T.unroll(2):
                                        out[bm * BM + m0 + mf * 16 + h * 8 + g, bn * BN + n0 + nf * 8 + c * 2 + e] = (
                                            T.Cast(out_dtype, acc[(mf * 4 + nf) * 4 + h * 2 + e] + (
                                                T.Cast("float32", b[bn * BN + n0 + nf * 8 + c * 2 + e]) if has_bias
                                                else T.float32(0))))

    x_h, w, s, m, b, o_h = mma_gemm.params
    keep = [x_h, w] + ([s] if quant else []) + ([m] if quant and not sym else []) + ([b] if has_bias else []) + [o_h]
    return tirx.PrimFunc(keep, mma_gemm.body, mma_gemm.ret_type, mma_gemm.attrs)


def mma_linear_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T + bias`` with float32 sums of the exact products (as the mma's float32 accumulators),
    as float32."""
    out = x.astype(np.float32) @ w.astype(np.float32).T
    return out if bias is None else out + bias.astype(np.float32)

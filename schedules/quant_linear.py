"""Group-affine quantized linear (INT4 and INT8) with dequantization fused into the matmul, and the
quantized embedding gather, with their numpy references.

One family covers GPTQ (any group size, symmetric or with zeros, act-order) and GGUF Q4_0 / Q4_1 /
Q8_0. A weight ``W[N, K]`` is stored per output row in groups of ``G`` input columns::

    W[n, k] = scales[n, k // G] * (q[n, k] - zp)        symmetric: zp = 8 (int4) or 0 (int8)
    W[n, k] = scales[n, k // G] * q[n, k] + mins[n, k // G]      asymmetric
    W[n, k] = scales[n, k // G] * table[q[n, k]]        4-bit codes of a 16-value table (GGUF's IQ types;
                                                       the r16 CPU kernel only)

Kernel layout (what the artifact stores):
- int4: ``qweight`` uint8 ``[N, K/2]``; in every block of 32 columns byte ``j`` holds ``q[j]`` in its low
  nibble and ``q[j + 16]`` in its high nibble (GGUF's Q4 layout, so GGUF blocks repack by dropping
  their scales). ``K`` and ``G`` are multiples of 32 (``G`` 16 too on x86 CPUs: ``int_dot_only``).
- int8: ``qweight`` int8 ``[N, K]`` (signed). ``G`` is a multiple of 16.
- ``scales`` float16 ``[N, K/G]``; ``mins`` float32 ``[N, K/G]`` when asymmetric (a GPTQ ``-scale * zero``
  is exact in float32, not in float16).
Act-order (GPTQ ``g_idx``) is handled outside the kernel: the columns are sorted by group at compile
time and the activations gathered with the same permutation (IR op ``take_cols``).

CPU kernel: per output row, each group's dot product with the raw integers is accumulated in 16
float32 lanes, then scaled once per group: ``sum_g s_g * (x_g · q_g) + (m_g or -zp * s_g) * sum(x_g)``,
with the per-group activation sums ``sum(x_g)`` computed once per token. Decode (few tokens) reads each
packed weight once; prefill dequantizes a block of rows into a float32 tile once and reuses it for
every token. GPU targets use the same math as one TE reduction that dlight schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dtype_bytes
from .block_reduce import block_sum_columns, threads_for

_ROWS_PER_TASK = 16
R16 = 16  # rows interleaved per block in the "r16" layout (one 512-bit register of int32 row sums)
LAYOUTS = ("rows", "r16")
_LANES = 16
_TILE_MIN_TOKENS = 4  # from this many tokens on, dequantize a row block once and reuse it
_TOKEN_BLOCK = 4  # tokens per register block of the tile path


@dataclass(frozen=True)
class QuantFormat:
    """What a kernel needs to know about a quantized weight; recorded per linear in the manifest."""

    bits: int  # 4 | 8
    group_size: int
    sym: bool
    # 4-bit codes that index 16 signed 8-bit values (GGUF's IQ types: ``W = scale * table[q]``; symmetric, the
    # r16 kernel only); () for plain integers
    table: tuple[int, ...] = ()

    @property
    def zero_point(self) -> int:
        return 8 if self.bits == 4 and not self.table else 0

    @property
    def tag(self) -> str:
        """A short name for the table (kernel names): '' or ``t`` and 8 hex digits of its crc32."""
        import zlib

        return f"t{zlib.crc32(np.asarray(self.table, np.int8).tobytes()):08x}" if self.table else ""

    def levels(self, q: np.ndarray) -> np.ndarray:
        """The integers that stored values ``q`` (nibbles or int8) stand for, as float64: ``table[q]``,
        ``q - zp`` (symmetric) or ``q`` (asymmetric)."""
        if self.table:
            return np.asarray(self.table, np.float64)[q]
        return q.astype(np.float64) - (self.zero_point if self.sym else 0)

    @property
    def int_dot_only(self) -> bool:
        """Only CPU targets with integer dot products (AVX2, AVX-512 VNNI) read this format, in the r16
        kernel and the MoE experts' ``row_loader``: 4-bit codes of a table (``pshufb``), 4-bit groups of 16."""
        return bool(self.table) or (self.bits == 4 and self.group_size % 32 != 0)

    def widened(self) -> "QuantFormat":
        """The same integers (a table's values) in 8 bits, for the kernels that cannot read ``int_dot_only``
        formats."""
        return QuantFormat(8, self.group_size, self.sym)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantFormat":
        return cls(int(d["bits"]), int(d["group_size"]), bool(d["sym"]), tuple(int(v) for v in d.get("table", ())))

    def packed_shapes(self, n: int, k: int, layout: str = "rows") -> dict[str, tuple[tuple[int, int], str]]:
        """``{tensor: (shape, dtype)}`` of the kernel-layout tensors for a ``[n, k]`` weight."""
        kg = k // self.group_size
        if layout == "r16":  # see interleave_r16
            nb = -(-n // R16)
            shapes = {"qweight": ((nb, k * R16 * self.bits // 8), "uint8"), "scales": ((nb, kg * R16), "float16")}
            if not self.sym:
                shapes["mins"] = ((nb, kg * R16), "float32")
            return shapes
        shapes = {"qweight": ((n, k // 2), "uint8") if self.bits == 4 else ((n, k), "int8"),
                  "scales": ((n, kg), "float16")}
        if not self.sym:
            shapes["mins"] = ((n, kg), "float32")
        return shapes

    def check(self, k: int) -> str | None:
        """Why a weight with ``k`` input columns cannot use this format (None when it can)."""
        if self.bits not in (4, 8):
            return f"{self.bits}-bit weights are not supported (4 or 8)"
        if self.table and (self.bits != 4 or not self.sym or len(self.table) != 16
                           or not all(-127 <= v <= 127 for v in self.table)):
            return "a value table holds 16 values in -127..127 for symmetric 4-bit codes"
        if self.bits == 4 and self.group_size == 16:  # two groups a 32-column block (int_dot_only)
            return None if k % 32 == 0 else f"4-bit groups of 16 need in_features {k} to be a multiple of 32"
        unit = 32 if self.bits == 4 else 16
        if self.group_size % unit or k % self.group_size:
            return f"group size {self.group_size} must be a multiple of {unit} dividing in_features {k}"
        return None

    def to_dict(self) -> dict:
        d = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        return {**d, "table": list(self.table)} if self.table else d


# ---------------------------------------------------------------- numpy references and packing

def pack_int4(q: np.ndarray) -> np.ndarray:
    """``q[N, K]`` values 0..15 → uint8 ``[N, K/2]`` in the 32-column block layout."""
    n, k = q.shape
    blocks = q.astype(np.uint8).reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(n, k // 2)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    n, half = packed.shape
    b = packed.reshape(n, half // 16, 1, 16)
    return np.concatenate([b & 15, b >> 4], axis=2).reshape(n, half * 2)


def interleave_r16(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row-layout int4 (uint8 nibble pairs) or int8 tensors → the "r16" layout of the integer-dot CPU kernel
    (``make_qlinear_r16_cpu``).

    Rows are taken 16 at a time (the last block zero-padded). int4: for row block ``b``, 32-column block
    ``j`` and chunk ``c`` (0..3), 64 consecutive bytes hold byte ``4c + i`` (i = 0..3) of row-layout block
    ``j`` for each of the 16 rows in turn: their low nibbles are columns ``4c + i``, their high nibbles
    columns ``16 + 4c + i``, so one 64-byte load gives every row's 4 weights for one 4-byte activation word.
    int8: chunk ``c`` (0 .. K/4 - 1) holds columns ``4c .. 4c + 3`` of the 16 rows, each value stored
    unsigned as ``q + 128``. ``scales``/``mins`` become ``[blocks, groups * 16]``: the 16 rows' values of a
    group side by side."""
    qw = packed["qweight"]
    n, width = qw.shape
    nb, pad = -(-n // R16), -n % R16
    if qw.dtype == np.int8:
        u = (qw.astype(np.int16) + 128).astype(np.uint8)
        out = {"qweight": np.pad(u, ((0, pad), (0, 0))).reshape(nb, R16, width // 4, 4)
               .transpose(0, 2, 1, 3).reshape(nb, width * 16)}
    else:
        out = {"qweight": np.pad(qw, ((0, pad), (0, 0))).reshape(nb, R16, width // 16, 4, 4)
               .transpose(0, 2, 3, 1, 4).reshape(nb, width * 16)}
    for role in ("scales", "mins"):
        if role in packed:
            t = np.pad(packed[role], ((0, pad), (0, 0)))
            out[role] = t.reshape(nb, R16, -1).transpose(0, 2, 1).reshape(nb, -1)
    return {**packed, **out}


def deinterleave_r16(packed: dict[str, np.ndarray], n: int, bits: int = 4) -> dict[str, np.ndarray]:
    """Inverse of ``interleave_r16`` for a ``bits``-bit weight with ``n`` rows."""
    qw = packed["qweight"]
    nb, width = qw.shape
    if bits == 8:
        q = qw.reshape(nb, width // 64, R16, 4).transpose(0, 2, 1, 3).reshape(nb * R16, width // 16)[:n]
        out = {"qweight": (q.astype(np.int16) - 128).astype(np.int8)}
    else:
        out = {"qweight": qw.reshape(nb, width // 256, 4, R16, 4).transpose(0, 3, 1, 2, 4)
               .reshape(nb * R16, width // 16)[:n]}
    for role in ("scales", "mins"):
        if role in packed:
            t = packed[role]
            out[role] = t.reshape(nb, -1, R16).transpose(0, 2, 1).reshape(nb * R16, -1)[:n]
    return {**packed, **out}


ACT_BITS = (8, 16)  # the r16 kernel's activation precisions


def looked_up(fmt: QuantFormat, codes, n: int, plus: int = 0):
    """TIR uint8 x ``n`` (16 or 64): ``fmt.table``'s values (plus ``plus``, mod 256) of the 4-bit ``codes``
    (uint8 x ``n``), one ``pshufb`` per 128 bits (x86: SSSE3, AVX-512 BW for 64). The table is a constant
    vector in the code."""
    from tvm.script import tirx as T

    table = [T.uint8((v + plus) % 256) for v in fmt.table] * (n // 16)
    intrin = "llvm.x86.avx512.pshuf.b.512" if n == 64 else "llvm.x86.ssse3.pshuf.b.128"
    return T.reinterpret(f"uint8x{n}", T.call_llvm_pure_intrin(
        f"int8x{n}", intrin, T.reinterpret(f"int8x{n}", T.Shuffle(table, list(range(n)))),
        T.reinterpret(f"int8x{n}", codes)))


def act_qmax(fmt: QuantFormat, bits: int) -> int:
    """The largest activation integer of the r16 kernel: ``2^(bits-1) - 1``, less 128 for 8-bit weights (and
    a table's values) with 16-bit activations. Their weight bytes are the unsigned operand of the byte dot
    product (value + 128), so both bytes of an activation must be signed: ``high = (q + 128) >> 8`` and
    ``low = q - 256 * high``, with ``high`` at most 127 for ``|q| <= 32639``."""
    return 2 ** (bits - 1) - 1 - (128 if (fmt.bits == 8 or fmt.table) and bits == 16 else 0)


def quantize_activations_ref(x: np.ndarray, group_size: int, bits: int = 16,
                             qmax: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What the r16 kernel multiplies: per token and group, ``x ≈ dx * q`` with ``q`` a ``bits``-bit
    integer (``dx = max|x| / qmax``, ``qmax`` ``2^(bits-1) - 1`` unless given: ``act_qmax``); returns
    ``(q [T, K] int32, dx [T, K/G] float32)``."""
    t, k = x.shape
    top = np.float32(2 ** (bits - 1) - 1 if qmax is None else qmax)
    xg = x.astype(np.float32).reshape(t, k // group_size, group_size)
    amax = np.abs(xg).max(axis=2)
    dx = (amax / top).astype(np.float32)
    inv = np.where(amax > 0, top / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.round(xg * inv[:, :, None]).astype(np.int32)
    return q.reshape(t, k), dx


def activation_error_bound(x: np.ndarray, fmt: QuantFormat, w: np.ndarray, bits: int = 16) -> np.ndarray:
    """Worst-case ``|r16 kernel - exact|`` from rounding the activations to ``bits`` bits: the kernel computes
    ``W x^`` with ``x^`` the rounded activations (``quantize_activations_ref``), so per output
    ``sum_g dx_g / 2 * sum_{k in g} |W[n, k]|`` (``w`` the dequantized ``[N, K]`` weight)."""
    _, dx = quantize_activations_ref(x, fmt.group_size, bits, act_qmax(fmt, bits))
    wg = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1, fmt.group_size).sum(axis=2)  # [N, K/G]
    return (dx.astype(np.float64) / 2) @ wg.T


def dequantize_ref(fmt: QuantFormat, qweight: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> np.ndarray:
    """Kernel-layout tensors → float64 ``W[N, K]``."""
    q = unpack_int4(qweight) if fmt.bits == 4 else qweight
    s = np.repeat(scales.astype(np.float64), fmt.group_size, axis=1)
    if fmt.sym:
        return s * fmt.levels(q)
    assert mins is not None, "asymmetric formats need mins"
    return s * q + np.repeat(mins.astype(np.float64), fmt.group_size, axis=1)


def qlinear_ref(x: np.ndarray, fmt: QuantFormat, qweight: np.ndarray, scales: np.ndarray, mins: np.ndarray | None,
                bias: np.ndarray | None = None, out_dtype: str | None = None) -> np.ndarray:
    out = x.astype(np.float64) @ dequantize_ref(fmt, qweight, scales, mins).T
    if bias is not None:
        out = out + bias.astype(np.float64)
    return out.astype(out_dtype or x.dtype)


def qembedding_ref(fmt: QuantFormat, qweight: np.ndarray, scales: np.ndarray, mins: np.ndarray | None,
                   ids: np.ndarray) -> np.ndarray:
    rows = [qweight[ids], scales[ids], None if mins is None else mins[ids]]
    return dequantize_ref(fmt, rows[0], rows[1], rows[2])


# ---------------------------------------------------------------- CPU kernel

def make_qlinear_cpu(in_features: int, out_features: int, fmt: QuantFormat, x_dtype: str, out_dtype: str,
                     bias_dtype: str | None):
    """PrimFunc ``qlinear(x[T,K], qweight, scales, [mins,] [bias[N],] out[T,N])``."""
    from tvm.script import tirx as T

    K, N, G, L = in_features, out_features, fmt.group_size, _LANES
    assert fmt.check(K) is None, fmt.check(K)
    KG = K // G
    R, TB = _ROWS_PER_TASK, _TOKEN_BLOCK
    tasks = (N + R - 1) // R
    int4 = fmt.bits == 4
    sym, zp, has_bias = fmt.sym, float(fmt.zero_point), bias_dtype is not None
    chunks = G // 32 if int4 else G // L  # 16-lane steps per group (int4: two nibble halves each)
    qshape, qdtype = fmt.packed_shapes(N, K)["qweight"]

    @T.macro
    def group_sums(x, xs, ntok):
        for i in T.serial(ntok):  # K adds per token: not worth waking the thread pool
            for g in T.serial(KG):
                xs[i, g] = T.float32(0)
                for kk in T.serial(G):
                    xs[i, g] = xs[i, g] + T.Cast("float32", x[i, g * G + kk])

    @T.macro
    def finish(acc, corr, b, out, i, n):
        for ll in T.serial(L - 1):
            acc[0] = acc[0] + acc[ll + 1]
        acc[0] = acc[0] + corr[0]
        if has_bias:
            acc[0] = acc[0] + T.Cast("float32", b[n])
        out[i, n] = T.Cast(out_dtype, acc[0])

    @T.macro
    def group_correction(corr, scales, mins, xs, i, n, g):
        if sym:
            corr[0] = corr[0] - T.Cast("float32", scales[n, g]) * T.float32(zp) * xs[i, g]
        else:
            corr[0] = corr[0] + mins[n, g] * xs[i, g]

    @T.macro
    def decode_rows(x, w, scales, mins, b, out, xs, ntok):
        # each packed weight is read once per token; the integer dot product is scaled once per group
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((L,), "float32")
            accg = T.alloc_buffer((L,), "float32")
            corr = T.alloc_buffer((1,), "float32")
            for i in T.serial(ntok):
                for r in T.serial(R):
                    if task * R + r < N:
                        n: T.let[T.int32] = task * R + r
                        corr[0] = T.float32(0)
                        for ll in T.vectorized(L):
                            acc[ll] = T.float32(0)
                        for g in T.serial(KG):
                            for ll in T.vectorized(L):
                                accg[ll] = T.float32(0)
                            for c in T.serial(chunks):
                                if int4:
                                    for ll in T.vectorized(L):
                                        accg[ll] = accg[ll] + T.Cast("float32", x[i, g * G + c * 32 + ll]) * T.Cast(
                                            "float32", T.bitwise_and(w[n, g * (G // 2) + c * 16 + ll], T.uint8(15))
                                        ) + T.Cast("float32", x[i, g * G + c * 32 + 16 + ll]) * T.Cast(
                                            "float32", T.shift_right(w[n, g * (G // 2) + c * 16 + ll], T.uint8(4)))
                                else:
                                    for ll in T.vectorized(L):
                                        accg[ll] = accg[ll] + T.Cast("float32", x[i, g * G + c * L + ll]) * T.Cast(
                                            "float32", w[n, g * G + c * L + ll])
                            for ll in T.vectorized(L):
                                acc[ll] = acc[ll] + accg[ll] * T.Cast("float32", scales[n, g])
                            group_correction(corr, scales, mins, xs, i, n, g)
                        finish(acc, corr, b, out, i, n)

    load_row = row_loader(fmt, K)
    tile_matmul = _tile_matmul(K, R, TB, _block_store(N, R, has_bias, out_dtype))

    @T.macro
    def tile_rows(x, w, scales, mins, b, out, ntok):
        # dequantize R rows once into a float32 tile, transposed so the R outputs of a token sit in SIMD
        # lanes; then a TB-token x R-row register block: per k, one tile vector and TB broadcast FMAs
        for task in T.parallel(tasks):
            tile = T.alloc_buffer((R, K), "float32")
            tile_t = T.alloc_buffer((K, R), "float32")
            acc = T.alloc_buffer((TB, R), "float32")
            for r in T.serial(R):
                if task * R + r < N:
                    load_row(tile, w, scales, mins, r, task * R + r)
                else:
                    for kk in T.serial(K):
                        tile[r, kk] = T.float32(0)
            for kk in T.serial(K):
                for r in T.vectorized(R):
                    tile_t[kk, r] = tile[r, kk]
            tile_matmul(x, tile_t, acc, b, out, task, ntok)

    @T.macro
    def body(x, w, scales, mins, b, out, ntok):
        if ntok < _TILE_MIN_TOKENS:
            xs = T.alloc_buffer((_TILE_MIN_TOKENS, KG), "float32")
            group_sums(x, xs, ntok)
            decode_rows(x, w, scales, mins, b, out, xs, ntok)
        else:
            tile_rows(x, w, scales, mins, b, out, ntok)

    G2 = (N, KG)
    if sym and not has_bias:
        @T.prim_func(private=True)
        def qlinear_s(x_h: T.handle, w: T.Buffer(qshape, qdtype), s: T.Buffer(G2, "float16"),  # type: ignore[valid-type]
                      o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            ntok = T.int64()
            body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, None, None, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)
        return qlinear_s
    if sym:
        @T.prim_func(private=True)
        def qlinear_sb(x_h: T.handle, w: T.Buffer(qshape, qdtype), s: T.Buffer(G2, "float16"),  # type: ignore[valid-type]
                       b: T.Buffer((N,), bias_dtype), o_h: T.handle):  # type: ignore[valid-type]
            T.func_attr({"tirx.noalias": True})
            ntok = T.int64()
            body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, None, b, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)
        return qlinear_sb
    if not has_bias:
        @T.prim_func(private=True)
        def qlinear_a(x_h: T.handle, w: T.Buffer(qshape, qdtype), s: T.Buffer(G2, "float16"),  # type: ignore[valid-type]
                      m: T.Buffer(G2, "float32"), o_h: T.handle):  # type: ignore[valid-type]
            T.func_attr({"tirx.noalias": True})
            ntok = T.int64()
            body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, m, None, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)
        return qlinear_a

    @T.prim_func(private=True)
    def qlinear_ab(x_h: T.handle, w: T.Buffer(qshape, qdtype), s: T.Buffer(G2, "float16"),  # type: ignore[valid-type]
                   m: T.Buffer(G2, "float32"), b: T.Buffer((N,), bias_dtype), o_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True})
        ntok = T.int64()
        body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, m, b, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)
    return qlinear_ab


INT_DOT_ISAS = ("avx512_vnni", "avx2")


def r16_supports(fmt: QuantFormat, act_bits: int, isa: str) -> bool:
    """Formats the r16 kernel takes with ``act_bits``-bit activations (8 or 16): int4 (groups of 16 or 32k),
    and int8 (symmetric or with mins, any group of 16k columns) and 4-bit codes of a value table (groups of
    16 or 32k), with 16-bit activations in groups of at most 256 columns (a group's integer sums stay within
    int32). ``isa`` is either of ``INT_DOT_ISAS``."""
    if act_bits not in ACT_BITS or isa not in INT_DOT_ISAS or fmt.bits not in (4, 8):
        return False
    if fmt.bits == 4 and fmt.group_size % 32 and fmt.group_size != 16:
        return False
    if fmt.bits == 4 and not fmt.table:
        return True
    return fmt.group_size % 16 == 0 and (act_bits == 8 or fmt.group_size <= 256)


_R16_DECODE_TOKENS = 1  # tokens per register block below _TILE_MIN_TOKENS tokens (weights re-read from L1)
_R16_PREFILL_TOKENS = 4
_AVX2_TILE_MIN_TOKENS = 128  # AVX2 from this many tokens on: dequantized float tiles (make_qlinear_r16_cpu)


def make_qlinear_r16_cpu(in_features: int, out_features: int, fmt: QuantFormat, x_dtype: str, out_dtype: str,
                         bias_dtype: str | None, isa: str, act_bits: int = 16, experts: int = 0, x_div: int = 1):
    """PrimFunc ``qlinear(x[T,K], qweight, scales, [mins,] [bias[N],] out[T,N])`` for int4 weights (and the
    int8 ones ``r16_supports`` admits) in the "r16" layout (``interleave_r16``), with integer dot products.

    With ``experts``: the MoE experts' grouped linear ``(x[T,K], qweight, scales, [mins,] offsets[E+1],
    order[S], out[S,N])`` over a stack of ``experts`` weights of ``N`` rows each (a multiple of 16: every
    16-row block is one expert's), in the same layout: slot ``order[offsets[e] + p]`` multiplies expert
    ``e`` by token ``slot // x_div`` (``moe.make_moe_dispatch``), a task per expert and row block, an expert
    nobody chose never read.

    Each token's activations are rounded per weight group to ``act_bits`` bits (``x ≈ dx * q``, ``dx =
    max|x| / (2^(act_bits-1) - 1)``: a relative error of 1.5e-5 (16 bits) or 3.9e-3 (8 bits, what
    llama.cpp's Q8 activations give) of the group's largest value; ``activation_error_bound``). 16-bit
    values are split into a signed high byte and an unsigned low byte (int8 weights, which are the unsigned
    operand: two signed bytes, ``act_qmax``), 8-bit ones are one signed byte; 4 columns per 32-bit word.
    One 64-byte load gives 16 rows x 8 columns of nibbles; masked and shifted, each half feeds one u8 x s8
    4-way dot product per activation byte (``vpdpbusd`` with AVX-512 VNNI;
    ``vpmaddubsw`` + ``vpmaddwd`` with AVX2), accumulating the 16 rows' integer sums in the 16 lanes of one
    register (no horizontal reduction): 8-bit activations halve the dot products. Per group ``sum = 256 *
    high + low`` (or the one byte's sum) is exact in int32 and, for int4 weights, float32 (|sum| < 2^24 for
    32 columns), then scaled by ``scale * dx`` and corrected by ``(min or -zp * scale) * dx * sum(q_g)``
    (int8 weights: their ``+ 128`` is taken off as ``sum - 128 sum(q_g)`` in int32 before the one rounding
    to float32, and only a min is added after): the kernel computes ``W x^`` exactly but for float32
    rounding, ``x^`` the rounded activations. An int8 group of 16 columns is 4 activation words, two
    accumulator chains of 2 (32k columns: blocks of 8 words, chains of 4).

    int8 weights on AVX2 (where ``vpmaddubsw`` would saturate a pair of 255 x 127 products) take 16-bit
    products instead: each 16-byte quarter of a chunk (4 rows x 4 columns) is widened to signed 16 bits and
    ``vpmaddwd`` multiplies it by the 4 columns' activations, whole (``act_qmax``, no byte split), leaving
    each row's two pair sums side by side in 8 int32 lanes; a group's 32 lanes are added pairwise once at
    its end. Exact in int32: a lane sums at most ``G / 2`` products of ``128 x 32639``. On AVX2, from
    ``_AVX2_TILE_MIN_TOKENS`` tokens on, a 16-row block is instead dequantized into a float32 tile and
    multiplied with float FMAs (``tile_rows``), which beat AVX2's integer products at many tokens."""
    from tvm.script import tirx as T

    assert isa in INT_DOT_ISAS and act_bits in ACT_BITS and r16_supports(fmt, act_bits, isa), (fmt, isa, act_bits)
    K, N, G = in_features, out_features, fmt.group_size
    assert fmt.check(K) is None, fmt.check(K)
    assert not experts or (N % R16 == 0 and bias_dtype is None), "experts: whole 16-row blocks, no bias"
    grouped = experts > 0
    eight = fmt.bits == 8  # one weight per byte, stored as q + 128
    lut = bool(fmt.table)  # 4-bit codes, each 16 bytes of them looked up in the value table (pshufb)
    # a block is S activation words (4 columns each), split between two accumulator chains of S / 2; int4:
    # one 32-column block of nibbles (its low nibbles 16 columns, its high ones the next 16)
    S = min(8, G // 4) if eight else 8
    # 4-bit groups of 16: each 32-column block holds two groups, its low nibbles' and its high nibbles'
    pair = fmt.bits == 4 and G == 16
    KG, NB, BPG, W4 = K // G, -(-N // R16), 1 if pair else G // 4 // S, K // 4
    sym, zp, has_bias = fmt.sym, float(fmt.zero_point), bias_dtype is not None
    qshape = fmt.packed_shapes(max(experts, 1) * N, K, "r16")
    vnni = isa == "avx512_vnni"
    madd = (eight or lut) and not vnni  # AVX2 int8 and tables: 16-bit products (vpmaddwd), the activations whole
    wide = act_bits == 16 and not madd  # two activation bytes per value
    offset = (eight or lut) and not madd  # the weights are the unsigned operand as value + 128
    qmax = float(act_qmax(fmt, act_bits))
    store = _block_store(N, R16, has_bias, out_dtype)
    tile_matmul = _tile_matmul(K, R16, _TOKEN_BLOCK, store)  # AVX2 prefill (tile_rows)

    # TVMScript 0.27 turns a plain ``name = expr`` in a kernel into a scratch buffer that costs a workspace
    # call per parallel task; the helpers below build expressions instead, and scalars use ``T.let``
    def lanes(buf, tt):
        return buf[T.ramp(tt * R16, 1, R16)]

    def weight_bytes(w, task, chunk):
        return w[task, T.ramp(chunk * 64, 1, 64)]

    def expanded(TB):
        """Whether a task looks its tables' codes up once into a scratch (VNNI, several token blocks)."""
        return lut and offset and TB > 1

    def operand(w, ex, task, wl, high, TB):
        """The 64 unsigned bytes (16 rows x 4 columns, each value + 128) that multiply activation word ``wl``
        (``high``: word ``wl + S / 2``): 8-bit weights as stored; a table's values from the task's scratch
        (``expanded``) or looked up from the chunk's low or high nibbles (word ``wl`` of a 32-column block
        is its chunk ``wl % 8``: the lookup is ``values`` of ``nibbles``)."""
        if eight:
            return weight_bytes(w, task, wl + S // 2 if high else wl)
        if expanded(TB):
            return ex[T.ramp((wl + 4 if high else wl) * 64, 1, 64)]
        return values(nibbles(w, task, wl // 8 * 4 + wl % 8, high), 64)

    def nibbles(w, task, chunk, high):
        v = weight_bytes(w, task, chunk)
        return T.shift_right(v, T.broadcast(T.uint8(4), 64)) if high else T.bitwise_and(v, T.broadcast(T.uint8(15), 64))

    def word(buf, t, i):
        return T.broadcast(buf[t, i], R16)

    def values(codes, n):
        """uint8 x ``n``: the table's values of the 4-bit ``codes`` (plus 128 for the unsigned operand)."""
        return looked_up(fmt, codes, n, 128 if offset else 0)

    def dot4(acc, a_u8, b_s8):
        """int32x16 ``acc`` + per lane the 4-way dot of unsigned bytes ``a_u8`` and signed bytes ``b_s8``."""
        if vnni:
            return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                           T.reinterpret("int8x64", a_u8), T.reinterpret("int8x64", b_s8))
        halves = []
        for half in (T.vectorlow, T.vectorhigh):  # rows 0-7 and 8-15: two 256-bit halves
            a = half("int8x32", T.reinterpret("int8x64", a_u8))
            b = half("int8x32", T.reinterpret("int8x64", b_s8))
            pairs = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", a, b)  # no saturation: |pair| < 2^13
            halves.append(T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs,
                                                  T.broadcast(T.int16(1), 16)))
        return acc + T.vectorcombine("int32x16", halves[0], halves[1])

    def group_sum(hl, hh, ll, lh, tt, sq_g, half=""):
        """int32x16: one group's integer row sums (exact): ``256 * high + low`` (16-bit activations) or the
        one byte's sum; for int8 weights less their ``+ 128``'s term ``128 sum(x^)``, taken in integers so
        that only the final sum is rounded to float32. AVX2 int8: the 16 rows' pairs of lanes added. ``half``
        ("low" or "high"; ``pair``): the sums of the low or the high nibbles only, a group of 16."""
        if madd:
            h = hh if half == "high" else hl
            return h[T.ramp(tt * 2 * R16, 2, R16)] + h[T.ramp(tt * 2 * R16 + 1, 2, R16)]
        if half:
            total, low = (lanes(hl, tt), lanes(ll, tt)) if half == "low" else (lanes(hh, tt), lanes(lh, tt))
        else:
            total, low = lanes(hl, tt) + lanes(hh, tt), lanes(ll, tt) + lanes(lh, tt)
        if wide:
            total = T.shift_left(total, T.broadcast(8, R16)) + low
        return total - T.broadcast(sq_g * 128, R16) if offset else total

    def accumulate(acc_v, isum, s, m, task, g, dx_g, sx_g):
        """float32x16 ``acc_v`` (the 16 rows' outputs for one token) plus group ``g``'s integer row sums
        ``isum`` scaled by ``scale * dx``, with the min's term (int8: the zero point's is in ``isum``) or,
        for int4, the zero point's or min's term, in float32."""
        scale = scales16(s, task, g) * T.broadcast(dx_g, R16)
        total = acc_v + T.Cast("float32x16", isum) * scale
        return total if (eight or lut) and sym else total + zero_term(s, m, task, g, sx_g)

    def madd16(acc8, w, task, chunk, r, xword, high=None):
        """int32x8 ``acc8`` plus ``vpmaddwd`` of rows ``4r .. 4r + 3`` of weight chunk ``chunk`` (widened to
        signed 16 bits: ``q + 128 - 128``; tables: the values of the chunk's low or ``high`` nibbles) and the
        4 columns' 16-bit activations ``xword`` (a uint64)."""
        raw = w[task, T.ramp(chunk * 64 + r * 16, 1, 16)]
        if lut:
            codes = T.shift_right(raw, T.broadcast(T.uint8(4), 16)) if high else T.bitwise_and(
                raw, T.broadcast(T.uint8(15), 16))
            q = T.Cast("int16x16", T.reinterpret("int8x16", values(codes, 16)))
        else:
            q = T.Cast("int16x16", raw) - T.broadcast(T.int16(128), 16)
        xs = T.reinterpret("int16x16", T.broadcast(xword, 4))
        return acc8 + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", q, xs)

    def scales16(s, task, g):
        """float32x16: the 16 rows' scales of group ``g``."""
        return T.Cast("float32x16", s[task, T.ramp(g * R16, 1, R16)])

    def zero_term(s, m, task, g, sx_g):
        """float32x16 per row: ``min * sum(x^_g)`` (asymmetric) or ``-zp * scale * sum(x^_g)``."""
        if sym:
            return -scales16(s, task, g) * T.broadcast(sx_g * T.float32(zp), R16)
        return m[task, T.ramp(g * R16, 1, R16)] * T.broadcast(sx_g, R16)

    def xf(x, i, k):
        return T.Cast("float32", x[i, k])

    def packed_bytes(x, i, g, w4, inv, high):
        """The 4 high (signed) or low bytes of columns ``4 w4 .. 4 w4 + 3`` of group ``g``, as one word (an
        8-bit value's low byte is the whole signed value; with int8 weights both bytes of a 16-bit value are
        signed: ``high = (q + 128) >> 8``, ``low = q - 256 * high``)."""
        word = T.uint32(0)
        for j in range(4):
            q = T.Cast("int32", T.round(xf(x, i, g * G + w4 * 4 + j) * inv))
            if offset and wide:
                hi = T.shift_right(q + 128, 8)
                byte = T.bitwise_and(hi if high else q - T.shift_left(hi, 8), 255)
            else:
                byte = T.bitwise_and(T.shift_right(q, 8) if high else q, 255)
            word = word | T.shift_left(T.Cast("uint32", byte), T.uint32(8 * j))
        return word

    def packed_halves(x, i, g, w4, inv):
        """Columns ``4 w4 .. 4 w4 + 3`` of group ``g`` rounded to 16-bit integers, as one 64-bit word."""
        word = T.uint64(0)
        for j in range(4):
            q = T.Cast("int32", T.round(xf(x, i, g * G + w4 * 4 + j) * inv))
            word = word | T.shift_left(T.Cast("uint64", T.bitwise_and(q, 65535)), T.uint64(16 * j))
        return word

    @T.macro
    def prep_token(x, xh, xl, dx, sx, sq, i):
        for g in T.serial(KG):
            part = T.alloc_buffer((16,), "float32")  # 16 lanes of max |x|, then of the sum of the 16-bit values
            st = T.alloc_buffer((3,), "float32")  # max |x|, qmax / max |x|, sum of the integers
            for l in T.vectorized(16):
                part[l] = T.fabs(xf(x, i, g * G + l))
            for c in T.serial(G // 16 - 1):
                for l in T.vectorized(16):
                    part[l] = T.max(part[l], T.fabs(xf(x, i, g * G + (c + 1) * 16 + l)))
            st[0] = part[0]
            for l in T.serial(15):
                st[0] = T.max(st[0], part[l + 1])
            dx[i, g] = st[0] / T.float32(qmax)
            st[1] = T.if_then_else(st[0] > T.float32(0), T.float32(qmax) / st[0], T.float32(0))
            for l in T.vectorized(16):  # integers below 2^24: exact in float32
                part[l] = T.round(xf(x, i, g * G + l) * st[1])
            for c in T.serial(G // 16 - 1):
                for l in T.vectorized(16):
                    part[l] = part[l] + T.round(xf(x, i, g * G + (c + 1) * 16 + l) * st[1])
            st[2] = part[0]
            for l in T.serial(15):
                st[2] = st[2] + part[l + 1]
            sx[i, g] = st[2] * dx[i, g]  # the zero/min term sees the same rounded activations
            if offset:
                sq[i, g] = T.Cast("int32", st[2])  # exact: below 2^24
            for w4 in T.vectorized(G // 4):
                if madd:
                    xh[i, g * (G // 4) + w4] = packed_halves(x, i, g, w4, st[1])
                elif wide:
                    xh[i, g * (G // 4) + w4] = packed_bytes(x, i, g, w4, st[1], True)
                    xl[i, g * (G // 4) + w4] = packed_bytes(x, i, g, w4, st[1], False)
                else:
                    xh[i, g * (G // 4) + w4] = packed_bytes(x, i, g, w4, st[1], False)

    def token(p, e, cnt, off, order):
        """The activation row of the task's ``p``-th token (past the end: the last one again)."""
        if experts:
            return T.Cast("int64", order[off[e] + T.Cast("int32", T.min(p, cnt - 1))] // x_div)
        return T.min(p, cnt - 1)

    @T.macro
    def expert_store(acc, out, i0, task, e, cnt, off, order, TB):
        for tt in T.serial(TB):
            if i0 * TB + tt < cnt:
                out[T.Cast("int64", order[off[e] + T.Cast("int32", i0 * TB + tt)]), T.ramp(task % NB * R16, 1, R16)] = (
                    T.Cast(f"{out_dtype}x{R16}", acc[tt, T.ramp(0, 1, R16)]))

    @T.macro
    def task_rows(task, e, cnt, w, s, m, b, out, xh, xl, dx, sx, sq, off, order, TB):
        # two accumulators per byte half and nibble half: four independent dot-product chains (AVX2 int8:
        # hl holds each token's 16 rows x 2 lanes, four independent chains of 8 lanes)
        hl = T.alloc_buffer((TB * R16 * (2 if madd else 1),), "int32")
        # (a buffer a path never uses: one word; AVX2 pairs of groups of 16: the high nibbles' lanes)
        hh = T.alloc_buffer((TB * R16 * 2 if pair else 1 if madd else TB * R16,), "int32")
        ll = T.alloc_buffer((TB * R16 if wide else 1,), "int32")
        lh = T.alloc_buffer((TB * R16 if wide else 1,), "int32")
        acc = T.alloc_buffer((TB, R16), "float32")
        # VNNI tables with several token blocks: the block's values looked up once, 64 bytes per activation
        # word (as 8-bit weights are laid out), instead of once per token block
        ex = T.alloc_buffer((W4 * 64 if expanded(TB) else 1,), "uint8")
        if expanded(TB):
            for ch in T.serial(K // 8):
                ex[T.ramp((ch // 4 * 8 + ch % 4) * 64, 1, 64)] = values(nibbles(w, task, ch, False), 64)
                ex[T.ramp((ch // 4 * 8 + ch % 4 + 4) * 64, 1, 64)] = values(nibbles(w, task, ch, True), 64)
        for i0 in T.serial((cnt + TB - 1) // TB):
            for tt in T.unroll(TB):
                acc[tt, T.ramp(0, 1, R16)] = T.broadcast(T.float32(0), R16)
            for g in T.serial(KG // 2 if pair else KG):  # groups, or pairs of groups of 16
                for tt in T.unroll(TB):
                    if madd:
                        hl[T.ramp(tt * 2 * R16, 1, 2 * R16)] = T.broadcast(T.int32(0), 2 * R16)
                        if pair:
                            hh[T.ramp(tt * 2 * R16, 1, 2 * R16)] = T.broadcast(T.int32(0), 2 * R16)
                    else:
                        hl[T.ramp(tt * R16, 1, R16)] = T.broadcast(T.int32(0), R16)
                        hh[T.ramp(tt * R16, 1, R16)] = T.broadcast(T.int32(0), R16)
                    if wide:
                        ll[T.ramp(tt * R16, 1, R16)] = T.broadcast(T.int32(0), R16)
                        lh[T.ramp(tt * R16, 1, R16)] = T.broadcast(T.int32(0), R16)
                for bb in T.serial(BPG):
                    for c in T.unroll(S // 2):
                        for tt in T.unroll(TB):
                            t: T.let[T.int64] = token(i0 * TB + tt, e, cnt, off, order)
                            wl: T.let[T.int32] = (g * BPG + bb) * S + c  # activation word (int4: low nibbles)
                            if madd and lut:  # a chunk's low and high nibbles, a quarter at a time
                                ch: T.let[T.int32] = (g * BPG + bb) * 4 + c
                                for r in T.unroll(4):
                                    if pair:  # the low nibbles' group and the high nibbles' apart
                                        hl[T.ramp(tt * 2 * R16 + r * 8, 1, 8)] = madd16(
                                            hl[T.ramp(tt * 2 * R16 + r * 8, 1, 8)], w, task, ch, r, xh[t, wl])
                                        hh[T.ramp(tt * 2 * R16 + r * 8, 1, 8)] = madd16(
                                            hh[T.ramp(tt * 2 * R16 + r * 8, 1, 8)], w, task, ch, r, xh[t, wl + 4],
                                            True)
                                    else:
                                        hl[T.ramp(tt * 2 * R16 + r * 8, 1, 8)] = madd16(madd16(
                                            hl[T.ramp(tt * 2 * R16 + r * 8, 1, 8)], w, task, ch, r, xh[t, wl],
                                            False), w, task, ch, r, xh[t, wl + 4], True)
                            elif madd:  # both chunks, each a quarter (4 rows x 4 columns) at a time
                                for hw in T.unroll(2):
                                    for r in T.unroll(4):
                                        hl[T.ramp(tt * 2 * R16 + r * 8, 1, 8)] = madd16(
                                            hl[T.ramp(tt * 2 * R16 + r * 8, 1, 8)], w, task, wl + hw * (S // 2), r,
                                            xh[t, wl + hw * (S // 2)])
                            elif offset:  # unsigned weight bytes against signed activation bytes
                                hl[T.ramp(tt * R16, 1, R16)] = dot4(lanes(hl, tt), operand(w, ex, task, wl, False, TB),
                                                                    word(xh, t, wl))
                                hh[T.ramp(tt * R16, 1, R16)] = dot4(lanes(hh, tt), operand(w, ex, task, wl, True, TB),
                                                                    word(xh, t, wl + S // 2))
                                if wide:  # the signed low bytes
                                    ll[T.ramp(tt * R16, 1, R16)] = dot4(
                                        lanes(ll, tt), operand(w, ex, task, wl, False, TB), word(xl, t, wl))
                                    lh[T.ramp(tt * R16, 1, R16)] = dot4(
                                        lanes(lh, tt), operand(w, ex, task, wl, True, TB), word(xl, t, wl + S // 2))
                            else:
                                ch: T.let[T.int32] = (g * BPG + bb) * 4 + c  # 64-byte weight chunk
                                hl[T.ramp(tt * R16, 1, R16)] = dot4(lanes(hl, tt), nibbles(w, task, ch, False),
                                                                    word(xh, t, wl))
                                hh[T.ramp(tt * R16, 1, R16)] = dot4(lanes(hh, tt), nibbles(w, task, ch, True),
                                                                    word(xh, t, wl + 4))
                                if wide:  # the unsigned low bytes against the nibbles
                                    ll[T.ramp(tt * R16, 1, R16)] = dot4(lanes(ll, tt), word(xl, t, wl),
                                                                        nibbles(w, task, ch, False))
                                    lh[T.ramp(tt * R16, 1, R16)] = dot4(lanes(lh, tt), word(xl, t, wl + 4),
                                                                        nibbles(w, task, ch, True))
                for tt in T.unroll(TB):
                    t: T.let[T.int64] = token(i0 * TB + tt, e, cnt, off, order)
                    if pair:  # groups 2g (low nibbles) and 2g + 1 (high)
                        acc[tt, T.ramp(0, 1, R16)] = accumulate(accumulate(
                            acc[tt, T.ramp(0, 1, R16)], group_sum(hl, hh, ll, lh, tt, sq[t, 2 * g], "low"), s, m,
                            task, 2 * g, dx[t, 2 * g], sx[t, 2 * g]),
                            group_sum(hl, hh, ll, lh, tt, sq[t, 2 * g + 1], "high"), s, m, task, 2 * g + 1,
                            dx[t, 2 * g + 1], sx[t, 2 * g + 1])
                    else:
                        acc[tt, T.ramp(0, 1, R16)] = accumulate(acc[tt, T.ramp(0, 1, R16)],
                                                                group_sum(hl, hh, ll, lh, tt, sq[t, g]), s, m, task,
                                                                g, dx[t, g], sx[t, g])
            if grouped:
                expert_store(acc, out, i0, task, e, cnt, off, order, TB)
            else:
                store(acc, b, out, i0, task, cnt, TB)

    @T.macro
    def rows(w, s, m, b, out, xh, xl, dx, sx, sq, ntok, TB):
        for task in T.parallel(NB):
            task_rows(task, 0, ntok, w, s, m, b, out, xh, xl, dx, sx, sq, None, None, TB)

    @T.macro
    def expert_rows(w, s, m, out, xh, xl, dx, sx, sq, off, order):
        # experts interleaved over the range (the threads take contiguous chunks of it): every thread gets a
        # share of each chosen expert's blocks, however few experts are chosen
        for task in T.parallel(experts * NB):
            e: T.let[T.int32] = task % experts
            blk: T.let[T.int32] = e * NB + task // experts  # the weight block
            cnt: T.let[T.int64] = T.Cast("int64", off[e + 1] - off[e])
            if cnt < _TILE_MIN_TOKENS:
                task_rows(blk, e, cnt, w, s, m, None, out, xh, xl, dx, sx, sq, off, order, _R16_DECODE_TOKENS)
            else:
                task_rows(blk, e, cnt, w, s, m, None, out, xh, xl, dx, sx, sq, off, order, _R16_PREFILL_TOKENS)

    def tile_column(w, s, m, task, col, raw):
        """float32x16: column ``col`` of the 16 rows, from its integers ``raw`` (uint8x16; int8 stored
        ``q + 128``), dequantized."""
        g = col // G
        if lut:  # signed values (madd: no offset)
            return T.Cast("float32x16", T.reinterpret("int8x16", values(raw, R16))) * scales16(s, task, g)
        v = (T.Cast("float32x16", raw) - T.broadcast(T.float32(128.0 if eight else zp if sym else 0.0), R16)
             ) * scales16(s, task, g)
        return v if sym else v + m[task, T.ramp(g * R16, 1, R16)]

    @T.macro
    def tile_rows(x, w, s, m, b, out, ntok):
        # AVX2 prefill: a 16-row block dequantized once into a float32 tile (one 16-lane vector per column:
        # the block's bytes of a column lie 4 apart; int4: the low or high nibbles of 16 bytes), then
        # TB-token x 16-row float FMAs, as make_qlinear_cpu's tile path; exact float32 products, no rounded
        # activations
        for task in T.parallel(NB):
            tile_t = T.alloc_buffer((K, R16), "float32")
            acc = T.alloc_buffer((_TOKEN_BLOCK, R16), "float32")
            for c in T.serial(K // 4 if eight else K // 8):  # 64-byte chunks: int8 4 columns, int4 8
                for i in T.unroll(4):
                    if eight:
                        tile_t[c * 4 + i, T.ramp(0, 1, R16)] = tile_column(
                            w, s, m, task, c * 4 + i, w[task, T.ramp(c * 64 + i, 4, R16)])
                    else:  # chunk c % 4 of 32-column block c // 4: columns 4 (c % 4) + i and 16 more
                        lo: T.let[T.int32] = c // 4 * 32 + c % 4 * 4 + i
                        tile_t[lo, T.ramp(0, 1, R16)] = tile_column(w, s, m, task, lo, T.bitwise_and(
                            w[task, T.ramp(c * 64 + i, 4, R16)], T.broadcast(T.uint8(15), R16)))
                        tile_t[lo + 16, T.ramp(0, 1, R16)] = tile_column(w, s, m, task, lo + 16, T.shift_right(
                            w[task, T.ramp(c * 64 + i, 4, R16)], T.broadcast(T.uint8(4), R16)))
            tile_matmul(x, tile_t, acc, b, out, task, ntok)

    @T.macro
    def expert_body(x, w, s, m, out, ntok, off, order):
        xh = T.alloc_buffer((ntok, W4), "uint64" if madd else "uint32")
        xl = T.alloc_buffer((ntok, W4 if wide else 1), "uint32")
        dx = T.alloc_buffer((ntok, KG), "float32")
        sx = T.alloc_buffer((ntok, KG), "float32")
        sq = T.alloc_buffer((ntok, KG), "int32")
        if ntok < _TILE_MIN_TOKENS:
            for i in T.serial(ntok):
                prep_token(x, xh, xl, dx, sx, sq, i)
        else:
            for i in T.parallel(ntok):
                prep_token(x, xh, xl, dx, sx, sq, i)
        expert_rows(w, s, m, out, xh, xl, dx, sx, sq, off, order)

    @T.macro
    def body(x, w, s, m, b, out, ntok):
        xh = T.alloc_buffer((ntok, W4), "uint64" if madd else "uint32")
        xl = T.alloc_buffer((ntok, W4 if wide else 1), "uint32")
        dx = T.alloc_buffer((ntok, KG), "float32")
        sx = T.alloc_buffer((ntok, KG), "float32")
        sq = T.alloc_buffer((ntok, KG), "int32")  # sum of a group's integers x^ (int8 weights)
        if ntok < _TILE_MIN_TOKENS:
            for i in T.serial(ntok):  # K values per token: not worth waking the thread pool
                prep_token(x, xh, xl, dx, sx, sq, i)
            rows(w, s, m, b, out, xh, xl, dx, sx, sq, ntok, _R16_DECODE_TOKENS)
        elif not vnni and ntok >= _AVX2_TILE_MIN_TOKENS:
            tile_rows(x, w, s, m, b, out, ntok)
        else:
            for i in T.parallel(ntok):
                prep_token(x, xh, xl, dx, sx, sq, i)
            rows(w, s, m, b, out, xh, xl, dx, sx, sq, ntok, _R16_PREFILL_TOKENS)

    WS, SS = qshape["qweight"][0], qshape["scales"][0]
    E = experts
    if experts and sym:
        @T.prim_func(private=True)
        def grouped_r16_s(x_h: T.handle, w: T.Buffer(WS, "uint8"), s: T.Buffer(SS, "float16"),  # type: ignore[valid-type]
                          off: T.Buffer((E + 1,), "int32"), ord_h: T.handle, o_h: T.handle):  # type: ignore[valid-type]
            T.func_attr({"tirx.noalias": True})
            ntok, nslot = T.int64(), T.int64()
            expert_body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, None,
                        T.match_buffer(o_h, (nslot, N), out_dtype), ntok, off, T.match_buffer(ord_h, (nslot,), "int32"))
        return grouped_r16_s
    if experts:
        @T.prim_func(private=True)
        def grouped_r16_a(x_h: T.handle, w: T.Buffer(WS, "uint8"), s: T.Buffer(SS, "float16"),  # type: ignore[valid-type]
                          m: T.Buffer(SS, "float32"), off: T.Buffer((E + 1,), "int32"), ord_h: T.handle,  # type: ignore[valid-type]
                          o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            ntok, nslot = T.int64(), T.int64()
            expert_body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, m,
                        T.match_buffer(o_h, (nslot, N), out_dtype), ntok, off, T.match_buffer(ord_h, (nslot,), "int32"))
        return grouped_r16_a
    if sym and not has_bias:
        @T.prim_func(private=True)
        def qlinear_r16_s(x_h: T.handle, w: T.Buffer(WS, "uint8"), s: T.Buffer(SS, "float16"), o_h: T.handle):  # type: ignore[valid-type]
            T.func_attr({"tirx.noalias": True})
            ntok = T.int64()
            body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, None, None, T.match_buffer(o_h, (ntok, N), out_dtype),
                 ntok)
        return qlinear_r16_s
    if sym:
        @T.prim_func(private=True)
        def qlinear_r16_sb(x_h: T.handle, w: T.Buffer(WS, "uint8"), s: T.Buffer(SS, "float16"),  # type: ignore[valid-type]
                           b: T.Buffer((N,), bias_dtype), o_h: T.handle):  # type: ignore[valid-type]
            T.func_attr({"tirx.noalias": True})
            ntok = T.int64()
            body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, None, b, T.match_buffer(o_h, (ntok, N), out_dtype),
                 ntok)
        return qlinear_r16_sb
    if not has_bias:
        @T.prim_func(private=True)
        def qlinear_r16_a(x_h: T.handle, w: T.Buffer(WS, "uint8"), s: T.Buffer(SS, "float16"),  # type: ignore[valid-type]
                          m: T.Buffer(SS, "float32"), o_h: T.handle):  # type: ignore[valid-type]
            T.func_attr({"tirx.noalias": True})
            ntok = T.int64()
            body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, m, None, T.match_buffer(o_h, (ntok, N), out_dtype),
                 ntok)
        return qlinear_r16_a

    @T.prim_func(private=True)
    def qlinear_r16_ab(x_h: T.handle, w: T.Buffer(WS, "uint8"), s: T.Buffer(SS, "float16"),  # type: ignore[valid-type]
                       m: T.Buffer(SS, "float32"), b: T.Buffer((N,), bias_dtype), o_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True})
        ntok = T.int64()
        body(T.match_buffer(x_h, (ntok, K), x_dtype), w, s, m, b, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)
    return qlinear_r16_ab


def _block_store(N: int, R: int, has_bias: bool, out_dtype: str):
    """A TIR macro ``store(acc, b, out, i0, task, ntok, TB)``: ``out[i0*TB + tt, task*R + r] = acc[tt, r]``
    (+ bias) for the block's tokens and rows that exist."""
    from tvm.script import tirx as T

    @T.macro
    def store(acc, b, out, i0, task, ntok, TB):
        for tt in T.serial(TB):
            if i0 * TB + tt < ntok:
                for r in T.serial(R):
                    if task * R + r < N:
                        if has_bias:
                            out[i0 * TB + tt, task * R + r] = T.Cast(
                                out_dtype, acc[tt, r] + T.Cast("float32", b[task * R + r]))
                        else:
                            out[i0 * TB + tt, task * R + r] = T.Cast(out_dtype, acc[tt, r])

    return store


def _tile_matmul(K: int, R: int, TB: int, store):
    """A TIR macro ``matmul(x, tile_t, acc, b, out, task, ntok)``: every token of ``x[T, K]`` times a float32
    tile ``tile_t[K, R]`` (row block ``task``, transposed so the R outputs of a token sit in SIMD lanes), in
    TB-token x R-row register blocks (per k, one tile vector and TB broadcast FMAs), stored with ``store``
    (``_block_store``)."""
    from tvm.script import tirx as T

    @T.macro
    def matmul(x, tile_t, acc, b, out, task, ntok):
        for i0 in T.serial((ntok + TB - 1) // TB):
            for tt in T.unroll(TB):
                for r in T.vectorized(R):
                    acc[tt, r] = T.float32(0)
            for kk in T.serial(K):
                for tt in T.unroll(TB):  # rows past the end recompute the last token; never stored
                    for r in T.vectorized(R):
                        acc[tt, r] = acc[tt, r] + T.Cast(
                            "float32", x[T.min(i0 * TB + tt, ntok - 1), kk]) * tile_t[kk, r]
            store(acc, b, out, i0, task, ntok, TB)

    return matmul


def row_loader(fmt: QuantFormat | None, K: int):
    """A TIR macro ``load(tile, w, scales, mins, r, n)``: ``tile[r, :K] = float32 W[n, :]``, dequantized
    (``fmt``; ``int_dot_only`` formats on x86 only) or cast from a dense ``w[N, K]`` (``fmt`` None). Shared by
    the MoE expert kernels."""
    from tvm.script import tirx as T

    L = _LANES
    if fmt is None:
        @T.macro
        def load_dense(tile, w, scales, mins, r, n):
            for kk in T.vectorized(K):
                tile[r, kk] = T.Cast("float32", w[n, kk])
        return load_dense

    G, KG, int4, sym, zp = fmt.group_size, K // fmt.group_size, fmt.bits == 4, fmt.sym, float(fmt.zero_point)
    chunks = G // 32 if int4 else G // L

    @T.macro
    def scale_group(tile, scales, mins, r, n, g):  # group g of tile row r: its integers -> weights
        if sym:
            for kk in T.vectorized(G):
                tile[r, g * G + kk] = (tile[r, g * G + kk] - T.float32(zp)) * T.Cast("float32", scales[n, g])
        else:
            for kk in T.vectorized(G):
                tile[r, g * G + kk] = tile[r, g * G + kk] * T.Cast("float32", scales[n, g]) + mins[n, g]

    def ints(codes):
        """float32x16 of 16 4-bit codes: their table's values, or the integers themselves."""
        return T.Cast("float32x16", T.reinterpret("int8x16", looked_up(fmt, codes, 16)) if fmt.table else codes)

    @T.macro
    def load_blocks(tile, w, scales, mins, r, n):  # int_dot_only formats: 32-column blocks, then the groups
        for j in T.serial(K // 32):
            tile[r, T.ramp(j * 32, 1, 16)] = ints(T.bitwise_and(w[n, T.ramp(j * 16, 1, 16)],
                                                                T.broadcast(T.uint8(15), 16)))
            tile[r, T.ramp(j * 32 + 16, 1, 16)] = ints(T.shift_right(w[n, T.ramp(j * 16, 1, 16)],
                                                                     T.broadcast(T.uint8(4), 16)))
        for g in T.serial(KG):
            scale_group(tile, scales, mins, r, n, g)

    if fmt.int_dot_only:
        return load_blocks

    @T.macro
    def load_quant(tile, w, scales, mins, r, n):
        for g in T.serial(KG):
            for c in T.serial(chunks):
                if int4:
                    for ll in T.vectorized(L):
                        tile[r, g * G + c * 32 + ll] = T.Cast("float32", T.bitwise_and(
                            w[n, g * (G // 2) + c * 16 + ll], T.uint8(15)))
                        tile[r, g * G + c * 32 + 16 + ll] = T.Cast("float32", T.shift_right(
                            w[n, g * (G // 2) + c * 16 + ll], T.uint8(4)))
                else:
                    for ll in T.vectorized(L):
                        tile[r, g * G + c * L + ll] = T.Cast("float32", w[n, g * G + c * L + ll])
            scale_group(tile, scales, mins, r, n, g)

    return load_quant


# ---------------------------------------------------------------- GPU GEMV (decode)

GEMV_THREADS = 128  # at most, per block
GEMV_ROWS = 4  # output rows per thread
GEMV_TOKENS = 4  # tokens per pass over the block's rows
GEMV_UNROLL = 1  # chunks whose loads a thread issues before it uses the first (2 and 4: slower on an H200)
GEMV_MIN_BLOCKS = 528  # a grid this large keeps 4 blocks on each SM of a 132-SM H100/H200
GEMV_MAX_WARPS = 3072  # about one wave of resident warps on a 132-SM H100/H200; more lanes per row past it lost
GEMV_DEEP_SLOTS = 3  # FERRUM_PDL=deep: step groups a one-token GEMV loads before its wait (48 registers at most)
_MAGIC = 0x4B000000  # float32 bits of 2**23: OR-ing an integer below 2**23 into the mantissa gives 2**23 + it
_MAGIC_H2 = 0x64006400  # float16 bits of 1024 in both halves: the same for a pair, with integers below 1024


def word_decoder(fmt: QuantFormat):
    """``(runs, decode)`` for quantized weights read as 32-bit words of 4 bytes: ``decode(word, run, b)``
    is the float32 TIR value of byte ``b``'s field (INT4: its low nibble in run 0, its high one in run 1;
    INT8: run 0, its sign restored), less the zero point in symmetric formats, made without an
    integer-to-float conversion (slow on GPUs: a quarter of the FMA rate or less): the field OR-ed into
    the mantissa of 2**23 is that float plus the field, and one subtraction of 2**23 (plus the zero point,
    or 128 for an INT8's flipped sign bit) leaves the exact value.

    INT4 fields are not shifted down first: a nibble at bit ``o`` (at most 16; the word shifted right by
    12 once for the three above) is masked in place, so ``2**23 + q * 2**o`` comes from one and-or, and
    one fused multiply-add by ``2**-o`` less ``2**(23-o)`` plus the zero point leaves ``q - zero point``
    exactly: an and-or and an FMA per weight where a shift, an and-or and a subtraction were. A LOP3 has
    one immediate operand, so the and-or is one instruction only with 2**23's bits in a register:
    ``decode(..., magic)`` takes them as a value the compiler cannot fold (``opaque_magic``)."""
    from tvm import tirx

    runs, mask, flip = (2, 15, 0) if fmt.bits == 4 else (1, 255, 128)
    zero = float(fmt.zero_point if fmt.sym else 0)
    bias = float(2 ** 23 + flip + zero)

    def decode_int8(word, run, b, magic=None):  # run, b: ints or the unrolled loops' variables
        field = tirx.bitwise_xor(tirx.bitwise_and(tirx.shift_right(word, tirx.Cast("uint32", 8 * b + 4 * run)),
                                                  tirx.const(mask, "uint32")), tirx.const(flip, "uint32"))
        return (tirx.reinterpret("float32", tirx.bitwise_or(field, tirx.const(_MAGIC, "uint32")))
                - tirx.const(bias, "float32"))

    def decode_int4(word, run, b, magic=None):
        o = tirx.Cast("uint32", 8 * b + 4 * run)
        high = o > tirx.const(16, "uint32")
        src = tirx.if_then_else(high, tirx.shift_right(word, tirx.const(12, "uint32")), word)
        at = o - tirx.if_then_else(high, tirx.const(12, "uint32"), tirx.const(0, "uint32"))
        f = tirx.reinterpret("float32", tirx.bitwise_or(
            tirx.bitwise_and(src, tirx.shift_left(tirx.const(15, "uint32"), at)),
            tirx.const(_MAGIC, "uint32") if magic is None else magic))
        inv = tirx.reinterpret("float32", tirx.shift_left(tirx.const(127, "uint32") - at, tirx.const(23, "uint32")))
        return f * inv - (tirx.const(2.0 ** 23, "float32") * inv + tirx.const(zero, "float32"))

    return runs, decode_int4 if fmt.bits == 4 else decode_int8


def opaque_magic(count, bits: int = _MAGIC):
    """``bits`` (2**23's float32 bits; ``_MAGIC_H2`` for half pairs) as a value the CUDA compiler keeps in
    a register (OR-ed with ``count >> 30`` of an int32 token count, 0 for any real one), for
    ``word_decoder``'s ``magic``."""
    from tvm import tirx

    return tirx.bitwise_or(tirx.const(bits, "uint32"),
                           tirx.Cast("uint32", tirx.shift_right(count, tirx.const(30, "int32"))))


def half_pair(word, run, odd, magic, zero: float = 8):
    """float16x2 TIR value of an INT4 word's bytes ``odd`` and ``2 + odd`` (lanes 0, 1), low nibbles
    (``run`` 0) or high (1), less ``zero`` (8, a symmetric format's zero point; 0 for formats with mins)
    (``run``, ``odd``: the unrolled loops' variables): masked in place in both halves and OR-ed into
    float16's 1024 (``magic``: ``_MAGIC_H2``'s bits), then ``h - (1024 + zero)`` or ``h / 16 - (64 +
    zero)``, exact."""
    from tvm import tirx

    u32 = "uint32"
    src = tirx.shift_right(word, tirx.Cast(u32, 8 * odd))
    h = tirx.reinterpret("float16x2", tirx.bitwise_or(
        tirx.bitwise_and(src, tirx.shift_left(tirx.const(0x000F000F, u32), tirx.Cast(u32, 4 * run))), magic))
    low = run == 0
    mul = tirx.if_then_else(low, tirx.const(1, "float16"), tirx.const(1 / 16, "float16"))
    sub = tirx.if_then_else(low, tirx.const(1024 + zero, "float16"), tirx.const(64 + zero, "float16"))
    return h * tirx.Broadcast(mul, 2) - tirx.Broadcast(sub, 2)


def _no_words(word, run, b, magic=None):
    """``word_decoder``'s place for dense weights, which have no words to decode."""
    raise AssertionError("dense weights are not decoded")


def silu_mul(gate, up, dtype: str):
    """float32 TIR ``SiLU(gate) * up`` rounded to ``dtype`` (as the separate SiLU·mul kernel stores it),
    for the kernels that read the gate|up projection instead."""
    from tvm import tirx

    g = tirx.Cast("float32", gate)
    one = tirx.const(1, "float32")
    return tirx.Cast("float32", tirx.Cast(dtype, g / (one + tirx.exp(tirx.const(0, "float32") - g))
                                          * tirx.Cast("float32", up)))


def gemv_chunk(fmt: QuantFormat | None, w_dtype: str, k: int) -> int:
    """Columns one thread loads per step: 16 bytes of weights (32 INT4 values, 16 INT8, 8 float16),
    halved until they divide ``k`` (dense weights of odd widths)."""
    if fmt is not None:
        return 32 if fmt.bits == 4 else 16
    c = 16 // dtype_bytes(w_dtype)
    while k % c:
        c //= 2
    return c


def gemv_layout(chunks: int, rows: int) -> tuple[int, int, int]:
    """``(k_lanes, row_groups, unroll)`` of a GEMV block over ``rows`` weight rows of ``chunks`` 16-byte
    chunks: ``k_lanes`` threads share a row, ``row_groups`` such teams per block (fewer when the grid would
    otherwise be short of ``GEMV_MIN_BLOCKS``), each thread ``GEMV_ROWS`` rows and ``GEMV_UNROLL`` chunks
    in flight. ``k_lanes`` is the most (16 to 128) that leave at most 1/4 of the lanes idle on the last
    step, take at least 2 steps, and either keep the grid within ``GEMV_MAX_WARPS`` or take 4 steps or
    more (enough to keep loads coming in a large grid); where none does, the fewest. The rule is the H200
    sweep of bench/gpu_kernels.py (docs/bench/2026-11-26c-gpu-h200.md): it picks the fastest layout
    measured for each of Qwen3-4B's 8 GEMVs at one token, and the INT4 ones ran 1.2-2x faster than under
    the previous rule (most lanes with 1/8 idle, 2 chunks in flight). Qwen3-4B float16: q|k|v (320
    chunks, 6144 rows) 64 lanes, o (512) and down (1216) 128, gate|up (320, 19456 rows) 64; INT4: q|k|v
    (80) 32, o (128) 64, gate|up (80, 19456 rows) 16, down (304) 128."""
    def steps(kt: int) -> int:
        return -(-chunks // kt)

    def idle(kt: int) -> float:
        return (steps(kt) * kt - chunks) / (steps(kt) * kt)

    def warps(kt: int) -> int:
        return -(-rows // GEMV_ROWS) * kt // 32

    lanes = (128, 64, 32, 16)
    fits = [kt for kt in lanes if idle(kt) <= 1 / 4 and (chunks >= 2 * kt or kt == 16)]
    if not fits:
        fits = [min(lanes, key=lambda kt: (idle(kt), -kt))]
    kt = next((kt for kt in fits if warps(kt) <= GEMV_MAX_WARPS or steps(kt) >= 4), fits[-1])
    return kt, gemv_row_groups(kt, rows), min(GEMV_UNROLL, steps(kt))


def gemv_norm_layout(chunks: int, rows: int, tokens: int = 0, rows_per_thread: int = GEMV_ROWS
                     ) -> tuple[int, int, int]:
    """``gemv_layout``, for a GEMV that reads a deferred norm (``tokens`` > 0: its tokens per pass) with at
    least as many lanes a team as its reduction has columns (``make_gemv_gpu(norm_eps=...)``: the dot
    products and a sum of squares per token, padded to a power of two): Qwen3-4B INT4 gate|up in passes of
    4 tokens, 32 lanes instead of 16."""
    kt, rt, u = gemv_layout(chunks, rows)
    need = threads_for(tokens * rows_per_thread + tokens) if tokens else 0
    if kt >= need:
        return kt, rt, u
    return need, gemv_row_groups(need, rows), min(GEMV_UNROLL, -(-chunks // need))


def gemv_row_blocks(in_features: int, out_features: int, fmt: QuantFormat | None, w_dtype: str,
                    norm_tokens: int = 0) -> int:
    """Blocks of ``make_gemv_gpu``'s grid over the rows, with its default layout (``norm_tokens``: that of
    a GEMV reading a deferred norm): the partial sums of squares per token a GEMV with ``norm_next``
    writes."""
    _, rt, _ = gemv_norm_layout(in_features // gemv_chunk(fmt, w_dtype, in_features), out_features, norm_tokens)
    return -(-out_features // (rt * GEMV_ROWS))


def gemv_slots(prefetch: bool, groups: int, tokens: int, warps: int, pdl: str = "") -> int:
    """Register slots of a GEMV lane's weight loads: the step groups in flight before the first is used
    (``make_gemv_gpu``). 2 with ``prefetch`` (the next group's loads issued before this one's arithmetic);
    with ``pdl`` "deep" (FERRUM_PDL=deep), one token per pass and a grid of one wave (fewer than
    ``GEMV_MAX_WARPS`` warps: a later wave starts after the wait anyway), up to ``GEMV_DEEP_SLOTS``: the
    first groups' loads, often all of a small GEMV's (Qwen3-4B INT4 q|k|v and down: 3 groups, o: 2), go
    out before the wait for the kernel before it, while that one still runs; at most ``groups``."""
    if pdl == "deep" and tokens == 1 and warps < GEMV_MAX_WARPS:
        return max(1, min(groups, GEMV_DEEP_SLOTS))
    return 2 if prefetch and groups > 1 else 1


def gemv_prefetch(quantized: bool, tokens: int, steps: int, warps: int) -> bool:
    """Whether a GEMV issues the next step's loads before this step's arithmetic (``make_gemv_gpu``'s
    ``prefetch``): dense weights in passes of one token over 4 steps or more, in a grid of fewer than
    ``GEMV_MAX_WARPS`` warps (one wave: latency, not bandwidth, is what limits it). On an H200 it took
    Qwen3-4B's float16 o and down projections at one token from 8.6 to 7.0 and 16.5 to 14.0 us; it cost
    the larger grids, the INT4 ones (whose arithmetic already overlaps other warps' loads), and passes of 4
    tokens (more registers: fewer blocks per SM) 2-60% (bench/gpu_kernels.py, 2026-11-26)."""
    return not quantized and tokens == 1 and steps >= 4 and warps < GEMV_MAX_WARPS


def gemv_row_groups(k_lanes: int, rows: int) -> int:
    """Teams of ``k_lanes`` threads per GEMV block: as many as fit ``GEMV_THREADS``, halved while the grid
    over ``rows`` rows would be short of ``GEMV_MIN_BLOCKS`` blocks."""
    rt = GEMV_THREADS // k_lanes
    while rt > 1 and -(-rows // (rt * GEMV_ROWS)) < GEMV_MIN_BLOCKS:
        rt //= 2
    return rt


def make_gemv_gpu(in_features: int, out_features: int, fmt: QuantFormat | None, w_dtype: str, x_dtype: str,
                  out_dtype: str, bias_dtype: str | None, scale_dtype: str = "float16", max_lanes: int = 16,
                  experts: int = 0, x_div: int = 1, gated: bool = False,
                  layout: tuple[int, int, int] | None = None, half_math: bool = False,
                  prefetch: bool | None = None, tokens: int = GEMV_TOKENS, norm_eps: float | None = None,
                  norm_parts: int = 0, norm_next: str | None = None, residual: bool = False,
                  rows_per_thread: int = GEMV_ROWS, pdl: str = "", gate_out: bool = False):
    """PrimFunc ``gemv(x[T,K], w | (qweight, scales, [mins]), [bias[N],] out[T,N])`` for decode batches.

    A weight row is read in 16-byte chunks (32 INT4 values, 16 INT8, 8 float16). A team of ``k_lanes``
    consecutive threads shares 4 rows: lane ``l`` takes chunks ``l, l + k_lanes, ...`` of each (consecutive
    lanes, consecutive bytes: coalesced), issuing the loads of ``unroll`` chunks x 4 rows before it uses
    the first. A block holds ``row_groups`` teams (``layout``, chosen by ``gemv_layout`` from the shape).
    Each thread accumulates ``tokens`` x 4 rows of float32 partial sums, with each token's activations
    loaded, and SiLU-gated, once per chunk for all 4 rows; the team's partials are summed in shared memory
    (``block_reduce.block_sum_columns``). Weights are read once per pass of up to ``tokens`` tokens (4;
    the one-token entry points take 1: a quarter of the accumulators and activations held, so more blocks
    fit an SM); any token count is correct (more passes). With ``prefetch`` (default: ``gemv_prefetch``)
    the loads of a lane's next step group go out before this one's arithmetic, into a second register slot.

    Quantized weights are loaded as 32-bit words and turned into floats without integer-to-float
    conversions (``word_decoder``). The group's scale multiplies a sum of 4 (INT8) or 8 (INT4) products
    instead of every weight; asymmetric formats add ``min * sum(x)`` the same way.
    (INT4: low nibbles are columns 0-15 of a 32-column block, high nibbles 16-31.)

    ``scale_dtype`` is float16 in artifacts; the CPU emulation of GPU kernels in the tests, which has no
    half type, passes float32. ``max_lanes`` caps the vector width of loads (Metal: up to 4 elements).

    With ``experts`` > 0 it is the MoE expert GEMV ``grouped_linear(x[?,K], w[E*N, ...], offsets[E+1],
    order[S], out[S,N])`` of ``schedules/moe.py``: the grid gains an expert axis, block (rows, e) runs the
    slots ``order[offsets[e]:offsets[e+1]]`` (token ``slot // x_div``) against expert ``e``'s rows, and an
    expert no slot chose costs an empty block: its weights are never read.

    With ``gated`` the activations are SiLU-gated first, read from the gate|up projection: ``x[T, 2K]``
    and the GEMV's input is ``silu(x[:, :K]) * x[:, K:]`` (float32, rounded to ``x_dtype`` as the separate
    SiLU·mul kernel stores it), so that kernel and its round trip through memory go.

    With ``gate_out`` it is the gate|up projection whose output is SiLU·mul's, ``out[T, N / 2] = silu(x W_g^T)
    * x W_u^T`` (``W`` = ``[W_g; W_u]``, each half rounded to ``out_dtype`` first, as stored, then
    ``silu_mul``): the same numbers the down GEMV's ``gated`` reads made from the whole projection, but SiLU
    taken once per output rather than by every team of the down GEMV that reads it (there, one exponential
    per activation each step: ~40% of an INT4 down step's instructions in SASS), and half the bytes written
    and read. A block's first half of rows are gate rows, its second half the matching up rows, so both
    halves of an output meet in the block's reduction. With ``experts`` each expert's rows are its own
    ``[W_g; W_u]`` (``N`` of them), and ``out`` is ``[S, N / 2]``.

    A deferred RMSNorm (``lower(gemv_norms=True)``, an experiment): with ``norm_next`` (the next norm's
    weight dtype) the GEMV also writes, from each output ``h`` as stored, ``xn = h * norm_w`` (float32
    ``[T, N]``: the norm's output less its ``1 / rms``, which a float16 ``h * norm_w`` could overflow) and
    per token one partial sum of ``h^2`` per block of the grid (float32 ``[T, gemv_row_blocks(...)]``,
    summed in shared memory in the epilogue), reading ``norm_w[N]`` after its residual; with ``norm_eps``
    it reads such an ``xn`` as its input plus those ``norm_parts`` partial sums (``ss[T, norm_parts]``),
    and scales each float32 dot product by ``rsqrt(sum(ss) / K + eps)`` before the bias: ``norm(h) W^T =
    rsqrt(mean(h^2) + eps) (h * norm_w) W^T``. The lanes of every team add the partials into one more
    column of the reduction the dot products take anyway (``gemv_norm_layout``), so the norm kernel, its
    block reduction and its round trip go without a reduction or barrier more in the reading GEMV, and
    one barrier and a shared-memory sum in the writing one. With ``residual`` the result is ``r[T, N] + x
    W^T`` (``r`` in ``out_dtype``, added to the float32 sum before the one rounding): the residual add of
    a decoder layer's o and down projections. All three: dense or quantized weights, not the MoE expert
    GEMV, not ``gated`` with ``norm_eps``. ``rows_per_thread`` (4; 2 as an experiment in bench/gpu_kernels.py:
    twice the threads for the same rows, for grids too small to hide a step's latency) is
    the team's rows per pass.

    ``pdl`` (CUDA sm_90, for kernels launched as programmatic dependent launches: ``FERRUM_PDL``, see
    ``ferrum_compiler.gpu_build``): the kernel may start while the one before it still runs, and waits for
    it (``griddepcontrol.wait``) after issuing its first step group's weight loads (two with
    ``prefetch``), before its first read of the activations: weights are never written by a kernel, so a
    small GEMV's loads, often all of them, overlap the kernels before it. Not with ``experts`` (the expert
    lists are activations): those wait first.
    ``pdl`` is FERRUM_PDL's mode: ``early`` lets the next kernel launch first thing (the launch pass adds
    that), ``late`` right after the wait; ``deep`` is ``early`` with up to 3 step groups' loads before the
    wait at one token per pass (``gemv_slots``).

    ``half_math`` (symmetric INT4, float16 activations; an experiment, not used by the lowering yet):
    a word's 8 weights become 4 float16 pairs and meet the activations in paired float16 multiply-adds
    (``half2``), about 2.5 instructions per weight at one token against 3.3 (SASS). A word holds, in
    each 16-bit half, one byte of 2 nibbles: masking both halves at once (``0x000F000F``, ``0x00F000F0``,
    and the same of the word shifted by 8) and OR-ing in float16's bits of 1024 gives ``1024 + q`` or
    ``1024 + 16 q`` per lane, exact; one paired subtraction (or multiply-add by 1/16) leaves ``q - zero
    point``. The 4 pairs' products are summed in float16, then in float32 with the group's scale.
    Activations are held divided by 32 (the scale multiplied back), so a pair's sum of 4 products of at
    most 8 x 2047 stays within float16's 65504 whatever the activation.
    """
    import tvm
    from tvm import tirx
    from tvm.script import tirx as T

    K, N, RB, TT = in_features, out_features, rows_per_thread, tokens
    C = gemv_chunk(fmt, w_dtype, K)
    if fmt is not None:
        assert fmt.check(K) is None, fmt.check(K)
    NC = K // C  # chunks per row
    normed = norm_eps is not None
    KT, RT, U = layout or gemv_norm_layout(NC, N, TT if normed else 0, RB)
    assert KT >= TT * RB and KT & (KT - 1) == 0 and U >= 1, (KT, RT, U)
    NT, BR = KT * RT, RT * RB  # threads and rows of a block
    # gate_out: I outputs, H gate rows and H up rows a block
    I, H = N // 2, BR // 2
    NO = I if gate_out else N  # output columns
    assert not gate_out or (N % 2 == 0 and BR % 2 == 0), (N, BR)
    STEPS = -(-NC // KT)  # chunks per lane
    SG = -(-STEPS // U)  # step groups of U chunks per lane
    warps = -(-N // RB) * KT // 32
    if prefetch is None:
        prefetch = gemv_prefetch(fmt is not None, TT, STEPS, warps)
    PF = gemv_slots(prefetch, SG, TT, warps, "" if experts else pdl)  # register slots (expert GEMVs wait first)
    LAG = PF - 1  # groups loaded ahead of the one in use
    XV = min(C, max_lanes, 16 // dtype_bytes(x_dtype))
    J = TT * RB
    # columns the team reduction sums: the J dot products, and (normed) each token's sum of squares, padded
    # to a power of two (block_sum_columns' slices)
    JW = threads_for(J + TT) if normed else J
    assert KT % JW == 0, (KT, JW)
    quant = fmt is not None
    int4 = fmt is not None and fmt.bits == 4
    sym = fmt is not None and fmt.sym
    G = fmt.group_size if fmt is not None else K
    has_bias = bias_dtype is not None
    sums = block_sum_columns(NT, JW, RT)
    grouped = experts > 0
    NW = max(experts, 1) * N  # weight rows
    wshape = (NW, K // 2) if int4 else (NW, K)
    wdt = "uint8" if int4 else ("int8" if quant else w_dtype)
    WV = min(C, max_lanes)  # lanes of one dense weight load
    # quantized: a chunk is 4 words; a word holds columns ``word * 4 + run * 16 + b`` (INT4: runs 0 and 1,
    # the low and the high nibbles of its 4 bytes; INT8: run 0)
    RUNS, decode = word_decoder(fmt) if fmt is not None else (1, _no_words)
    VW = 4 * RUNS  # values per word
    # the activations of a chunk, held per token: float32 for quantized weights (each is used 4 times per
    # row), x_dtype for dense ones (16 fewer registers; widened per use); float16 pairs for half_math
    assert not half_math or (int4 and sym and x_dtype == "float16"), "half_math: symmetric INT4, float16 x"
    XS = "float16" if half_math else ("float32" if quant else x_dtype)
    producer = norm_next is not None
    assert not ((normed or residual or producer) and grouped) and not (normed and gated), \
        "norm/residual: plain GEMVs only"
    assert not normed or norm_parts >= 1, "a deferred norm needs its partial sums of squares"
    assert not (gate_out and (residual or producer or gated)), "gate_out: a gate|up projection (or experts')"
    SV = 4 if norm_parts % 4 == 0 and max_lanes >= 4 else 1  # partial sums per (16-byte) load
    PO = -(-N // BR)  # producer: the partial sums of squares it writes per token, one per block
    early_wait = bool(pdl) and not grouped  # the wait after the first weight loads (``pdl``)
    late_trigger = pdl == "late"  # the next kernel let launch after that wait (FERRUM_PDL=late)
    H_SHIFT = 1.0 / 32  # half_math's activations are held divided by this much
    # half_math: value b (0-3) of a run sits at pair (b % 2), lane (b // 2): pairs are bytes (0, 2), (1, 3)
    def slot(i):
        return (i % 2) * 2 + i // 2 if half_math else i

    # token i of the block's list: its x row, its out row; and how many there are
    def rows_of(offsets, ex, ntok):
        return offsets[ex + 1] - offsets[ex] if grouped else ntok

    def x_row(order, offsets, ex, i):
        return order[offsets[ex] + i] // x_div if grouped else i

    def out_row(order, offsets, ex, i):
        return order[offsets[ex] + i] if grouped else i

    # weight row of block-row ``v`` (``row0 + r``): itself, or with ``gate_out`` gate row ``v // BR * H + v % BR``
    # for the block's first H and the matching up row (I further) for the rest; and whether it exists
    def wrow(row0, r):
        v = row0 + r
        if not gate_out:
            return v
        return v // BR * H + v % BR + tirx.if_then_else(v % BR >= H, I - H, 0)

    def wok(row0, r):
        v = row0 + r
        return v // BR * H + v % H < I if gate_out else v < N

    def wout(row0, r):  # row0 + r's sum is an output this thread stores (gate_out: a gate row's)
        return tirx.all(wok(row0, r), (row0 + r) % BR < H) if gate_out else wok(row0, r)

    def x_loader(n: int):
        """Macro ``(xs, up, x, xr, col, t, at)``: ``xs[t, at:at+n]`` = float32 of ``x[xr, col:col+n]``
        (gated: SiLU(gate) * up, rounded to x_dtype)."""
        v = min(XV, n)

        @T.macro
        def load(xs, up, x, xr, col, t, at):
            for i0 in T.unroll(n // v):  # vector loads
                for i1 in T.vectorized(v):
                    up[i0 * v + i1] = x[xr, col + i0 * v + i1]
            if gated:
                for i0 in T.unroll(n // v):
                    for i1 in T.vectorized(v):
                        up[C + i0 * v + i1] = x[xr, K + col + i0 * v + i1]
                for i in T.unroll(n):
                    if half_math:
                        xs[t, at + slot(i)] = T.Cast(XS, silu_mul(up[i], up[C + i], x_dtype) * T.float32(H_SHIFT))
                    else:
                        xs[t, at + i] = T.Cast(XS, silu_mul(up[i], up[C + i], x_dtype))
            else:
                for i in T.unroll(n):
                    if half_math:
                        xs[t, at + slot(i)] = up[i] * T.float16(H_SHIFT)
                    else:
                        xs[t, at + i] = T.Cast(XS, up[i])

        return load

    load_chunk, load_run = x_loader(C), x_loader(4)

    @T.macro
    def body(x, ssi, w, wq, scales, mins, bias, offsets, order, res, nwn, out, xno, sso, ntok):
        for blk in T.thread_binding(-(-I // H) if gate_out else -(-N // BR), thread="blockIdx.x"):
          for ex in T.thread_binding(max(experts, 1), thread="blockIdx.y"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                red = T.alloc_buffer((NT * (JW + 1),), "float32", scope="shared")
                bsh = T.alloc_buffer((BR if has_bias else 1,), "float32", scope="shared")  # the block's biases
                bl = T.alloc_buffer((1,), "float32", scope="local")  # ... this thread's, loaded early
                # likewise the outputs' residuals (per pass) and the next norm's weights
                rsh = T.alloc_buffer((RT * J if residual else 1,), "float32", scope="shared")
                rl = T.alloc_buffer((1,), "float32", scope="local")
                nsh = T.alloc_buffer((BR if producer else 1,), "float32", scope="shared")
                nl = T.alloc_buffer((1,), "float32", scope="local")
                acc = T.alloc_buffer((JW,), "float32", scope="local")
                xs = T.alloc_buffer((TT, VW if quant else C), XS, scope="local")  # tokens' activations
                up = T.alloc_buffer((2 * C,), x_dtype, scope="local")  # loaded x (gated: gate, up)
                sx = T.alloc_buffer((TT,), "float32", scope="local")  # asymmetric: sum of a word's activations
                wv = T.alloc_buffer((VW if quant else C,), "float32", scope="local")
                dot = T.alloc_buffer((1,), "float32", scope="local")
                part = T.alloc_buffer((SV,), "float32", scope="local")  # normed: partial sums of squares
                hw = T.alloc_buffer((8,), "float16", scope="local")  # half_math: a word's 4 weight pairs
                raw = T.alloc_buffer((PF, U, RB, 4), "uint32", scope="local")  # quantized: slots x U chunks x rows
                rawd = T.alloc_buffer((PF, U, RB, C), wdt, scope="local")  # dense
                # producer: the squares of the outputs
                sq = T.alloc_buffer((RT * J if producer else 1,), "float32", scope="shared")
                count: T.let[T.int32] = T.Cast("int32", rows_of(offsets, ex, ntok))
                magic: T.let[T.uint32] = opaque_magic(count, _MAGIC_H2 if half_math else _MAGIC)
                row0: T.let[T.int32] = blk * BR + tx // KT * RB  # this team's first row
                for p in T.serial((count + TT - 1) // TT):
                    for j in T.unroll(JW):
                        acc[j] = T.float32(0)
                    # step group gl loaded into register slot h while group gl - LAG (slot h - LAG) is in use
                    for g2 in T.serial((SG + LAG + PF - 1) // PF):
                        for h in T.unroll(PF):
                            gl: T.let[T.int32] = PF * g2 + h
                            gu: T.let[T.int32] = PF * g2 + h - LAG
                            for u in T.unroll(U):
                                if (gl * U + u) * KT + tx % KT < NC:
                                    for r in T.unroll(RB):
                                        if wok(row0, r):
                                            if quant:
                                                for i in T.vectorized(4):
                                                    raw[h, u, r, i] = wq[ex * N + wrow(row0, r),
                                                                      ((gl * U + u) * KT + tx % KT) * 4 + i]
                                            else:
                                                for i0 in T.unroll(C // WV):
                                                    for i1 in T.vectorized(WV):
                                                        rawd[h, u, r, i0 * WV + i1] = w[
                                                            ex * N + wrow(row0, r),
                                                            ((gl * U + u) * KT + tx % KT) * C + i0 * WV + i1]
                            if has_bias or producer:  # with the first weights, not after the reduction's barriers
                                if p == 0 and gl == LAG and tx % KT < RB:
                                    if wok(row0, tx % KT):
                                        if has_bias:
                                            bl[0] = T.Cast("float32", bias[wrow(row0, tx % KT)])
                                        if producer:
                                            nl[0] = T.Cast("float32", nwn[wrow(row0, tx % KT)])
                            if early_wait:  # every thread, once: the first pass's first use of a group
                                if p == 0 and gl == LAG:
                                    T.ptx.griddepcontrol.wait()
                                    if late_trigger:
                                        T.ptx.griddepcontrol.launch_dependents()
                            if residual:  # this pass's residuals (an activation: after any wait), likewise
                                if gl == LAG and tx % KT < J:
                                    if p * TT + tx % KT // RB < count and wok(row0, tx % KT % RB):
                                        rl[0] = T.Cast("float32", res[p * TT + tx % KT // RB, row0 + tx % KT % RB])
                            for u in T.unroll(U):
                                if gu >= 0 and (gu * U + u) * KT + tx % KT < NC:
                                    ch: T.let[T.int32] = (gu * U + u) * KT + tx % KT
                                    if quant:
                                        for wd in T.unroll(4):
                                            for t in T.unroll(TT):
                                                if p * TT + t < count:
                                                    xr: T.let[T.int32] = T.Cast(
                                                        "int32", x_row(order, offsets, ex, p * TT + t))
                                                    for run in T.unroll(RUNS):
                                                        load_run(xs, up, x, xr, ch * C + run * 16 + wd * 4, t, run * 4)
                                                    if not sym:
                                                        sx[t] = T.float32(0)
                                                        for i in T.unroll(VW):
                                                            sx[t] = sx[t] + xs[t, i]
                                            for r in T.unroll(RB):
                                                if wok(row0, r) and half_math:
                                                    for run in T.unroll(2):
                                                        for odd in T.unroll(2):
                                                            hw[T.Ramp((run * 2 + odd) * 2, 1, 2)] = half_pair(
                                                                raw[(h + PF - LAG) % PF, u, r, wd], run, odd, magic)
                                                    hscale: T.let[T.float32] = T.Cast(
                                                        "float32", scales[ex * N + wrow(row0, r), ch * C // G]
                                                    ) * T.float32(1 / H_SHIFT)
                                                    for t in T.unroll(TT):
                                                        if p * TT + t < count:
                                                            pair = (hw[T.Ramp(0, 1, 2)] * xs[t, T.Ramp(0, 1, 2)]
                                                                    + hw[T.Ramp(2, 1, 2)] * xs[t, T.Ramp(2, 1, 2)]
                                                                    + hw[T.Ramp(4, 1, 2)] * xs[t, T.Ramp(4, 1, 2)]
                                                                    + hw[T.Ramp(6, 1, 2)] * xs[t, T.Ramp(6, 1, 2)])
                                                            acc[t * RB + r] = acc[t * RB + r] + (
                                                                T.Cast("float32", T.Shuffle([pair], [0]))
                                                                + T.Cast("float32", T.Shuffle([pair], [1]))) * hscale
                                                if wok(row0, r) and not half_math:
                                                    for run in T.unroll(RUNS):
                                                        for b in T.unroll(4):
                                                            wv[run * 4 + b] = decode(
                                                                raw[(h + PF - LAG) % PF, u, r, wd], run, b, magic)
                                                    scale: T.let[T.float32] = T.Cast(
                                                        "float32", scales[ex * N + wrow(row0, r), ch * C // G])
                                                    for t in T.unroll(TT):
                                                        if p * TT + t < count:
                                                            dot[0] = T.float32(0)
                                                            for i in T.unroll(VW):
                                                                dot[0] = dot[0] + xs[t, i] * wv[i]
                                                            if sym:
                                                                acc[t * RB + r] = acc[t * RB + r] + dot[0] * scale
                                                            else:
                                                                acc[t * RB + r] = (
                                                                    acc[t * RB + r] + dot[0] * scale + sx[t] *
                                                                    mins[ex * N + wrow(row0, r), ch * C // G])
                                    else:
                                        for t in T.unroll(TT):
                                            if p * TT + t < count:
                                                xr: T.let[T.int32] = T.Cast(
                                                    "int32", x_row(order, offsets, ex, p * TT + t))
                                                load_chunk(xs, up, x, xr, ch * C, t, 0)
                                        for r in T.unroll(RB):
                                            if wok(row0, r):
                                                for i in T.unroll(C):
                                                    wv[i] = T.Cast("float32", rawd[(h + PF - LAG) % PF, u, r, i])
                                                for t in T.unroll(TT):
                                                    if p * TT + t < count:
                                                        for i in T.unroll(C):
                                                            acc[t * RB + r] = (acc[t * RB + r]
                                                                               + T.Cast("float32", xs[t, i]) * wv[i])
                    if normed:  # each token's sum of squares: the producer's partials, split over the lanes
                        for t in T.unroll(TT):
                            if p * TT + t < count:
                                for i in T.unroll(-(-norm_parts // (KT * SV))):  # SV partials a load
                                    if (i * KT + tx % KT) * SV < norm_parts:
                                        for v in T.vectorized(SV):
                                            part[v] = ssi[p * TT + t, (i * KT + tx % KT) * SV + v]
                                        for v in T.unroll(SV):
                                            acc[J + t] = acc[J + t] + part[v]
                    if tx % KT < RB:  # for the epilogue, past the reduction's barriers
                        if has_bias:
                            bsh[tx // KT * RB + tx % KT] = bl[0]
                        if producer:
                            nsh[tx // KT * RB + tx % KT] = nl[0]
                    if residual and tx % KT < J:
                        rsh[tx // KT * J + tx % KT] = rl[0]
                    sums(red, acc, tx)
                    if producer:  # rows past N (and tokens past the count) add nothing
                        if tx % KT < J:
                            sq[tx // KT * J + tx % KT] = T.float32(0)
                    if tx % KT < J:
                        if p * TT + tx % KT // RB < count and wout(row0, tx % KT % RB):
                            orow: T.let[T.int32] = T.Cast("int32", out_row(order, offsets, ex, p * TT + tx % KT // RB))
                            ocol: T.let[T.int32] = wrow(row0, tx % KT % RB)  # gate_out: the gate row
                            team: T.let[T.int32] = tx // KT * KT * (JW + 1)  # the team's sums in red
                            rstd: T.let[T.float32] = T.rsqrt(red[team + J + tx % KT // RB] / T.float32(K)
                                                             + T.float32(norm_eps or 0)) if normed else T.float32(1)
                            hv: T.let[T.float32] = T.Cast("float32", T.Cast(  # the output as stored
                                out_dtype, red[team + tx % KT] * rstd
                                + (bsh[(row0 + tx % KT % RB) % BR] if has_bias else T.float32(0))
                                + (rsh[tx // KT * J + tx % KT] if residual else T.float32(0))))
                            if gate_out:  # its up row's sum, H rows further in the block, as stored
                                lr2: T.let[T.int32] = (row0 + tx % KT % RB) % BR + H
                                hu: T.let[T.float32] = T.Cast("float32", T.Cast(
                                    out_dtype, red[lr2 // RB * KT * (JW + 1) + tx % KT // RB * RB + lr2 % RB] * rstd
                                    + (bsh[lr2] if has_bias else T.float32(0))))
                                out[orow, ocol] = T.Cast(out_dtype, silu_mul(hv, hu, out_dtype))
                            else:
                                out[orow, ocol] = T.Cast(out_dtype, hv)
                            if producer:  # the next norm's input less its 1 / rms, and the square
                                xno[orow, ocol] = hv * nsh[(row0 + tx % KT % RB) % BR]
                                sq[tx // KT * J + tx % KT] = hv * hv
                    if producer:  # the block's partial sum of squares per token
                        T.tvm_storage_sync("shared")
                        if tx < TT:
                            if p * TT + tx < count:
                                dot[0] = T.float32(0)
                                for i in T.unroll(BR):
                                    dot[0] = dot[0] + sq[i // RB * J + tx * RB + i % RB]
                                sso[out_row(order, offsets, ex, p * TT + tx), blk] = dot[0]
                    T.tvm_storage_sync("shared")  # the next pass overwrites red (and sq)

    KG = K // G
    bdt = bias_dtype or "float32"

    E1 = max(experts, 1)
    XK = 2 * K if gated else K  # columns of x
    WORDS = K * (4 if int4 else 8) // 32 if quant else 1  # 32-bit words of a quantized row

    PI = max(norm_parts, 1)
    ndt = norm_next or "float32"

    # one signature with every tensor; those this variant does not read are dropped below. In a root block,
    # which Relax's pattern analysis wants of a producer's 3 outputs (the CUDA code is the same)
    @T.prim_func(private=True, s_tir=True)
    def gemv(x_h: T.handle, ss_h: T.handle, w: T.Buffer(wshape, wdt),  # type: ignore[valid-type]
             s: T.Buffer((NW, KG), scale_dtype), m: T.Buffer((NW, KG), "float32"),  # type: ignore[valid-type]
             b: T.Buffer((N,), bdt), off: T.Buffer((E1 + 1,), "int32"),  # type: ignore[valid-type]
             ord_h: T.handle, r_h: T.handle, nw: T.Buffer((N,), ndt),  # type: ignore[valid-type]
             o_h: T.handle, xo_h: T.handle, so_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nx, nrow = T.int64(), T.int64()
        xb = T.match_buffer(x_h, (nx, XK), x_dtype)
        ssb = T.match_buffer(ss_h, (nx, PI), "float32")
        ordb = T.match_buffer(ord_h, (nrow,), "int32")
        rb = T.match_buffer(r_h, (nrow, N), out_dtype)
        ob = T.match_buffer(o_h, (nrow, NO), out_dtype)
        xob = T.match_buffer(xo_h, (nrow, N), "float32")
        sob = T.match_buffer(so_h, (nrow, PO), "float32")
        wq = T.decl_buffer((NW, WORDS), "uint32", data=w.data)  # a quantized row's 16-byte chunks as words
        with T.sblock("root"):
            T.reads()  # not inferred: the body's let-bound indices are not defined out here
            T.writes()
            body(xb, ssb, w, wq, s, m, b, off, ordb, rb, nw, ob, xob, sob, nrow)

    x_h, ss_h, w, s, m, b, off, ord_h, r_h, nw, o_h, xo_h, so_h = gemv.params
    keep = ([x_h] + ([ss_h] if normed else []) + [w] + ([s] if quant else []) + ([m] if quant and not sym else [])
            + ([b] if has_bias else []) + ([off, ord_h] if grouped else []) + ([r_h] if residual else [])
            + ([nw] if producer else []) + [o_h] + ([xo_h, so_h] if producer else []))
    func = tvm.tirx.PrimFunc(keep, gemv.body, gemv.ret_type, gemv.attrs)
    return func


# ---------------------------------------------------------------- INT4 GEMV on integer dot products (an experiment)

DP4A_BLOCK = 32  # activations quantized per this many columns: one 16-byte chunk of INT4 weights


def gemv_dp4a_ref(xq: np.ndarray, xs: np.ndarray, fmt: QuantFormat, qweight: np.ndarray,
                  scales: np.ndarray) -> np.ndarray:
    """What ``make_gemv_dp4a_gpu`` computes, float64 ``[T, N]``: the int8 activations ``xq [T, K]`` (scales
    ``xs [T, K/32]``) against the symmetric INT4 weights, exactly: per 32 columns the integer dot product
    ``sum((q - 8) * xq)``, times the activations' and the group's scales."""
    q = unpack_int4(qweight).astype(np.int64) - fmt.zero_point  # [N, K]
    t, k = xq.shape
    blocks = k // DP4A_BLOCK
    idot = np.einsum("tbc,nbc->tnb", xq.reshape(t, blocks, DP4A_BLOCK).astype(np.int64),
                     q.reshape(-1, blocks, DP4A_BLOCK))  # [T, N, K/32]
    ws = np.repeat(scales.astype(np.float64), fmt.group_size // DP4A_BLOCK, axis=1)  # [N, K/32]
    return np.einsum("tnb,tb,nb->tn", idot.astype(np.float64), xs.astype(np.float64), ws)


def _dp4a_quantizer(in_features: int, x_dtype: str, gated: bool):
    """Macro ``(x, row, ch, xv, v, m, n, words, wrow, w0, scale, total, srow, s0)``: the 32 activations
    ``x[row, 32 ch : 32 ch + 32]`` (``gated``: SiLU(gate) * up, from ``x[row, :K]`` and ``x[row, K:]``)
    rounded to int8 as ``make_quantize_dp4a_gpu`` says, into ``words[wrow, w0 : w0 + 8]``,
    ``scale[srow, s0]`` and ``total[srow, s0]``; ``xv`` (``2 * 32``, ``x_dtype``), ``v`` (32 float32),
    ``m`` (2 float32) and ``n`` (2 int32) are the caller's local scratch. Shared by the quantize kernel
    and the GEMV whose lanes quantize their own chunk."""
    from tvm.script import tirx as T

    K, B = in_features, DP4A_BLOCK

    @T.macro
    def quantize(x, row, ch, xv, v, m, n, words, wrow, w0, scale, total, srow, s0):
        for i0 in T.unroll(B // 8):
            for i1 in T.vectorized(8):
                xv[i0 * 8 + i1] = x[row, ch * B + i0 * 8 + i1]
        if gated:
            for i0 in T.unroll(B // 8):
                for i1 in T.vectorized(8):
                    xv[B + i0 * 8 + i1] = x[row, K + ch * B + i0 * 8 + i1]
        m[0] = T.float32(0)
        for i in T.unroll(B):
            if gated:
                v[i] = silu_mul(xv[i], xv[B + i], x_dtype)
            else:
                v[i] = T.Cast("float32", xv[i])
            m[0] = T.max(m[0], T.fabs(v[i]))
        m[1] = T.if_then_else(m[0] > T.float32(0), T.float32(127) / m[0], T.float32(0))
        n[0] = 0
        for j in T.unroll(B // 4):  # column 4j + b in byte b of word j
            n[1] = 0
            for b in T.unroll(4):
                qv: T.let[T.int32] = T.Cast("int32", T.round(v[4 * j + b] * m[1]))
                n[0] = n[0] + qv
                n[1] = n[1] | ((qv & 255) << (8 * b))
            words[wrow, w0 + j] = n[1]
        scale[srow, s0] = m[0] / T.float32(127)
        total[srow, s0] = n[0]

    return quantize


def make_quantize_dp4a_gpu(in_features: int, x_dtype: str, gated: bool = False):
    """PrimFunc ``quantize(x[T, K], xq[T, K/4] int32, xs[T, K/32] float32, xsum[T, K/32] int32)``: the
    activations as ``make_gemv_dp4a_gpu`` takes them. Per token and 32 columns ``xs = max|x| / 127`` and
    ``q = round(x * 127 / max|x|)`` (0 where all are 0), four int8 to a word (column ``4j + b`` in byte
    ``b`` of word ``j``), and ``xsum`` the sum of the 32 ``q`` (the INT4 zero point's term). With ``gated``
    ``x`` is the gate|up projection ``[T, 2K]`` and the values ``SiLU(gate) * up`` rounded to ``x_dtype``.
    One thread per 32 columns (``quantize_activations_ref(x, 32, 8)`` is its reference, but for rounding:
    this one rounds halves away from zero)."""
    from tvm.script import tirx as T

    K, B = in_features, DP4A_BLOCK
    assert K % B == 0, K
    NB, NT = K // B, 128
    XK = 2 * K if gated else K
    quantize_block = _dp4a_quantizer(K, x_dtype, gated)

    @T.prim_func(private=True, s_tir=True)  # a root block: Relax's pattern analysis wants one (3 outputs)
    def quantize(x_h: T.handle, q_h: T.handle, s_h: T.handle, n_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok = T.int64()
        x = T.match_buffer(x_h, (ntok, XK), x_dtype)
        xq = T.match_buffer(q_h, (ntok, K // 4), "int32")
        xs = T.match_buffer(s_h, (ntok, NB), "float32")
        xsum = T.match_buffer(n_h, (ntok, NB), "int32")
        with T.sblock("root"):
            for bx in T.thread_binding((NB + NT - 1) // NT, thread="blockIdx.x"):
                for t in T.thread_binding(ntok, thread="blockIdx.y"):
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        xv = T.alloc_buffer((2 * B,), x_dtype, scope="local")
                        v = T.alloc_buffer((B,), "float32", scope="local")
                        m = T.alloc_buffer((2,), "float32", scope="local")
                        n = T.alloc_buffer((2,), "int32", scope="local")
                        if bx * NT + tx < NB:
                            quantize_block(x, t, bx * NT + tx, xv, v, m, n, xq, t, (bx * NT + tx) * (B // 4), xs,
                                           xsum, t, bx * NT + tx)

    return quantize


def make_gemv_dp4a_gpu(in_features: int, out_features: int, fmt: QuantFormat, out_dtype: str,
                       scale_dtype: str = "float16", layout: tuple[int, int, int] | None = None, tokens: int = 1,
                       x_dtype: str = "", gated: bool = False):
    """PrimFunc ``gemv(xq[T, K/4] int32, xs[T, K/32], xsum[T, K/32], qweight[N, K/2], scales[N, K/G],
    out[T, N])``, or with ``x_dtype`` ``gemv(x[T, K], qweight, scales, out)`` quantizing the activations
    itself: symmetric INT4 weights (``make_gemv_gpu``'s layout and teams: ``layout`` as
    ``gemv_layout`` picks it, 4 rows a thread, ``tokens`` per pass) against int8 activations
    (``make_quantize_dp4a_gpu``) on integer dot products. A 16-byte chunk is 32 columns in 4 words: the
    low nibbles of word ``w`` are columns ``4w..4w+3``, its high nibbles ``16+4w..``, so ``w & 0x0F0F0F0F``
    and ``(w >> 4) & 0x0F0F0F0F`` meet the activation words ``c*8 + w`` and ``c*8 + 4 + w`` in one
    ``__dp4a`` each (4 products and their sum per instruction; the unsigned 0-15 values are positive int8).
    Per chunk and row: ``xs * (dot - 8 * xsum)`` times the group's scale, in float32. In SASS (sm_90, one
    token) its main loop issues 1.8-2.1 instructions per weight against 4.4-4.6 for ``make_gemv_gpu``'s
    float path (7.4 gated), whose INT4 GEMVs were issue-bound at 26-51% of an H200's copy bandwidth
    (docs/bench/2026-11-27-gpu-h200.md, 2026-11-27c-pdl-sass.md). The activations' rounding to 8 bits per
    32 columns is llama.cpp's (its q8_1 blocks). With ``x_dtype`` each lane quantizes the 32 activations of
    the chunk it is on, exactly as ``make_quantize_dp4a_gpu`` does (a chunk is one activation block, so no
    lane needs another's values, and no extra kernel runs; with ``gated`` from the gate|up projection
    ``[T, 2K]``, SiLU·mul first): ~3.1 instructions per weight (5.9 gated), the quantizing shared by the
    lane's 4 rows only. An experiment: bench/gpu_kernels.py times both forms, and FERRUM_GEMV_DP4A
    (``lower(gemv_dp4a=mode)``) puts a model's decode INT4 GEMVs on the first (``kernel``, after a
    ``make_quantize_dp4a_gpu``) or the second (``1``, ``lanes``).
    ``gemv_dp4a_ref`` is its reference."""
    import tvm
    from tvm.script import tirx as T

    assert fmt.bits == 4 and fmt.sym and fmt.group_size % DP4A_BLOCK == 0, fmt
    K, N, G = in_features, out_features, fmt.group_size
    NC = K // DP4A_BLOCK  # chunks of a row
    KT, RT, _ = layout or gemv_layout(NC, N)
    RB, TT = GEMV_ROWS, tokens
    NT, BR, J = KT * RT, RT * GEMV_ROWS, tokens * GEMV_ROWS
    SG = -(-NC // KT)  # steps of a lane over its row
    sums = block_sum_columns(NT, J, RT)
    lo_mask = T.uint32(0x0F0F0F0F)
    own = bool(x_dtype)  # the lanes quantize the activations themselves
    XT = x_dtype or "float16"
    XK = 2 * K if gated else K
    B = DP4A_BLOCK

    quantize_chunk = _dp4a_quantizer(K, XT, gated)

    @T.prim_func(private=True)
    def gemv(q_h: T.handle, s_h: T.handle, n_h: T.handle, w: T.Buffer((N, K // 2), "uint8"),  # type: ignore[valid-type]
             scales: T.Buffer((N, K // G), scale_dtype), o_h: T.handle, x_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok = T.int64()
        xq = T.match_buffer(q_h, (ntok, K // 4), "int32")
        xs = T.match_buffer(s_h, (ntok, NC), "float32")
        xsum = T.match_buffer(n_h, (ntok, NC), "int32")
        out = T.match_buffer(o_h, (ntok, N), out_dtype)
        x = T.match_buffer(x_h, (ntok, XK), XT)
        wq = T.decl_buffer((N, K // 8), "uint32", data=w.data)
        for blk in T.thread_binding((N + BR - 1) // BR, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                red = T.alloc_buffer((NT * (J + 1),), "float32", scope="shared")
                acc = T.alloc_buffer((J,), "float32", scope="local")
                raw = T.alloc_buffer((RB, 4), "uint32", scope="local")
                xw = T.alloc_buffer((TT, 8), "int32", scope="local")  # a chunk's 32 activations, per token
                sxs = T.alloc_buffer((TT, 1), "float32", scope="local")  # ... their scale
                sxsum = T.alloc_buffer((TT, 1), "int32", scope="local")  # ... and sum
                xv = T.alloc_buffer((2 * B,), XT, scope="local")  # own: the loaded activations (gated: and up)
                v = T.alloc_buffer((B,), "float32", scope="local")
                m = T.alloc_buffer((2,), "float32", scope="local")
                n = T.alloc_buffer((2,), "int32", scope="local")
                dot = T.alloc_buffer((1,), "int32", scope="local")
                count: T.let[T.int32] = T.Cast("int32", ntok)
                row0: T.let[T.int32] = blk * BR + tx // KT * RB
                for p in T.serial((count + TT - 1) // TT):
                    for j in T.unroll(J):
                        acc[j] = T.float32(0)
                    for g in T.serial(SG):
                        ch: T.let[T.int32] = g * KT + tx % KT
                        if ch < NC:
                            for r in T.unroll(RB):
                                if row0 + r < N:
                                    for i in T.vectorized(4):
                                        raw[r, i] = wq[row0 + r, ch * 4 + i]
                            for t in T.unroll(TT):
                                if p * TT + t < count:
                                    if own:
                                        quantize_chunk(x, p * TT + t, ch, xv, v, m, n, xw, t, 0, sxs, sxsum, t, 0)
                                    else:
                                        for i0 in T.unroll(2):  # two 16-byte loads (the widest a GPU has)
                                            for i1 in T.vectorized(4):
                                                xw[t, i0 * 4 + i1] = xq[p * TT + t, ch * 8 + i0 * 4 + i1]
                                        sxs[t, 0] = xs[p * TT + t, ch]
                                        sxsum[t, 0] = xsum[p * TT + t, ch]
                            for r in T.unroll(RB):
                                if row0 + r < N:
                                    scale: T.let[T.float32] = T.Cast("float32", scales[row0 + r, ch * DP4A_BLOCK // G])
                                    for t in T.unroll(TT):
                                        if p * TT + t < count:
                                            dot[0] = 0
                                            for i in T.unroll(4):
                                                dot[0] = T.call_pure_extern(
                                                    "int32", "__dp4a", T.reinterpret("int32", raw[r, i] & lo_mask),
                                                    xw[t, i], dot[0])
                                                dot[0] = T.call_pure_extern(
                                                    "int32", "__dp4a",
                                                    T.reinterpret("int32", (raw[r, i] >> T.uint32(4)) & lo_mask),
                                                    xw[t, 4 + i], dot[0])
                                            acc[t * RB + r] = acc[t * RB + r] + scale * sxs[t, 0] * T.Cast(
                                                "float32", dot[0] - 8 * sxsum[t, 0])
                    sums(red, acc, tx)
                    if tx % KT < J:
                        if p * TT + tx % KT // RB < count and row0 + tx % KT % RB < N:
                            out[p * TT + tx % KT // RB, row0 + tx % KT % RB] = T.Cast(
                                out_dtype, red[tx // KT * KT * (J + 1) + tx % KT])
                    T.tvm_storage_sync("shared")  # the next pass overwrites red

    q_h, s_h, n_h, w, sc, o_h, x_h = gemv.params
    keep = ([x_h] if own else [q_h, s_h, n_h]) + [w, sc, o_h]
    return tvm.tirx.PrimFunc(keep, gemv.body, gemv.ret_type, gemv.attrs)


# ---------------------------------------------------------------- tensor-core GEMM for few tokens (decode_wide)

SKINNY_WARPS = 4
SKINNY_COLUMNS = 256  # columns of x staged per step (all warps together)
SKINNY_MIN_BLOCKS = 264  # a grid this large keeps 2 blocks on each SM of a 132-SM H100/H200


def skinny_layout(in_features: int, out_features: int, unit: int = 16) -> tuple[int, int]:
    """``(row_fragments, k_splits)`` of a ``make_skinny_gemm_gpu`` block (their product is its 4 warps):
    4 row fragments of 16 weight rows when that still gives ``SKINNY_MIN_BLOCKS`` blocks, else fewer,
    the block's other warps splitting the columns (Qwen3-4B: gate|up 4 x 1, 304 blocks; q|k|v, o and
    down 1 x 4: 384 and 160 blocks), as long as each split gets whole steps of ``unit`` columns (16;
    INT4 weights: 32, a packed block)."""
    frags = out_features // 16
    rw = SKINNY_WARPS
    while rw > 1 and -(-frags // rw) < SKINNY_MIN_BLOCKS:
        rw //= 2
    while rw < SKINNY_WARPS and in_features % (SKINNY_WARPS // rw * unit):
        rw *= 2
    return rw, SKINNY_WARPS // rw


def make_skinny_gemm_gpu(in_features: int, out_features: int, dtype: str, out_dtype: str,
                         bias_dtype: str | None = None, gated: bool = False,
                         layout: tuple[int, int] | None = None, fmt: QuantFormat | None = None,
                         scale_dtype: str = "float16"):
    """PrimFunc ``skinny(x[T, K], w | (qweight, scales, [mins]), [bias[N],] out[T, N])``: a linear for steps of a few
    dozen tokens (``decode_wide``: one token per sequence, more than the GEMV's 8) on tensor cores,
    reading each weight once per 64 tokens where a tiled GEMM's grid of 128-row tiles leaves most SMs idle.

    ``x`` and ``w`` are both ``dtype`` (CUDA: float16 or bfloat16; float32 builds exist for the CPU
    emulator only). Each warp owns 16 weight rows (a row fragment) and loads their 16 x 16 weight tiles
    straight from memory into wmma fragments (a row-major ``W[n, k]`` is the column-major ``B[k, n]``),
    all of a step's tiles before it multiplies (``SKINNY_COLUMNS / k_splits`` columns: 4 to 8 fragments
    in flight per warp). The block's 4 warps are ``skinny_layout``'s row fragments x column splits. Per
    step the block stages the tokens' activations for ``SKINNY_COLUMNS`` columns in shared memory (zeros
    past the last token; ``gated``: ``silu(gate) * up`` of a gate|up output ``x[T, 2K]``, rounded to
    ``dtype``); each warp multiplies 16 x 16 x 16 pieces into float32 accumulators, one per 16 tokens,
    up to 64 tokens per pass (32 in float32 builds, for the shared memory) and more passes for more
    tokens. The column splits' accumulators are summed through shared memory, with the bias, and cast.
    ``K`` and ``N`` must be multiples of 16.

    With ``fmt`` (INT4 / INT8, the GEMV's row layout) each warp loads its rows' packed 16-byte chunks for
    the step, as 32-bit words, once the barrier that opens the step has passed, and dequantizes them into
    its own 16-row tile of shared memory (``word_decoder``, as ``make_gemv_gpu``; the group's scale
    and min; rounded to ``dtype`` as ``qlinear_te`` rounds them), from which it loads the fragments.
    Steps are 128 columns or fewer then, so both staged tiles fit the shared memory.
    """
    import tvm
    from tvm.script import tirx as T

    K, N = in_features, out_features
    quant = fmt is not None
    int4 = fmt is not None and fmt.bits == 4
    sym = fmt is not None and fmt.sym
    CC = gemv_chunk(fmt, dtype, K) if quant else 16  # columns of a packed 16-byte chunk
    assert K % 16 == 0 and N % 16 == 0 and (fmt is None or fmt.check(K) is None), (K, N, fmt)
    RW, KW = layout or skinny_layout(K, N, CC)
    assert RW * KW == SKINNY_WARPS and K % (KW * CC) == 0, (RW, KW, K)
    NT = 32 * SKINNY_WARPS
    MFM = 4 if dtype in ("float16", "bfloat16") else 2  # 16-token fragments per pass
    TP = 16 * MFM  # tokens per pass
    e = dtype_bytes(dtype)

    def shared(sc: int) -> int:  # staged activations (+ dequantized weights) + the accumulators' exchange
        return TP * (sc + 8) * e + (SKINNY_WARPS * 16 * (sc // KW + 8) * e if quant else 0) + SKINNY_WARPS * 1024

    SC = SKINNY_COLUMNS
    while SC > KW * CC and (K % SC or shared(SC) > 46 * 1024):
        SC //= 2
    SC = max(SC, KW * CC)
    assert K % SC == 0, (K, SC)
    KSW = SC // KW  # columns of a warp per step
    FW = KSW // 16  # weight fragments of a warp per step
    XLD = SC + 8  # padded row stride of the staged activations
    WLD = KSW + 8  # ... and of a warp's dequantized weight tile
    V = min(8, SC)  # activations per load
    EX = -(-TP * SC // (NT * V))  # staging loads per thread
    has_bias = bias_dtype is not None
    XK = 2 * K if gated else K
    # quantized: a warp's step is 16 rows x KSW / CC chunks of 4 words, LCH per lane; a word holds columns
    # ``word * 4 + run * 16 + b`` of its chunk (INT4 runs 0, 1: low and high nibbles; INT8 run 0)
    CPR = KSW // CC  # chunks per row per step
    LCH = -(-16 * CPR // 32)
    assert 16 * CPR % 32 == 0 or CPR == 1, CPR
    G = fmt.group_size if fmt is not None else K
    RUNS, decode = word_decoder(fmt) if fmt is not None else (1, _no_words)
    wshape = (N, K // 2) if int4 else (N, K)
    wdt = "uint8" if int4 else ("int8" if quant else dtype)
    BITS = fmt.bits if fmt is not None else 16
    WORDS = K * BITS // 32 if quant else 1
    KG = K // G

    @T.prim_func(private=True)
    def skinny(x_h: T.handle, w: T.Buffer(wshape, wdt), s: T.Buffer((N, KG), scale_dtype),  # type: ignore[valid-type]
               mn: T.Buffer((N, KG), "float32"), b: T.Buffer((N,), bias_dtype or "float32"),  # type: ignore[valid-type]
               o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok = T.int64()
        x = T.match_buffer(x_h, (ntok, XK), dtype)
        out = T.match_buffer(o_h, (ntok, N), out_dtype)
        wq = T.decl_buffer((N, WORDS), "uint32", data=w.data)  # quantized rows as 32-bit words
        for blk in T.thread_binding((N // 16 + RW - 1) // RW, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                ws = T.alloc_buffer((SKINNY_WARPS * 16 * WLD if quant else 1,), dtype, scope="shared")
                raw = T.alloc_buffer((LCH, 4), "uint32", scope="local")
                wv = T.alloc_buffer((4 * RUNS,), "float32", scope="local")
                xs = T.alloc_buffer((TP * XLD,), dtype, scope="shared")
                cs = T.alloc_buffer((SKINNY_WARPS * 256,), "float32", scope="shared")
                fa = T.alloc_buffer((256,), dtype, scope="wmma.matrix_a")
                fb = T.alloc_buffer((FW * 256,), dtype, scope="wmma.matrix_b")
                fc = T.alloc_buffer((MFM * 256,), "float32", scope="wmma.accumulator")
                xv = T.alloc_buffer((2, V), dtype, scope="local")
                acc = T.alloc_buffer((1,), "float32", scope="local")
                warp: T.let[T.int32] = T.Cast("int32", tx) // 32
                n0: T.let[T.int32] = (T.Cast("int32", blk) * RW + warp // KW) * 16  # the warp's rows
                for g in T.serial((T.Cast("int32", ntok) + TP - 1) // TP):
                    t0: T.let[T.int32] = g * TP  # the pass's first token
                    mf: T.let[T.int32] = T.min((T.Cast("int32", ntok) - t0 + 15) // 16, MFM)  # its fragments
                    for f in T.unroll(MFM):
                        T.tvm_fill_fragment(fc.data, 16, 16, 16, f, T.float32(0))
                    for st in T.serial(K // SC):
                        if n0 < N and not quant:  # the step's weight tiles first: they fly while x is staged
                            for f in T.unroll(FW):
                                T.tvm_load_matrix_sync(fb.data, 16, 16, 16, f, w.access_ptr(
                                    "r", offset=n0 * K + st * SC + warp % KW * KSW + f * 16), K, "col_major")
                        T.tvm_storage_sync("shared")  # the previous step's readers of xs (and ws) are done
                        if quant and n0 < N:  # this warp's rows' packed chunks, dequantized into its tile of ws
                            # (lanes past the chunks, when a step has 16, repeat the first: same values)
                            for i in T.unroll(LCH):
                                cw: T.let[T.int32] = (i * 32 + T.Cast("int32", tx) % 32) % (16 * CPR)
                                col: T.let[T.int32] = st * SC + warp % KW * KSW + cw % CPR * CC
                                for qw in T.vectorized(4):
                                    raw[i, qw] = wq[n0 + cw // CPR, col * BITS // 32 + qw]
                                scale: T.let[T.float32] = T.Cast("float32", s[n0 + cw // CPR, col // G])
                                for wd in T.unroll(4):
                                    for run in T.unroll(RUNS):
                                        for bb in T.unroll(4):
                                            wv[run * 4 + bb] = decode(raw[i, wd], run, bb)
                                            if sym:
                                                ws[(warp * 16 + cw // CPR) * WLD + cw % CPR * CC + run * 16
                                                   + wd * 4 + bb] = T.Cast(dtype, wv[run * 4 + bb] * scale)
                                            else:
                                                ws[(warp * 16 + cw // CPR) * WLD + cw % CPR * CC + run * 16
                                                   + wd * 4 + bb] = T.Cast(dtype, wv[run * 4 + bb] * scale
                                                                           + mn[n0 + cw // CPR, col // G])
                        for e in T.unroll(EX):
                            if (e * NT + T.Cast("int32", tx)) * V < TP * SC:
                                r: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) * V // SC
                                c: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) * V % SC
                                # rows past the last token: zeros (a clamped row's load, masked)
                                tr: T.let[T.int32] = T.min(t0 + r, T.Cast("int32", ntok) - 1)
                                live: T.let[T.bool] = t0 + r < T.Cast("int32", ntok)
                                for i in T.vectorized(V):
                                    xv[0, i] = x[tr, st * SC + c + i]
                                if gated:
                                    for i in T.vectorized(V):
                                        xv[1, i] = x[tr, K + st * SC + c + i]
                                    for i in T.unroll(V):
                                        xs[r * XLD + c + i] = T.if_then_else(
                                            live, T.Cast(dtype, silu_mul(xv[0, i], xv[1, i], dtype)),
                                            T.Cast(dtype, T.float32(0)))
                                else:
                                    for i in T.unroll(V):
                                        xs[r * XLD + c + i] = T.if_then_else(live, xv[0, i],
                                                                             T.Cast(dtype, T.float32(0)))
                        T.tvm_storage_sync("shared")
                        if quant and n0 < N:
                            for f in T.unroll(FW):
                                T.tvm_load_matrix_sync(fb.data, 16, 16, 16, f, ws.access_ptr(
                                    "r", offset=warp * 16 * WLD + f * 16), WLD, "col_major")
                        if n0 < N:
                            for m in T.unroll(MFM):
                                if m < mf:
                                    for f in T.unroll(FW):
                                        T.tvm_load_matrix_sync(fa.data, 16, 16, 16, 0, xs.access_ptr(
                                            "r", offset=m * 16 * XLD + warp % KW * KSW + f * 16), XLD, "row_major")
                                        T.tvm_mma_sync(fc.data, m, fa.data, 0, fb.data, f, fc.data, m)
                    for m in T.unroll(MFM):  # per 16 tokens: the splits' sums, the bias, the cast
                        if m < mf:  # (the barriers stay outside the condition, which every thread shares)
                            T.tvm_store_matrix_sync(fc.data, 16, 16, 16, m, cs.access_ptr("w", offset=warp * 256),
                                                    16, "row_major")
                        T.tvm_storage_sync("shared")
                        for e in T.unroll(RW * 256 // NT):
                            # element (token ti, row rj) of row fragment q: 256 per fragment
                            q: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) // 256
                            ti: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) % 256 // 16
                            rj: T.let[T.int32] = (e * NT + T.Cast("int32", tx)) % 16
                            nq: T.let[T.int32] = (T.Cast("int32", blk) * RW + q) * 16 + rj
                            if m < mf and t0 + m * 16 + ti < T.Cast("int32", ntok) and nq < N:
                                acc[0] = T.float32(0)
                                for kw in T.unroll(KW):
                                    acc[0] = acc[0] + cs[(q * KW + kw) * 256 + ti * 16 + rj]
                                if has_bias:
                                    out[t0 + m * 16 + ti, nq] = T.Cast(out_dtype, acc[0] + T.Cast("float32", b[nq]))
                                else:
                                    out[t0 + m * 16 + ti, nq] = T.Cast(out_dtype, acc[0])
                        T.tvm_storage_sync("shared")

    x_h, w, sc, mn, b, o_h = skinny.params
    keep = [x_h, w] + ([sc] if quant else []) + ([mn] if quant and not sym else []) + ([b] if has_bias else [])
    return tvm.tirx.PrimFunc(keep + [o_h], skinny.body, skinny.ret_type, skinny.attrs)


# ---------------------------------------------------------------- TE forms (GPU kernels, embedding gather)

def dequant_expr(fmt: QuantFormat, tirx, qweight, scales, mins, n, k):
    """float32 ``W[n, k]`` as a TIR expression over the kernel-layout tensors."""
    g = k // fmt.group_size
    if fmt.bits == 4:
        byte = qweight[n, (k // 32) * 16 + k % 16]
        q = tirx.if_then_else(k % 32 < 16, byte & tirx.const(15, "uint8"), byte >> tirx.const(4, "uint8"))
    else:
        q = qweight[n, k]
    qf, s = q.astype("float32"), scales[n, g].astype("float32")
    if fmt.sym:
        return (qf - tirx.const(float(fmt.zero_point), "float32")) * s
    return qf * s + mins[n, g]


# tiled GEMM for GPUs (prefill linears where dlight does not use tensor cores; MoE experts, grouped)
GEMM_TILE_M = 64  # tokens (slots) per tile; a grouped tile never mixes experts
GEMM_TILE_N = 64
GEMM_TILE_K = 32
GEMM_THREADS = 256  # 16 x 16, each 4 slots x 4 outputs


def make_tiled_gemm_gpu(in_features: int, out_features: int, fmt: QuantFormat | None, x_dtype: str, w_dtype: str,
                        out_dtype: str, bias_dtype: str | None = None, scale_dtype: str = "float16",
                        mma_dtype: str = "", experts: int = 0, x_div: int = 1, gated: bool = False):
    """PrimFunc ``tiled_gemm(x[T, K], w | (qweight, scales, [mins]), [bias[N],] out[T, N])``: a linear as a
    tiled GEMM, for batches past the GEMV's where dlight's matmul schedule does not use tensor cores
    (bfloat16).

    Each block computes a ``GEMM_TILE_M`` x ``GEMM_TILE_N`` tile of the output: 64 tokens against 64 rows.
    Per step of 32 columns the block stages the tokens' activations and the rows' weights, dequantized
    once (INT4: low nibbles are columns 0-15 of a 32-column block, high nibbles 16-31), in shared memory,
    and each of 256 threads accumulates 4 x 4 outputs in float32 registers, written with the bias and
    cast to ``out_dtype``.

    With ``mma_dtype`` (CUDA: float16 or bfloat16) the products run on tensor cores: the staged tiles are
    rounded to it (the dequantized weight as ``qlinear_te`` rounds it) and each of the 8 warps multiplies
    a 16 x 32 piece of the output tile with wmma 16x16x16 into float32 accumulators, which leave through
    shared memory. ``mma_dtype`` float32 exists for the CPU emulator only (tests/gpu_emu.py).

    With ``experts`` > 0 it is the MoE experts' grouped GEMM (``schedules/moe.py``), as ``make_gemv_gpu``
    with ``experts`` is their GEMV: ``grouped_gemm(x[?, K], w[E*N, ...]..., offsets[E+1], tiles[E+1],
    order[S], out[S, N])`` with ``offsets``/``tiles``/``order`` from ``moe.make_moe_dispatch_gpu``. A
    block's tile is up to 64 slots of one expert (gathered through ``order``; token ``slot // x_div``),
    found by a binary search of ``tiles``; grid rows past the last tile (``moe.gemm_tiles`` is a bound)
    skip the column loop; experts no slot chose are never read. With ``gated``, ``x`` is the gate|up
    output ``[?, 2K]`` and the input is ``silu(gate) * up``, as in ``make_gemv_gpu``.
    """
    from tvm.script import tirx as T

    grouped = experts > 0
    E, K, N = max(experts, 1), in_features, out_features
    TM, TN, TK, NT = GEMM_TILE_M, GEMM_TILE_N, GEMM_TILE_K, GEMM_THREADS
    has_bias = bias_dtype is not None
    quant, int4 = fmt is not None, fmt is not None and fmt.bits == 4
    sym = fmt is not None and fmt.sym
    if fmt is not None:
        assert fmt.check(K) is None and K % TK == 0, (fmt, K)
        G, zp = fmt.group_size, float(fmt.zero_point)
    else:
        G, zp = K, 0.0
    wshape = (E * N, K // 2) if int4 else (E * N, K)
    wdt = "uint8" if int4 else ("int8" if quant else w_dtype)
    KG = K // G
    steps = (E - 1).bit_length() + 1  # binary search over E tile starts
    PER = TM * TK // NT  # staged elements per thread per operand: 8
    tc = bool(mma_dtype)
    TKP, CLD = TK + 8, TN + 4  # padded row strides of the staged tiles and of the output tile (tensor cores)

    @T.macro
    def body(x, w, scales, mins, bias, offsets, tiles, order, out, nslot):
        for bn in T.thread_binding((N + TN - 1) // TN, thread="blockIdx.x"):
            for bm in T.thread_binding((nslot + TM - 1) // TM + (E if grouped else 0), thread="blockIdx.y"):
                for tx in T.thread_binding(NT, thread="threadIdx.x"):
                    if tc:  # slot/row-major tiles for wmma; the output tile through shared memory
                        xs = T.alloc_buffer((TM * TKP,), mma_dtype, scope="shared")
                        ws = T.alloc_buffer((TN * TKP,), mma_dtype, scope="shared")
                        cs = T.alloc_buffer((TM * CLD,), "float32", scope="shared")
                        fa = T.alloc_buffer((TK // 16 * 256,), mma_dtype, scope="wmma.matrix_a")
                        fb = T.alloc_buffer((256,), mma_dtype, scope="wmma.matrix_b")
                        fc = T.alloc_buffer((2 * 256,), "float32", scope="wmma.accumulator")
                    else:  # column-major tiles: thread products read 4 consecutive slots / rows
                        xs = T.alloc_buffer((TK, TM), "float32", scope="shared")
                        ws = T.alloc_buffer((TK, TN), "float32", scope="shared")
                        a = T.alloc_buffer((4,), "float32", scope="local")
                        b = T.alloc_buffer((4,), "float32", scope="local")
                    acc = T.alloc_buffer((16,), "float32", scope="local")
                    xv = T.alloc_buffer((PER,), "float32", scope="local")
                    xu = T.alloc_buffer((PER,), "float32", scope="local")  # gated: the up half
                    wv = T.alloc_buffer((PER,), "float32", scope="local")
                    wb = T.alloc_buffer((PER,), "uint8", scope="local")  # INT4: the weights' bytes
                    sv = T.alloc_buffer((2,), "float32", scope="local")  # quantized: their group's scale, min
                    # what this thread stages: slot/row tx // 4, columns (tx % 4) * 8 .. + 8
                    sr: T.let[T.int32] = T.Cast("int32", tx) // 4
                    sc: T.let[T.int32] = T.Cast("int32", tx) % 4 * PER
                    if grouped:  # the block's (expert, tile): a binary search of the tile numbers
                        span = T.alloc_buffer((2,), "int32", scope="local")  # lo, hi
                        span[0] = 0
                        span[1] = E
                        for _it in T.serial(steps):
                            if span[1] - span[0] > 1:
                                if tiles[(span[0] + span[1]) // 2] <= T.Cast("int32", bm):
                                    span[0] = (span[0] + span[1]) // 2
                                else:
                                    span[1] = (span[0] + span[1]) // 2
                        e: T.let[T.int32] = span[0]
                        live: T.let[T.bool] = T.Cast("int32", bm) < tiles[E]
                        m0: T.let[T.int32] = (T.Cast("int32", bm) - tiles[e]) * TM  # first slot of the tile
                        rows: T.let[T.int32] = T.if_then_else(live, T.min(offsets[e + 1] - offsets[e] - m0, TM), 0)
                        tok: T.let[T.int32] = T.if_then_else(
                            sr < rows, order[T.min(offsets[e] + m0 + sr, T.Cast("int32", nslot) - 1)] // x_div, 0)
                    else:  # tile bm: tokens bm * TM ..
                        e: T.let[T.int32] = 0
                        m0: T.let[T.int32] = T.Cast("int32", bm) * TM
                        rows: T.let[T.int32] = T.min(T.Cast("int32", nslot) - m0, TM)
                        tok: T.let[T.int32] = T.if_then_else(sr < rows, m0 + sr, 0)
                    wn: T.let[T.int32] = e * N + T.min(T.Cast("int32", bn) * TN + sr, N - 1)
                    for j in T.unroll(16):
                        acc[j] = T.float32(0)
                    if tc:
                        for c in T.serial(2):
                            T.tvm_fill_fragment(fc.data, 16, 16, 16, c, T.float32(0))
                    for kb in T.serial(T.if_then_else(rows > 0, (K + TK - 1) // TK, 0)):
                        # every load of the step first, then the arithmetic and the stores: loaded and
                        # stored element by element, each load waited for the one before (23 of the
                        # grouped INT4 GEMM's 47 loads in SASS, bench/cuda_sass.py --waits)
                        for i in T.unroll(PER):
                            xv[i] = T.if_then_else(sr < rows and kb * TK + sc + i < K, T.Cast(
                                "float32", x[tok, T.min(kb * TK + sc + i, K - 1)]), T.float32(0))
                            if gated:
                                xu[i] = T.Cast("float32", x[tok, K + T.min(kb * TK + sc + i, K - 1)])
                            if int4:
                                wb[i] = w[wn, kb * 16 + sc % 16 + i]
                            else:
                                wv[i] = T.Cast("float32", w[wn, T.min(kb * TK + sc + i, K - 1)])
                        if quant:  # the thread's 8 columns share a group (groups are multiples of 16)
                            sv[0] = T.Cast("float32", scales[wn, (kb * TK + sc) // G])
                            if not sym:
                                sv[1] = mins[wn, (kb * TK + sc) // G]
                        for i in T.unroll(PER):
                            if gated:
                                xv[i] = silu_mul(xv[i], xu[i], x_dtype)
                            if tc:
                                xs[sr * TKP + sc + i] = T.Cast(mma_dtype, xv[i])
                            else:
                                xs[sc + i, sr] = xv[i]
                        for i in T.unroll(PER):
                            col: T.let[T.int32] = kb * TK + sc + i
                            if int4:  # columns 0-15 of the 32-column block are low nibbles, 16-31 high
                                wv[i] = T.Cast("float32", T.if_then_else(
                                    sc < 16, T.bitwise_and(wb[i], T.uint8(15)), T.shift_right(wb[i], T.uint8(4))))
                            if quant and sym:
                                wv[i] = (wv[i] - T.float32(zp)) * sv[0]
                            elif quant:
                                wv[i] = wv[i] * sv[0] + sv[1]
                            elif K % TK != 0:
                                wv[i] = T.if_then_else(col < K, wv[i], T.float32(0))
                            if tc:
                                ws[sr * TKP + sc + i] = T.Cast(mma_dtype, wv[i])
                            else:
                                ws[sc + i, sr] = wv[i]
                        T.tvm_storage_sync("shared")
                        if tc:  # warp w: output rows (w // 2) * 16 .. + 16, columns (w % 2) * 32 .. + 32
                            for kf in T.serial(TK // 16):
                                T.tvm_load_matrix_sync(fa.data, 16, 16, 16, kf, xs.access_ptr(
                                    "r", offset=tx // 64 * 16 * TKP + kf * 16), TKP, "row_major")
                            for c in T.serial(2):
                                for kf in T.serial(TK // 16):
                                    T.tvm_load_matrix_sync(fb.data, 16, 16, 16, 0, ws.access_ptr(
                                        "r", offset=(tx // 32 % 2 * 2 + c) * 16 * TKP + kf * 16), TKP, "col_major")
                                    T.tvm_mma_sync(fc.data, c, fa.data, kf, fb.data, 0, fc.data, c)
                        else:
                            for kk in T.serial(TK):
                                for i in T.unroll(4):
                                    a[i] = xs[kk, tx // 16 * 4 + i]
                                for i in T.unroll(4):
                                    b[i] = ws[kk, tx % 16 * 4 + i]
                                for i in T.unroll(4):
                                    for j in T.unroll(4):
                                        acc[i * 4 + j] = acc[i * 4 + j] + a[i] * b[j]
                        T.tvm_storage_sync("shared")
                    if tc:  # the accumulators to shared memory, then each thread's 4 x 4 outputs from there
                        for c in T.serial(2):
                            T.tvm_store_matrix_sync(fc.data, 16, 16, 16, c, cs.access_ptr(
                                "w", offset=tx // 64 * 16 * CLD + (tx // 32 % 2 * 2 + c) * 16), CLD, "row_major")
                        T.tvm_storage_sync("shared")
                        for i in T.unroll(4):
                            for j in T.unroll(4):
                                acc[i * 4 + j] = cs[(tx // 16 * 4 + i) * CLD + tx % 16 * 4 + j]
                    for i in T.unroll(4):
                        if tx // 16 * 4 + i < rows:
                            if grouped:
                                slot: T.let[T.int32] = order[offsets[e] + m0 + T.Cast("int32", tx) // 16 * 4 + i]
                            else:
                                slot: T.let[T.int32] = m0 + T.Cast("int32", tx) // 16 * 4 + i
                            for j in T.unroll(4):
                                n: T.let[T.int32] = T.Cast("int32", bn) * TN + T.Cast("int32", tx) % 16 * 4 + j
                                if n < N:
                                    if has_bias:
                                        out[slot, n] = T.Cast(out_dtype, acc[i * 4 + j] + T.Cast("float32", bias[n]))
                                    else:
                                        out[slot, n] = T.Cast(out_dtype, acc[i * 4 + j])

    E1 = E + 1
    XK = 2 * K if gated else K

    # one signature with every tensor; those this variant does not read are dropped below
    if grouped:
        @T.prim_func(private=True)
        def func(x_h: T.handle, w: T.Buffer(wshape, wdt), s: T.Buffer((E * N, KG), scale_dtype),  # type: ignore[valid-type]
                 m: T.Buffer((E * N, KG), "float32"), off: T.Buffer((E1,), "int32"),  # type: ignore[valid-type]
                 til: T.Buffer((E1,), "int32"), ord_h: T.handle, o_h: T.handle):  # type: ignore[valid-type]
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            nx, nslot = T.int64(), T.int64()
            body(T.match_buffer(x_h, (nx, XK), x_dtype), w, s, m, None, off, til,
                 T.match_buffer(ord_h, (nslot,), "int32"), T.match_buffer(o_h, (nslot, N), out_dtype), nslot)
    else:
        @T.prim_func(private=True)
        def func(x_h: T.handle, w: T.Buffer(wshape, wdt), s: T.Buffer((N, KG), scale_dtype),  # type: ignore[valid-type]
                 m: T.Buffer((N, KG), "float32"), b: T.Buffer((N,), bias_dtype or "float32"),  # type: ignore[valid-type]
                 o_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            ntok = T.int64()
            body(T.match_buffer(x_h, (ntok, XK), x_dtype), w, s, m, b, None, None, None,
                 T.match_buffer(o_h, (ntok, N), out_dtype), ntok)

    import tvm

    params = list(func.params)
    weights = params[:2] + ([params[2]] if quant else []) + ([params[3]] if quant and not sym else [])
    rest = params[4:] if grouped else ([params[4]] if bias_dtype else []) + [params[5]]
    return tvm.tirx.PrimFunc(weights + rest, func.body, func.ret_type, func.attrs)


def qlinear_te(fmt: QuantFormat, out_dtype: str, has_bias: bool):
    """GPU form, for batches past the GEMV's: ``f(x, qweight, scales, [mins,] [bias])`` → TE tensor ``[T, N]``.

    Two stages in one PrimFunc: the weight dequantized to ``x``'s dtype, then a float32-accumulated matmul.
    That is the shape dlight's matmul rule recognises: it inlines the dequant into the loads of each weight
    tile to shared memory and, for float16 on sm_70+, runs the tile products on tensor cores (wmma), so the
    packed weight is read once per tile of 128 tokens and never written back dequantized. Folded into the
    reduction instead, the rule would not match and each output would be its own dot product.
    """
    from tvm import te, tirx

    def f(x, qweight, scales, *rest):
        mins = rest[0] if not fmt.sym else None
        bias = rest[-1] if has_bias else None
        K, N = x.shape[1], qweight.shape[0]
        w = te.compute((N, K), lambda n, c: dequant_expr(fmt, tirx, qweight, scales, mins, n, c).astype(x.dtype),
                       name="dequant")
        k = te.reduce_axis((0, K), name="k")
        mm = te.compute((x.shape[0], N), lambda t, n: te.sum(
            x[t, k].astype("float32") * w[n, k].astype("float32"), axis=k), name="qmatmul")
        if bias is None:
            return te.compute(mm.shape, lambda t, n: mm[t, n].astype(out_dtype), name="qlinear")
        return te.compute(mm.shape, lambda t, n: (mm[t, n] + bias[n].astype("float32")).astype(out_dtype),
                          name="qlinear")

    return f


def qembedding_r16_te(fmt: QuantFormat, out_dtype: str):
    """``f(qweight, scales, [mins,] ids)`` → ``[T, D]`` rows of an int8 table in the r16 layout
    (``interleave_r16``): row ``n`` column ``c`` is byte ``(c // 4) * 64 + (n % 16) * 4 + c % 4`` of block
    ``n // 16``, stored as ``q + 128``."""
    from tvm import te

    assert fmt.bits == 8, fmt

    def f(qweight, scales, *rest):
        d = qweight.shape[1] // R16
        G = fmt.group_size
        mins, ids = (None, rest[0]) if fmt.sym else rest

        def row(t, c):
            n = ids[t]
            q = qweight[n // R16, (c // 4) * 64 + (n % R16) * 4 + c % 4].astype("float32") - 128.0
            at = (n // R16, (c // G) * R16 + n % R16)
            w = q * scales[at].astype("float32")
            return (w if mins is None else w + mins[at]).astype(out_dtype)

        return te.compute((ids.shape[0], d), row, name="qembedding")

    return f


def qembedding_te(fmt: QuantFormat, out_dtype: str):
    """``f(qweight, scales, [mins,] ids)`` → ``[T, D]`` rows of the dequantized table."""
    from tvm import te, tirx

    def f(qweight, scales, *rest):
        mins = rest[0] if not fmt.sym else None
        ids = rest[-1]
        d = scales.shape[1] * fmt.group_size
        return te.compute((ids.shape[0], d), lambda t, c: dequant_expr(
            fmt, tirx, qweight, scales, mins, ids[t], c).astype(out_dtype), name="qembedding")

    return f

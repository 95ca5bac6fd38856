"""Quantized weights at compile time: one canonical group-affine form for every source.

GPTQ tensors (``qweight``/``qzeros``/``scales``/``g_idx``), GGUF Q4_0/Q4_1/Q8_0 blocks and round-to-nearest
quantization of dense weights (``--quant q4|q8``) all become a ``QuantTensor``: integers ``q[N, K]``
(one per weight, unpacked), per-group ``scales`` and (asymmetric) ``mins``, and for act-order GPTQ the
column permutation that makes groups contiguous. ``pack()`` turns it into the kernel layout of
``schedules/quant_linear.py``. Everything here is numpy only, so weights can be packed without TVM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferrum.schedules.quant_linear import QuantFormat, interleave_r16, pack_int4, unpack_int4

from .frontend import SourceError

QUANT_MODES = ("auto", "none", "q4", "q8")  # --quant: keep the source's / dequantize all / RTN linears


@dataclass(frozen=True)
class QuantSpec:
    """The declared quantization of one weight: its kernel format and whether columns are permuted."""

    fmt: QuantFormat
    act_order: bool = False
    layout: str = "rows"  # kernel layout of the packed tensors (quant_linear.LAYOUTS), chosen per target

    def to_dict(self) -> dict:
        d = {**self.fmt.to_dict(), "act_order": self.act_order}
        return d if self.layout == "rows" else {**d, "layout": self.layout}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(QuantFormat.from_dict(d), bool(d.get("act_order")), str(d.get("layout", "rows")))


@dataclass
class QuantTensor:
    fmt: QuantFormat
    q: np.ndarray  # [N, K] uint8 0..15 (int4) or int8 (int8), columns in kernel (group) order
    scales: np.ndarray  # [N, K/G] float32, exactly representable in float16
    mins: np.ndarray | None  # [N, K/G] float32 when asymmetric
    perm: np.ndarray | None = None  # [K] int32: kernel column j reads input column perm[j]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def dequantize(self) -> np.ndarray:
        """float32 ``W[N, K]`` in the checkpoint's column order."""
        s = np.repeat(self.scales, self.fmt.group_size, axis=1)
        q = self.q.astype(np.float32)
        if self.fmt.sym:
            w = s * self.fmt.levels(self.q).astype(np.float32)
        else:
            assert self.mins is not None, "asymmetric weights carry mins"
            w = s * q + np.repeat(self.mins, self.fmt.group_size, axis=1)
        if self.perm is not None:
            out = np.empty_like(w)
            out[:, self.perm] = w
            return out
        return w

    def as_format(self, fmt: QuantFormat, name: str) -> "QuantTensor":
        """The same weights in ``fmt``; only symmetric → asymmetric (``mins = -zp * scales``) and 4-bit →
        the same integers (a table's values) in 8 bits (``fmt.widened()``; a negative scale's sign moves into
        its values) convert."""
        if fmt == self.fmt:
            return self
        if self.fmt.bits == 4 and fmt == self.fmt.widened():
            if not fmt.sym:
                return QuantTensor(fmt, self.q.astype(np.int8), self.scales, self.mins, self.perm)
            v = self.fmt.levels(self.q).astype(np.int16)
            v = np.where(np.repeat(self.scales < 0, fmt.group_size, axis=1), -v, v).astype(np.int8)
            return QuantTensor(fmt, v, np.abs(self.scales), None, self.perm)
        if (fmt.bits, fmt.group_size) == (self.fmt.bits, self.fmt.group_size) and self.fmt.sym and not fmt.sym:
            return QuantTensor(fmt, self.q, self.scales, -self.fmt.zero_point * self.scales, self.perm)
        raise SourceError(f"{name}: the checkpoint stores {self.fmt.bits}-bit group {self.fmt.group_size} "
                          f"{'symmetric' if self.fmt.sym else 'asymmetric'} weights, the model declared "
                          f"{fmt.bits}-bit group {fmt.group_size} {'symmetric' if fmt.sym else 'asymmetric'}; "
                          "its quantization_config does not match its tensors")

    def take_rows(self, index: np.ndarray) -> "QuantTensor":
        return QuantTensor(self.fmt, self.q[index], self.scales[index],
                           None if self.mins is None else self.mins[index], self.perm)

    def pack(self, layout: str = "rows") -> dict[str, np.ndarray]:
        """Kernel-layout tensors: ``qweight``, ``scales`` (float16), ``mins`` (asymmetric) and ``perm``."""
        out = {"qweight": pack_int4(self.q) if self.fmt.bits == 4 else self.q.astype(np.int8),
               "scales": self.scales.astype(np.float16)}
        if not self.fmt.sym:
            assert self.mins is not None, "asymmetric weights carry mins"
            out["mins"] = self.mins.astype(np.float32)
        if self.perm is not None:
            out["perm"] = self.perm.astype(np.int32)
        return interleave_r16(out) if layout == "r16" else out


def concat_rows(parts: list[QuantTensor], names: tuple[str, ...]) -> QuantTensor:
    """Stack fused linears (q/k/v, gate/up) along the output axis; they must share one format."""
    first = parts[0]
    for p, name in zip(parts, names):
        same_perm = (p.perm is None and first.perm is None) or (
            p.perm is not None and first.perm is not None and np.array_equal(p.perm, first.perm))
        if p.fmt != first.fmt or not same_perm:
            raise SourceError(f"cannot fuse {names[0]} and {name}: they are quantized differently "
                              f"({first.fmt} vs {p.fmt}); compile with --quant none")
    return QuantTensor(first.fmt, np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]),
                       None if first.mins is None else np.concatenate([p.mins for p in parts]), first.perm)


def quantize_rtn(w: np.ndarray, fmt: QuantFormat) -> QuantTensor:
    """Round-to-nearest per group: int4 asymmetric (min/max), int8 symmetric (absmax)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    g = w.reshape(n, k // fmt.group_size, fmt.group_size)
    if fmt.bits == 8 and fmt.sym:
        s = _f16(np.abs(g).max(axis=2) / 127.0)
        q = np.clip(np.rint(g / s[..., None]), -127, 127).astype(np.int8)
        return QuantTensor(fmt, q.reshape(n, k), s, None)
    assert fmt.bits == 4 and not fmt.sym, "RTN makes asymmetric int4 or symmetric int8"
    lo, hi = g.min(axis=2), g.max(axis=2)
    s = _f16((hi - lo) / 15.0)
    q = np.clip(np.rint((g - lo[..., None]) / s[..., None]), 0, 15).astype(np.uint8)
    return QuantTensor(fmt, q.reshape(n, k), s, lo.astype(np.float32))


def _f16(s: np.ndarray) -> np.ndarray:
    s = s.astype(np.float16).astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0))  # all-equal groups: any scale reproduces them


def rtn_spec(mode: str, k: int) -> QuantSpec | None:
    """The format ``--quant q4|q8`` gives a linear with ``k`` input columns (None: stays dense)."""
    if mode == "q4":
        for g in (128, 64, 32):
            if k % g == 0:
                return QuantSpec(QuantFormat(4, g, sym=False))
        return None
    if mode == "q8":
        return QuantSpec(QuantFormat(8, 32, sym=True)) if k % 32 == 0 else None
    return None


# ---------------------------------------------------------------- GGUF blocks

# GGUF type -> the kernel format its blocks become. 5-bit values are held in 8 bits (Q5_0 less its 16).
# K-quants (super-blocks of 256 weights with 4-, 6- or 8-bit sub-block scales) keep their integers: Q4_K as
# 4-bit asymmetric groups of 32, Q5_K as 8-bit asymmetric groups of 32, Q6_K's 6-bit values as 8-bit
# symmetric groups of 16, and Q2_K's and Q3_K's 2- and 3-bit values as 4-bit groups of 16 (asymmetric;
# symmetric, a negative scale's sign folded into the values). (llama.cpp stores a matrix whose rows are not
# whole super-blocks as Q5_0, Q5_1 or Q8_0.) IQ4_NL and IQ4_XS index a 16-entry table of 8-bit values
# (``IQ4_VALUES``). The lattice types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) index grids of 4
# or 8 small integers, signed by sign bits (IQ1: shifted by +-1/8): the signed grid values (IQ1: 8 g +- 1),
# in groups of their sub-block scales (16 or 32 weights), ``_iq_lattice``. Where a type's values number 16
# or fewer (IQ4, IQ3_XXS, IQ2, IQ1), the integers are 4-bit codes of the type's value table
# (``VALUE_TABLES``), which the CPU's integer-dot kernel looks up. IQ3_S's values, the odd +-1..15, are
# affine in 4 bits: 4-bit asymmetric groups of 32. So are the ternary types' (TQ1_0: base-3 digits, five a
# byte; TQ2_0: 2-bit fields), d x (q - 1) with one d per 256 weights: ``_ternary``. Only CPU targets with
# integer dot products read tables and 4-bit groups of 16 (``QuantFormat.int_dot_only``); the other targets
# and the embedding gathers get the same integers (a table's values) in 8 bits (``QuantTensor.as_format``,
# ``compile.kernel_layouts``).
GGUF_FORMATS = {"Q4_0": QuantFormat(4, 32, True), "Q4_1": QuantFormat(4, 32, False), "Q8_0": QuantFormat(8, 32, True),
                "Q5_0": QuantFormat(8, 32, True), "Q5_1": QuantFormat(8, 32, False),
                "Q4_K": QuantFormat(4, 32, False), "Q5_K": QuantFormat(8, 32, False), "Q6_K": QuantFormat(8, 16, True),
                "Q2_K": QuantFormat(4, 16, False), "Q3_K": QuantFormat(4, 16, True),
                "IQ3_S": QuantFormat(4, 32, False), "TQ1_0": QuantFormat(4, 32, False),
                "TQ2_0": QuantFormat(4, 32, False)}
_GGUF_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q5_0": (32, 22), "Q5_1": (32, 24),
                "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
                "Q2_K": (256, 84), "Q3_K": (256, 110),
                "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
                "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74),
                "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110),
                "TQ1_0": (256, 54), "TQ2_0": (256, 66)}  # (weights, bytes) per block
_IQ_LATTICE = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")
# sub-block scales: integer x float16 d
_K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "TQ1_0", "TQ2_0") + _IQ_LATTICE
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


# the 16 values (ascending; zeros past the last) that a type's 4-bit codes stand for: IQ4's table, the signed
# grid magnitudes of IQ3_XXS (8) and the IQ2 types (3), IQ1's 8 g +- 1 (g in -1, 0, 1)
_IQ2_VALUES = (-43, -25, -8, 8, 25, 43) + (0,) * 10
_IQ1_VALUES = (-9, -7, -1, 1, 7, 9) + (0,) * 10
VALUE_TABLES = {"IQ4_NL": tuple(int(v) for v in IQ4_VALUES), "IQ4_XS": tuple(int(v) for v in IQ4_VALUES),
                "IQ3_XXS": (-62, -52, -44, -36, -28, -20, -12, -4, 4, 12, 20, 28, 36, 44, 52, 62),
                "IQ2_XXS": _IQ2_VALUES, "IQ2_XS": _IQ2_VALUES, "IQ2_S": _IQ2_VALUES,
                "IQ1_S": _IQ1_VALUES, "IQ1_M": _IQ1_VALUES}
GGUF_FORMATS.update({t: QuantFormat(4, 16 if t in ("IQ2_XS", "IQ2_S", "IQ1_M") else 32, True, table)
                     for t, table in VALUE_TABLES.items()})


def _codes(table: tuple[int, ...], values: np.ndarray) -> np.ndarray:
    """uint8 codes (the first index in ``table``) of integer ``values``, each of which is in the table."""
    index = np.full(256, 255, np.uint8)
    index[np.asarray(table[::-1], np.int16) + 128] = np.arange(len(table) - 1, -1, -1, dtype=np.uint8)
    codes = index[np.asarray(values, np.int16) + 128]
    assert (codes < 16).all(), "a value outside the type's table"
    return codes


def from_gguf(type_name: str, data: np.ndarray, shape: tuple[int, int]) -> QuantTensor:
    """Raw GGUF blocks (``uint8 [rows, row_bytes]``) of a ``[N, K]`` tensor → QuantTensor.

    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL convert exactly. A K-quant (or IQ4_XS) sub-block's scale is a float16
    super-block scale times a 4-bit (Q2_K), 6-bit (Q3_K, Q4_K, Q5_K, IQ4_XS) or 8-bit (Q6_K) integer; our
    kernels read float16 scales, so the product is rounded to float16 (relative error at most 2**-11), which
    moves a weight by at most 2**-11 times its integer (3, 4, 15, 31, 32 or 127) quantization steps: 0.1-6%
    of one step (IQ4_XS's and the lattice types' steps are uneven; a weight moves by at most 2**-11 of
    itself). Mins are kept exactly (float32)."""
    n, k = shape
    per, size = _GGUF_BLOCKS[type_name]
    blocks = np.asarray(data, dtype=np.uint8).reshape(n, k // per, size)
    fmt = GGUF_FORMATS[type_name]
    if type_name in _K_QUANTS:
        q, scales, mins = _k_quant(type_name, blocks)
        if fmt.table:  # codes; a scale keeps its sign (IQ4_XS's may be negative)
            q = _codes(fmt.table, q)
        elif mins is None:  # Q3_K, Q6_K: a negative scale is folded into its group's values, whose negations
            # fit (within [-4, 4]: 4 bits with the zero point 8, or [-32, 32])
            q = np.where(np.repeat(scales < 0, fmt.group_size, axis=-1), -q.astype(np.int16), q)
            scales = np.abs(scales)
            if fmt.bits == 4:
                q = q + fmt.zero_point
        scales16 = scales.astype(np.float16)
        if not np.isfinite(scales16).all():
            raise SourceError(f"{type_name} sub-block scales beyond float16's range; compile with --quant none")
        q = q.astype(np.uint8 if fmt.bits == 4 else np.int8)  # nibbles, or signed bytes
        return QuantTensor(fmt, q.reshape(n, k), scales16.astype(np.float32).reshape(n, -1),
                           None if mins is None else mins.reshape(n, -1))
    d = _f16_at(blocks, 0).astype(np.float32)
    if type_name == "IQ4_NL":  # d, then 16 bytes of table indices in Q4_0's nibble order
        return QuantTensor(fmt, unpack_int4(blocks[..., 2:].reshape(n, k // 2)), d, None)
    if type_name == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
        return QuantTensor(fmt, q, d, None)
    if type_name in ("Q5_0", "Q5_1"):  # d, [m,] 32 fifth bits (a little-endian word), 16 bytes of nibbles
        at = 2 if type_name == "Q5_0" else 4
        # bit j of the little-endian word (bit j % 8 of its byte j // 8) is bit 4 of weight j
        high = np.unpackbits(blocks[..., at:at + 4], axis=-1, bitorder="little")
        low = unpack_int4(blocks[..., at + 4:].reshape(n, k // 2)).reshape(n, k // 32, 32)
        q = low.astype(np.int16) | (high.astype(np.int16) << 4)
        if type_name == "Q5_0":
            return QuantTensor(fmt, (q - 16).astype(np.int8).reshape(n, k), d, None)
        m = _f16_at(blocks, 2).astype(np.float32)
        return QuantTensor(fmt, q.astype(np.int8).reshape(n, k), d, m)
    if type_name == "Q4_1":
        m = _f16_at(blocks, 2).astype(np.float32)
        return QuantTensor(fmt, unpack_int4(blocks[..., 4:].reshape(n, k // 2)), d, m)
    return QuantTensor(fmt, unpack_int4(blocks[..., 2:].reshape(n, k // 2)), d, None)


def _f16_at(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of each block, as float64 (exact)."""
    return _words(blocks, at, at + 2, "<f2")[..., 0].astype(np.float64)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K super-blocks from their 12 bytes (``[..., 12]``): bytes
    0-3 hold scales 0-3 in their low 6 bits, 4-7 mins 0-3; their top 2 bits are bits 4-5 of scales 4-7 and
    mins 4-7, whose low 4 bits are bytes 8-11's low (scales) and high (mins) nibbles."""
    lo_s, lo_m, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([lo_s & 63, (rest & 15) | ((lo_s >> 6) << 4)], axis=-1)
    mins = np.concatenate([lo_m & 63, (rest >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return scales.astype(np.float64), mins.astype(np.float64)


def _k_quant(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(q[..., 256] integers, scales[..., groups] float64, mins[..., groups] float32 | None)`` of K-quant (and
    IQ4_XS) super-blocks ``[..., bytes]``: weight ``i`` is ``scales[i // G] * q[i] + mins[i // G]``; without
    mins a scale may be negative (``from_gguf`` folds it into the values)."""
    lead = blocks.shape[:-1]
    if type_name in ("Q2_K", "Q3_K"):
        return _low_bit_k_quant(type_name, blocks)
    if type_name == "IQ3_S":  # its values, +-1..15 odd, are 2 q - 15 (q in 0..15): 4-bit, scale 2S, min -15 S
        v, sc, _ = _iq_lattice(type_name, blocks)
        return (v + 15) // 2, 2 * sc, (-15 * sc).astype(np.float32)  # exact: 11 x 5 significant bits
    if type_name in _IQ_LATTICE:
        return _iq_lattice(type_name, blocks)
    if type_name in ("TQ1_0", "TQ2_0"):
        return _ternary(type_name, blocks)
    if type_name == "IQ4_XS":
        # d, a 16-bit word of scales' high bit pairs (bits 2i, 2i + 1: scale i's bits 4-5), 4 bytes of their
        # low nibbles (scale i: byte i // 2, low nibble for even i), then 8 sub-blocks of 32 weights as
        # IQ4_NL's nibbles; a scale is its 6 bits less 32
        high = (_words(blocks, 2, 4, "<u2") >> (2 * np.arange(8, dtype=np.uint16))) & 3
        sc = (_nibbles(blocks[..., 4:8]) | (high << 4)).astype(np.float64) - 32
        q = IQ4_VALUES[unpack_int4(blocks[..., 8:].reshape(-1, 128)).reshape(*lead, 256)]
        return q, sc * _f16_at(blocks, 0)[..., None], None
    if type_name == "Q6_K":
        # ql: 2 halves of 128 weights, each 64 bytes: weights 32j + l (j = 0..3, l = 0..31) take the low
        # nibble of byte l (j = 0) or l + 32 (j = 1), the high nibble of the same (j = 2, 3), and bits 2j, 2j+1
        # of qh byte l as bits 4-5; the 6-bit value less 32. 16 int8 scales (groups of 16), the float16 d last
        ql = blocks[..., 0:128].reshape(*lead, 2, 2, 32)
        low = np.concatenate([ql & 15, ql >> 4], axis=-2).reshape(*lead, 256)
        q = (low | (_crumbs(blocks[..., 128:192]) << 4)).astype(np.int16) - 32
        return q, blocks[..., 192:208].copy().view(np.int8).astype(np.float64) * _f16_at(blocks, 208)[..., None], None
    # Q4_K / Q5_K: d, dmin (float16), 12 bytes of scales and mins, [Q5_K: 32 bytes of fifth bits], 128 bytes
    # of nibbles: byte l of chunk c (32 bytes) holds weight 64c + l (low nibble) and 64c + 32 + l (high)
    sc, mn = _k_scales_mins(blocks[..., 4:16])
    nib = blocks[..., -128:].reshape(*lead, 4, 1, 32)
    q = np.concatenate([nib & 15, nib >> 4], axis=-2).reshape(*lead, 8, 32)
    if type_name == "Q5_K":  # fifth bits: bit g of byte l is weight 32g + l's
        q = q | (_bit_planes(blocks[..., 16:48]).reshape(*lead, 8, 32) << 4)
    scales = _f16_at(blocks, 0)[..., None] * sc
    mins = (-_f16_at(blocks, 2)[..., None] * mn).astype(np.float32)  # exact: 11 x 6 significant bits
    return q.reshape(*lead, 256), scales, mins


def _bit_planes(packed: np.ndarray) -> np.ndarray:
    """``[..., 256]`` bits of 32 bytes (``[..., 32]``): weight ``32b + l`` is bit ``b`` of byte ``l`` (Q3_K's
    high bits, Q5_K's fifth bits)."""
    return np.unpackbits(packed[..., None, :], axis=-2, count=8, bitorder="little").reshape(*packed.shape[:-1], 256)


def _crumbs(packed: np.ndarray) -> np.ndarray:
    """``[..., 256]`` 2-bit fields of 64 bytes (``[..., 64]``; Q2_K's and Q3_K's values, Q6_K's high bits): 2
    halves of 128 weights, each 32 bytes; weight ``32j + l`` of a half (j = 0..3) is bits ``2j, 2j + 1`` of
    its byte ``l``."""
    halves = packed.reshape(*packed.shape[:-1], 2, 1, 32)
    return ((halves >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(*packed.shape[:-1], 256)


def _low_bit_k_quant(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``_k_quant`` of Q2_K and Q3_K super-blocks (16 groups of 16 weights)."""
    lead = blocks.shape[:-1]
    if type_name == "Q2_K":
        # 16 bytes of (scale, min) nibbles, 64 bytes of 2-bit values, float16 d and dmin: d sc q - dmin m
        sc, mn = blocks[..., 0:16] & 15, blocks[..., 0:16] >> 4
        scales = _f16_at(blocks, 80)[..., None] * sc
        mins = (-_f16_at(blocks, 82)[..., None] * mn).astype(np.float32)  # exact: 11 x 4 significant bits
        return _crumbs(blocks[..., 16:80]), scales, mins
    # Q3_K: 32 bytes of high bits (bit b of byte l: weight 32b + l), 64 bytes of 2-bit values, 12
    # bytes of 6-bit scales, float16 d. The value is the 2 bits less 4 where its high bit is clear; a scale's
    # low nibble is byte i (i < 8) or byte i - 8's high nibble, its bits 4-5 bits 2(i // 4) of byte 8 + i % 4
    q = _crumbs(blocks[..., 32:96]).astype(np.int16) - 4 * (1 - _bit_planes(blocks[..., 0:32]).astype(np.int16))
    packed = blocks[..., 96:108]
    low = np.concatenate([packed[..., 0:8] & 15, packed[..., 0:8] >> 4], axis=-1)
    high = (packed[..., None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    sc = (low | (high.reshape(*lead, 16) << 4)).astype(np.float64) - 32
    return q, sc * _f16_at(blocks, 108)[..., None], None


def _lattice_grid(type_name: str) -> np.ndarray:
    """``int8 [entries, 4 or 8]``: a lattice type's grid, from the ``gguf`` package's tables (llama.cpp's)."""
    import gguf.quants

    cls = getattr(gguf.quants, "IQ1_S" if type_name == "IQ1_M" else type_name)
    cls.init_grid()
    return cls.grid.reshape(cls.grid_shape).astype(np.int8)  # small integers, held as float32 there


def _signs(packed: np.ndarray) -> np.ndarray:
    """``int8 [..., 8n]`` of ``uint8 [..., n]``: -1 where bit ``j`` of byte ``i`` is set (value ``8i + j``), else 1."""
    return 1 - 2 * np.unpackbits(packed, axis=-1, bitorder="little").astype(np.int8)


# a 7-bit sign index -> 8 sign bits: the eighth makes the count of negatives even
_KSIGNS = np.array([i | (bin(i).count("1") & 1) << 7 for i in range(128)], dtype=np.uint8)


def _words(blocks: np.ndarray, start: int, stop: int, dtype: str) -> np.ndarray:
    """Bytes ``start:stop`` of each block as little-endian ``dtype`` words."""
    return np.ascontiguousarray(blocks[..., start:stop]).view(dtype)


def _iq_lattice(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """``_k_quant`` of the lattice types' super-blocks (256 weights): grid entries of 8 (IQ1, IQ2) or 4 (IQ3)
    values, each value signed by its own sign bit (IQ2_S, IQ3_S) or by one of 128 even-parity patterns per 8
    values (IQ2_XXS, IQ2_XS, IQ3_XXS); IQ1's values are ``g +- 1/8`` for the integer ``8 g +- 1``. A scale is
    ``d (2 s + 1)`` over 8 (IQ1, IQ2), 4 (IQ3_XXS) or 1 (IQ3_S), ``s`` a 3- or 4-bit integer."""
    lead = blocks.shape[:-1]
    grid = _lattice_grid(type_name)

    def values(idx: np.ndarray) -> np.ndarray:  # grid entries -> [..., 256]
        return grid[idx].reshape(*lead, 256).astype(np.int16)

    def patterns(aux: np.ndarray) -> np.ndarray:  # words of 4 x 7-bit sign indices -> [..., 256] signs
        return _signs(_KSIGNS[(aux[..., None] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 127]).reshape(*lead, 256)

    if type_name == "IQ1_M":  # its float16 d is the top nibbles of the four scale words, lowest first
        sc = _words(blocks, 48, 56, "<u2")
        bits = (sc[..., 0] >> 12) | ((sc[..., 1] >> 8) & 0xF0) | ((sc[..., 2] >> 4) & 0xF00) | (sc[..., 3] & 0xF000)
        d = bits.astype(np.uint16).view(np.float16).astype(np.float64)
    else:
        d = _f16_at(blocks, 0)
    if type_name == "IQ2_XXS":  # per 32 weights: 4 grid index bytes, a word of 4 sign indices and s
        sub = blocks[..., 2:].reshape(*lead, 8, 8)
        aux = _words(sub, 4, 8, "<u4")[..., 0]
        q = values(sub[..., 0:4]) * patterns(aux)
        s, div = aux >> 28, 8
    elif type_name == "IQ2_XS":  # 32 words: a 9-bit grid index, a 7-bit sign index; 8 bytes of s nibbles
        words = _words(blocks, 2, 66, "<u2")
        q = values(words & 511) * _signs(_KSIGNS[words >> 9]).reshape(*lead, 256)
        s, div = _nibbles(blocks[..., 66:74]), 8
    elif type_name == "IQ2_S":  # 32 low index bytes, 32 bytes of sign bits, 8 bytes of high index bit pairs
        high = (blocks[..., 66:74, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
        q = values(blocks[..., 2:34].astype(np.int32) | high.reshape(*lead, 32).astype(np.int32) << 8)
        q = q * _signs(blocks[..., 34:66])
        s, div = _nibbles(blocks[..., 74:82]), 8
    elif type_name == "IQ3_XXS":  # 64 grid index bytes; per 32 weights a word of 4 sign indices and s
        aux = _words(blocks, 66, 98, "<u4")
        q = values(blocks[..., 2:66]) * patterns(aux)
        s, div = aux >> 28, 4
    elif type_name == "IQ3_S":  # 64 low index bytes, 8 bytes of ninth bits, 32 bytes of sign bits, s nibbles
        ninth = np.unpackbits(blocks[..., 66:74], axis=-1, bitorder="little").astype(np.int32)
        q = values(blocks[..., 2:66].astype(np.int32) | ninth << 8) * _signs(blocks[..., 74:106])
        s, div = _nibbles(blocks[..., 106:110]), 1
    elif type_name == "IQ1_S":  # 32 low index bytes; per 32 weights a word: 4 x 3 high index bits, s, delta
        qh = _words(blocks, 34, 50, "<u2")
        high = (qh[..., None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7
        q = 8 * values(blocks[..., 2:34].astype(np.int32) | high.reshape(*lead, 32).astype(np.int32) << 8)
        q = q + np.repeat(np.where(qh & 0x8000, -1, 1), 32, axis=-1)
        s, div = (qh >> 12) & 7, 8
    else:  # IQ1_M: 32 low index bytes, 16 bytes of (3 high index bits, delta) nibbles, 3-bit s per 16 weights
        nib = _nibbles(blocks[..., 32:48])
        q = 8 * values(blocks[..., 0:32].astype(np.int32) | (nib & 7).astype(np.int32) << 8)
        q = q + np.repeat(np.where(nib & 8, -1, 1), 8, axis=-1)
        s, div = (sc[..., None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7, 8
    scales = d[..., None] * (2 * s.reshape(*lead, -1).astype(np.float64) + 1) / div
    return q, scales, None


def _ternary(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_k_quant`` of TQ1_0/TQ2_0 super-blocks: weight ``d (q - 1)``, one float16 ``d`` (the last 2 bytes)
    per 256 weights, as 4-bit groups of 32 with scale ``d`` and min ``-d`` (both exact). TQ2_0: 64 bytes of
    2-bit fields in ``_crumbs``' order (q 0..3). TQ1_0: 48 bytes of five base-3 digits, then 4 of four:
    digit ``k`` of byte ``b`` is the top of ``3 (b 3^k mod 256)`` over 256 (llama.cpp's fixed-point
    packing); digit-major within each run of bytes (32, 16, then 4)."""
    lead = blocks.shape[:-1]
    d = _f16_at(blocks, blocks.shape[-1] - 2)
    if type_name == "TQ2_0":
        q = _crumbs(blocks[..., 0:64])
    else:
        runs = [(blocks[..., 0:32], 5), (blocks[..., 32:48], 5), (blocks[..., 48:52], 4)]
        q = np.concatenate([(((b[..., None, :] * (3 ** np.arange(n, dtype=np.uint8))[:, None]).astype(np.uint8)
                              .astype(np.uint16) * 3) >> 8).reshape(*lead, -1) for b, n in runs], axis=-1)
    scales = np.repeat(d[..., None], 8, axis=-1)
    return q.astype(np.int16), scales, (-scales).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """``[..., 2n]`` nibbles of ``[..., n]`` bytes, each byte's low nibble first."""
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


# ---------------------------------------------------------------- GPTQ

@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group per output channel
    desc_act: bool
    sym: bool
    v1_zeros: bool  # AutoGPTQ "gptq" format stores zero - 1

    @classmethod
    def from_hf(cls, qc: dict, where: str) -> "GPTQConfig":
        bits = int(qc.get("bits", 4))
        if bits not in (4, 8):
            raise SourceError(f"{where}: GPTQ with {bits} bits is not supported; 4 and 8 are")
        fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq")))
        if fmt not in ("gptq", "gptq_v2"):
            raise SourceError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        return cls(bits, int(qc.get("group_size", 128)), bool(qc.get("desc_act", False)),
                   bool(qc.get("sym", True)), fmt == "gptq")

    def spec(self, k: int) -> QuantSpec:
        g = k if self.group_size in (-1, 0) else self.group_size
        return QuantSpec(QuantFormat(self.bits, g, self.sym), act_order=self.desc_act)


def _unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """GPTQ packs ``32 / bits`` values per int32, lowest bits first, along ``axis``."""
    per = 32 // bits
    p = packed.astype(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    vals = (np.expand_dims(p, axis + 1) >> np.expand_dims(shifts, tuple(i for i in range(p.ndim + 1) if i != axis + 1))) & ((1 << bits) - 1)
    shape = list(p.shape)
    shape[axis] *= per
    return vals.reshape(shape).astype(np.int32)


def from_gptq(cfg: GPTQConfig, name: str, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
              g_idx: np.ndarray | None) -> QuantTensor:
    """GPTQ tensors of one linear (``qweight [K/pack, N]``, ``qzeros [groups, N/pack]``, ``scales
    [groups, N]``, ``g_idx [K]``) → QuantTensor."""
    q = _unpack_int32(qweight, cfg.bits, axis=0).T  # [N, K]
    n, k = q.shape
    z = _unpack_int32(qzeros, cfg.bits, axis=1)[:, :n] + (1 if cfg.v1_zeros else 0)  # [groups, N]
    s = scales.astype(np.float32)  # [groups, N]
    groups = s.shape[0]
    g = k // groups
    spec = cfg.spec(k)
    if spec.fmt.group_size != g:
        raise SourceError(f"{name}: {groups} scale groups for {k} columns, but group_size is {cfg.group_size}")
    perm = None
    if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // g):
        perm = np.argsort(g_idx, kind="stable").astype(np.int32)
        if not np.array_equal(g_idx[perm], np.arange(k) // g):
            raise SourceError(f"{name}: g_idx does not assign exactly {g} columns to each group; "
                              "this act-order layout is not supported")
        q = q[:, perm]
    mid = 1 << (cfg.bits - 1)
    fmt = QuantFormat(cfg.bits, g, sym=bool(np.all(z == mid)))
    if fmt.sym:
        qq = q.astype(np.uint8) if cfg.bits == 4 else (q - 128).astype(np.int8)
        return QuantTensor(fmt, qq, s.T.copy(), None, perm)
    if cfg.bits == 4:
        return QuantTensor(fmt, q.astype(np.uint8), s.T.copy(), (-s * z).T.astype(np.float32), perm)
    return QuantTensor(fmt, (q - 128).astype(np.int8), s.T.copy(), (s * (128 - z)).T.astype(np.float32), perm)

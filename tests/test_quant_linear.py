"""The INT4/INT8 group-affine kernels vs numpy, and every source format's conversion to it: GGUF blocks
(made by the ``gguf`` package), round-to-nearest, GPTQ tensors (made by tests/gptq.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from ferrum.schedules.quant_linear import (QuantFormat, activation_error_bound, deinterleave_r16, dequantize_ref,
                                           r16_supports,
                                           interleave_r16, make_qlinear_cpu, make_qlinear_r16_cpu, pack_int4,
                                           qlinear_ref, quantize_activations_ref, unpack_int4)
from ferrum_runtime.artifact import host_cpu_flags
from ferrum_compiler.quant import VALUE_TABLES, GPTQConfig, _lattice_grid, from_gguf, from_gptq, quantize_rtn

from .gptq import gptq_pack

FORMATS = [QuantFormat(4, 32, True), QuantFormat(4, 32, False), QuantFormat(4, 64, False), QuantFormat(4, 128, True),
           QuantFormat(8, 16, True), QuantFormat(8, 32, True), QuantFormat(8, 32, False), QuantFormat(8, 64, False)]
# 4-bit codes of a value table (GGUF's IQ types) and 4-bit groups of 16 (Q2_K, Q3_K): the r16 kernel's alone
R16_ONLY = [QuantFormat(4, 32, True, VALUE_TABLES["IQ4_XS"]), QuantFormat(4, 64, True, VALUE_TABLES["IQ2_XXS"]),
            QuantFormat(4, 16, True, VALUE_TABLES["IQ2_XS"]), QuantFormat(4, 16, True), QuantFormat(4, 16, False)]


def _random_packed(rng, fmt: QuantFormat, n: int, k: int):
    if fmt.bits == 4:
        qw = pack_int4(rng.integers(0, 16, (n, k)))
    else:
        qw = rng.integers(-128, 128, (n, k)).astype(np.int8)
    s = (rng.random((n, k // fmt.group_size)) * 0.1 + 1e-3).astype(np.float16)
    if fmt.table:  # IQ4_XS's scales may be negative
        s = s * rng.choice(np.array([-1, 1], np.float16), s.shape)
    m = None if fmt.sym else rng.standard_normal((n, k // fmt.group_size)).astype(np.float32)
    return qw, s, m


@pytest.mark.kernel
@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(FORMATS), groups=st.integers(1, 4), n=st.integers(1, 40), t=st.sampled_from([1, 2, 3, 4, 7]),
       bias=st.booleans(), seed=st.integers(0, 10_000))
def test_qlinear_cpu_matches_numpy(fmt, groups, n, t, bias, seed):
    """Decode (t < 4: packed GEMV) and prefill (t >= 4: dequantized tile), odd row counts, bias."""
    import tvm

    k = fmt.group_size * groups
    rng = np.random.default_rng(seed)
    qw, s, m = _random_packed(rng, fmt, n, k)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((t, k)).astype(np.float32)
    f = make_qlinear_cpu(k, n, fmt, "float32", "float32", "float32" if bias else None)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target={"kind": "llvm"})
    out = tvm.runtime.tensor(np.zeros((t, n), np.float32))
    lib(*[tvm.runtime.tensor(a) for a in [x, qw, s] + ([m] if m is not None else []) + ([b] if bias else [])], out)
    ref = qlinear_ref(x, fmt, qw, s, m, b if bias else None, "float64")
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# (ISA, LLVM CPU that enables it, host flag that runs it)
R16_ISAS = [("avx512_vnni", "znver4", "avx512_vnni"), ("avx2", "haswell", "avx2")]


@pytest.mark.kernel
@pytest.mark.parametrize("isa,mcpu,flag", R16_ISAS, ids=[i[0] for i in R16_ISAS])
@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(FORMATS + R16_ONLY), groups=st.integers(1, 4), n=st.integers(1, 40),
       t=st.sampled_from([1, 2, 3, 4, 6, 9]), bias=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       act_bits=st.sampled_from([8, 16]), seed=st.integers(0, 10_000))
@example(fmt=R16_ONLY[0], groups=3, n=37, t=6, bias=True, scale=1.0, act_bits=16, seed=1)
@example(fmt=R16_ONLY[1], groups=2, n=17, t=1, bias=False, scale=300.0, act_bits=8, seed=2)
@example(fmt=R16_ONLY[2], groups=4, n=20, t=9, bias=False, scale=1.0, act_bits=16, seed=3)
@example(fmt=R16_ONLY[4], groups=2, n=33, t=1, bias=True, scale=1e-3, act_bits=8, seed=4)
def test_qlinear_r16_matches_numpy(isa, mcpu, flag, fmt, groups, n, t, bias, scale, act_bits, seed):
    """The integer-dot kernel (both ISAs, every format, value tables and 4-bit groups of 16 too; int8 and
    tables on AVX2 through 16-bit products) vs the exact float64 product: within the proven bound of
    rounding activations to 8 or 16 bits per group (the kernel computes W x^ exactly), plus float32
    rounding. Decode (t < 4) and prefill
    (t >= 4, 4-token blocks with a ragged tail), rows that leave a partial 16-row block, bias, a zero
    activation group, and activations of very different magnitudes."""
    import tvm

    if flag not in host_cpu_flags():
        pytest.skip(f"this CPU has no {flag}")
    assume(r16_supports(fmt, act_bits, isa))
    k = fmt.group_size * groups
    assume(fmt.check(k) is None)  # 4-bit groups of 16: whole 32-column blocks
    rng = np.random.default_rng(seed)
    qw, s, m = _random_packed(rng, fmt, n, k)
    packed = interleave_r16({"qweight": qw, "scales": s, **({"mins": m} if m is not None else {})})
    b = rng.standard_normal(n).astype(np.float32)
    x = (rng.standard_normal((t, k)) * scale).astype(np.float32)
    x[0, :fmt.group_size] = 0  # amax = 0: the group contributes nothing and divides by nothing
    f = make_qlinear_r16_cpu(k, n, fmt, "float32", "float32", "float32" if bias else None, isa, act_bits)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target={"kind": "llvm", "mcpu": mcpu})
    out = tvm.runtime.tensor(np.zeros((t, n), np.float32))
    lib(*[tvm.runtime.tensor(a) for a in [x, packed["qweight"], packed["scales"]] + ([packed["mins"]] if m is not None else [])
          + ([b] if bias else [])], out)
    ref = qlinear_ref(x, fmt, qw, s, m, b if bias else None, "float64")
    w = dequantize_ref(fmt, qw, s, m)
    bound = activation_error_bound(x, fmt, w, act_bits) + 1e-5 * (np.abs(x) @ np.abs(w).T + (np.abs(b) if bias else 0)) + 1e-6
    err = np.abs(out.numpy() - ref)
    assert np.all(err <= bound), f"worst error {err.max():.3g}, bound there {bound.flat[np.argmax(err / bound)]:.3g}"


@pytest.mark.kernel
@pytest.mark.parametrize("fmt", [QuantFormat(8, 32, False), QuantFormat(8, 16, True), QuantFormat(4, 32, True),
                                 QuantFormat(4, 64, False), R16_ONLY[0], R16_ONLY[2], R16_ONLY[4]],
                         ids=["q5_1", "q6_k", "q4_0", "int4-g64", "iq4_xs", "iq2_xs", "q2_k"])
def test_avx2_prefill_takes_float_tiles(fmt):
    """From _AVX2_TILE_MIN_TOKENS tokens on, AVX2 weights are dequantized from the r16 layout into float
    tiles (no rounded activations): float32 accuracy, bias, a ragged last token block and row block."""
    import tvm

    from ferrum.schedules.quant_linear import _AVX2_TILE_MIN_TOKENS

    if "avx2" not in host_cpu_flags():
        pytest.skip("this CPU has no avx2")
    rng = np.random.default_rng(4)
    n, k, t = 37, 128, _AVX2_TILE_MIN_TOKENS + 3
    qw, s, m = _random_packed(rng, fmt, n, k)
    packed = interleave_r16({"qweight": qw, "scales": s, **({"mins": m} if m is not None else {})})
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((t, k)).astype(np.float32)
    f = make_qlinear_r16_cpu(k, n, fmt, "float32", "float32", "float32", "avx2", 16)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target={"kind": "llvm", "mcpu": "haswell"})
    out = tvm.runtime.tensor(np.zeros((t, n), np.float32))
    args = [x, packed["qweight"], packed["scales"]] + ([packed["mins"]] if m is not None else []) + [b]
    lib(*[tvm.runtime.tensor(a) for a in args], out)
    ref = qlinear_ref(x, fmt, qw, s, m, b, "float64")
    w = dequantize_ref(fmt, qw, s, m)
    assert np.all(np.abs(out.numpy() - ref) <= 1e-5 * (np.abs(x) @ np.abs(w).T + np.abs(b)) + 1e-6)


@pytest.mark.unit
def test_r16_layout_round_trips_and_quantized_activations_are_8_or_16_bit():
    rng = np.random.default_rng(1)
    for n in (1, 16, 37):
        qw, s, m = _random_packed(rng, QuantFormat(4, 64, False), n, 128)
        packed = {"qweight": qw, "scales": s, "mins": m}
        r16 = interleave_r16(packed)
        assert r16["qweight"].shape == (-(-n // 16), 128 * 8) and r16["scales"].shape == (-(-n // 16), 2 * 16)
        back = deinterleave_r16(r16, n)
        assert all(np.array_equal(back[key], packed[key]) for key in packed)
        q8, s8, _ = _random_packed(rng, QuantFormat(8, 32, True), n, 64)
        r16 = interleave_r16({"qweight": q8, "scales": s8})
        assert r16["qweight"].shape == (-(-n // 16), 64 * 16) and r16["qweight"].dtype == np.uint8
        u = (q8.astype(np.int16) + 128).astype(np.uint8)  # chunk c: columns 4c..4c+3 of the 16 rows in turn
        assert np.array_equal(r16["qweight"][0, 64:68], u[0, 4:8]) and np.array_equal(r16["qweight"][0, 0:4], u[0, :4])
        assert np.array_equal(deinterleave_r16(r16, n, bits=8)["qweight"], q8)
    # one 64-byte chunk: row r's 4 bytes are bytes 4c..4c+3 of its row-layout 32-column block
    qw = pack_int4(rng.integers(0, 16, (16, 32)))
    chunk = interleave_r16({"qweight": qw, "scales": np.ones((16, 1), np.float16)})["qweight"][0, 64:128]
    assert np.array_equal(chunk.reshape(16, 4), qw[:, 4:8])
    x = rng.standard_normal((3, 64)).astype(np.float32) * 50
    for bits in (8, 16):
        q, dx = quantize_activations_ref(x, 32, bits)
        assert np.abs(q).max() == 2 ** (bits - 1) - 1
        assert np.all(np.abs(x - q * np.repeat(dx, 32, axis=1)) <= np.repeat(dx, 32, axis=1) / 2 + 1e-6)


@pytest.mark.unit
def test_int4_packing_round_trips():
    q = np.random.default_rng(0).integers(0, 16, (3, 96)).astype(np.uint8)
    assert np.array_equal(unpack_int4(pack_int4(q)), q)
    assert pack_int4(q)[0, 0] == q[0, 0] | (q[0, 16] << 4)  # GGUF's nibble order


@pytest.mark.unit
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_blocks_dequantize_like_gguf(type_name):
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    w = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32)
    data = gguf.quants.quantize(w, qtype)
    qt = from_gguf(type_name, data, w.shape)
    expect = gguf.quants.dequantize(data, qtype).reshape(w.shape)
    np.testing.assert_allclose(qt.dequantize(), expect, rtol=0, atol=1e-6)
    packed = qt.pack()
    np.testing.assert_allclose(dequantize_ref(qt.fmt, packed["qweight"], packed["scales"], packed.get("mins")),
                               expect, rtol=0, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("type_name,fmt,most", [("Q4_K", QuantFormat(4, 32, False), 15),
                                                ("Q5_K", QuantFormat(8, 32, False), 31),
                                                ("Q6_K", QuantFormat(8, 16, True), 32),
                                                ("Q2_K", QuantFormat(4, 16, False), 3),
                                                ("Q3_K", QuantFormat(4, 16, True), 4),
                                                ("IQ4_XS", QuantFormat(4, 32, True, VALUE_TABLES["IQ4_XS"]), 127),
                                                ("IQ4_NL", QuantFormat(4, 32, True, VALUE_TABLES["IQ4_NL"]), 127),
                                                ("IQ1_S", QuantFormat(4, 32, True, VALUE_TABLES["IQ1_S"]), 9),
                                                ("IQ1_M", QuantFormat(4, 16, True, VALUE_TABLES["IQ1_M"]), 9),
                                                ("IQ2_XXS", QuantFormat(4, 32, True, VALUE_TABLES["IQ2_XXS"]), 43),
                                                ("IQ2_XS", QuantFormat(4, 16, True, VALUE_TABLES["IQ2_XS"]), 43),
                                                ("IQ2_S", QuantFormat(4, 16, True, VALUE_TABLES["IQ2_S"]), 43),
                                                ("IQ3_XXS", QuantFormat(4, 32, True, VALUE_TABLES["IQ3_XXS"]), 62),
                                                ("IQ3_S", QuantFormat(4, 32, False), 15),
                                                ("TQ1_0", QuantFormat(4, 32, False), 2),
                                                ("TQ2_0", QuantFormat(4, 32, False), 3)])
def test_k_quant_blocks_keep_their_integers(type_name, fmt, most):
    """K-quant and IQ super-blocks (random bytes: any are valid) become our group-affine form with the same
    integers (the lattice types': their signed grid values, IQ1's 8 g +- 1, IQ3_S's as 4-bit 2 q - 15; in groups
    of 32 as 4-bit codes of those values' table); a sub-block scale (float16 d times a small integer) is
    rounded to float16 for our kernels, so each weight may move by at most 2**-11 of its scale times its
    integer (``most``: the largest), while a wrong bit, nibble, grid index or sign would move weights by whole
    steps. Packing changes nothing further, nor does widening a table's codes to 8-bit values (a negative
    scale's sign moved into them) for the kernels without tables."""
    import gguf

    from .kquants import random_kquant

    rng = np.random.default_rng(7)
    n, k = 6, 512
    data = random_kquant(rng, type_name, n, k, 0.3)
    qt = from_gguf(type_name, data, (n, k))
    ints = fmt.levels(qt.q)
    assert qt.fmt == fmt and np.abs(ints).max() <= most
    expect = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(n, k).astype(np.float64)
    got = qt.dequantize().astype(np.float64)
    step = np.repeat(np.abs(qt.scales.astype(np.float64)), fmt.group_size, axis=1)
    q = np.abs(ints)
    assert np.all(np.abs(got - expect) <= q * step * 2.0 ** -11 + 1e-6 * np.abs(expect) + 1e-12)
    assert np.abs(expect).std() > 0.1  # weights around the scale asked for, not zeros
    packed = qt.pack()
    np.testing.assert_array_equal(dequantize_ref(fmt, packed["qweight"], packed["scales"], packed.get("mins")),
                                  qt.dequantize().astype(np.float64))
    if fmt.int_dot_only:
        wide = qt.as_format(fmt.widened(), "w")
        assert wide.fmt == QuantFormat(8, fmt.group_size, fmt.sym)
        assert wide.q.dtype == np.int8 and (wide.scales >= 0).all()
        np.testing.assert_array_equal(wide.dequantize(), qt.dequantize())


@pytest.mark.unit
def test_value_tables_hold_each_types_values():
    """A table is its type's signed values, ascending, then zeros: IQ4's 16, the signed grid magnitudes of
    IQ3_XXS and the IQ2 types (llama.cpp's grids, from the gguf package), IQ1's 8 g +- 1."""
    from ferrum_compiler.quant import IQ4_VALUES

    for name, table in VALUE_TABLES.items():
        if name.startswith("IQ4"):
            values = set(IQ4_VALUES.tolist())
        else:
            grid = set(np.unique(_lattice_grid(name)).astype(int).tolist())
            values = ({8 * g + d for g in grid for d in (-1, 1)} if name.startswith("IQ1")
                      else {v * sign for v in grid for sign in (-1, 1)})
        assert table == tuple(sorted(values)) + (0,) * (16 - len(values)), name
        assert QuantFormat(4, 16, True, table).check(32) is None


@pytest.mark.unit
@pytest.mark.parametrize("fmt", [QuantFormat(4, 128, False), QuantFormat(4, 32, False), QuantFormat(8, 32, True)])
def test_rtn_error_is_within_half_a_step(fmt):
    w = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)
    qt = quantize_rtn(w, fmt)
    step = np.repeat(qt.scales, fmt.group_size, axis=1)
    assert np.all(np.abs(qt.dequantize() - w) <= 0.5 * step + 1e-6)
    packed = qt.pack()
    np.testing.assert_allclose(dequantize_ref(fmt, packed["qweight"], packed["scales"], packed.get("mins")),
                               qt.dequantize(), atol=1e-6)


@pytest.mark.unit
@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64, -1]), desc_act=st.booleans(), sym=st.booleans(),
       v1=st.booleans(), seed=st.integers(0, 1000))
def test_gptq_tensors_convert_exactly(bits, group, desc_act, sym, v1, seed):
    """GPTQ qweight/qzeros/scales/g_idx (act-order or not, v1 zero offset or v2) → the same weights."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    cfg = GPTQConfig(bits, group, desc_act, sym, v1)
    tensors, w_deq = gptq_pack(w, cfg, rng)
    qt = from_gptq(cfg, "layer", tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"])
    np.testing.assert_allclose(qt.dequantize(), w_deq, rtol=0, atol=1e-6)
    assert (qt.perm is not None) == (desc_act and group != -1)  # one group: any order is the same
    assert qt.fmt.sym == sym


@pytest.mark.kernel
@pytest.mark.parametrize("fmt", [QuantFormat(8, 32, True), QuantFormat(8, 16, True), QuantFormat(8, 32, False)],
                         ids=["q8_0", "q6_k", "q5_1"])
def test_int8_table_in_r16_layout_gathers_the_same_rows(fmt):
    """A tied INT8 table in the r16 layout (the lm_head's integer-dot layout) gathers exactly the rows of
    the row-layout reference: symmetric, in groups of 16, with mins (one float32 rounding, as the
    reference's)."""
    import tvm
    from tvm import te

    from ferrum.schedules.quant_linear import qembedding_r16_te, qembedding_ref

    n, k = 37, 96
    qw, s, m = _random_packed(np.random.default_rng(3), fmt, n, k)
    r16 = interleave_r16({"qweight": qw, "scales": s, **({} if m is None else {"mins": m})})
    ids = np.array([0, 36, 17, 16, 15, 36], np.int32)
    tensors = [te.placeholder(r16["qweight"].shape, "uint8", "w"), te.placeholder(r16["scales"].shape, "float16", "s")]
    if m is not None:
        tensors.append(te.placeholder(r16["mins"].shape, "float32", "m"))
    tensors.append(te.placeholder(ids.shape, "int32", "ids"))
    out_t = qembedding_r16_te(fmt, "float32")(*tensors)
    lib = tvm.compile(te.create_prim_func([*tensors, out_t]), target={"kind": "llvm"})
    out = tvm.runtime.tensor(np.zeros((len(ids), k), np.float32))
    args = [r16["qweight"], r16["scales"]] + ([] if m is None else [r16["mins"]]) + [ids]
    lib(*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_array_equal(out.numpy(), qembedding_ref(fmt, qw, s, m, ids).astype(np.float32))

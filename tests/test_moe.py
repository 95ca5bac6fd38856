"""The MoE kernels (router top-k, dispatch by expert, grouped expert GEMM for dense/INT4/INT8 experts)
against their numpy references. Whole Qwen3-MoE models are checked against transformers in
test_model_parity (dense) and test_gptq (INT4 experts)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ferrum.schedules.moe import (dispatch_ref, make_grouped_linear_cpu, make_moe_dispatch, make_moe_topk, moe_ref,
                                  topk_ref)
from ferrum.schedules.quant_linear import QuantFormat
from ferrum_compiler.quant import VALUE_TABLES, quantize_rtn

from .test_quant_linear import R16_ISAS, _random_packed

pytestmark = pytest.mark.kernel


def _build(func, mcpu: str | None = None):
    import tvm

    target = {"kind": "llvm", **({"mcpu": mcpu} if mcpu else {})}
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _route(logits, experts, k, norm):
    import tvm

    t = logits.shape[0]
    w, ids = tvm.runtime.tensor(np.zeros((t, k), np.float32)), tvm.runtime.tensor(np.zeros(t * k, np.int32))
    _build(make_moe_topk(experts, k, norm, "cpu"))(tvm.runtime.tensor(logits), w, ids)
    off, order = tvm.runtime.tensor(np.zeros(experts + 1, np.int32)), tvm.runtime.tensor(np.zeros(t * k, np.int32))
    _build(make_moe_dispatch(experts, "cpu"))(ids, off, order)
    return w.numpy(), ids.numpy(), off.numpy(), order.numpy()


@settings(max_examples=15, deadline=None)
@given(experts=st.integers(2, 16), k=st.integers(1, 4), t=st.integers(1, 9), norm=st.booleans(), seed=st.integers(0, 999))
def test_topk_and_dispatch_match_numpy(experts, k, t, norm, seed):
    k = min(k, experts)
    logits = np.random.default_rng(seed).standard_normal((t, experts)).astype(np.float32) * 3
    w, ids, off, order = _route(logits, experts, k, norm)
    rw, rids = topk_ref(logits, k, norm)
    assert np.array_equal(ids, rids.reshape(-1))
    np.testing.assert_allclose(w, rw, rtol=1e-5, atol=1e-6)
    ro, rorder = dispatch_ref(rids, experts)
    assert np.array_equal(off, ro) and np.array_equal(order, rorder)


# GGUF's IQ4_XS and IQ2_XS (4-bit codes of a table, groups of 32 and 16), Q3_K and Q2_K (4-bit groups of 16):
# x86 CPU targets with integer dot products keep their MoE experts so
INT_DOT_ONLY = [QuantFormat(4, 32, True, VALUE_TABLES["IQ4_XS"]), QuantFormat(4, 16, True, VALUE_TABLES["IQ2_XS"]),
                QuantFormat(4, 16, True), QuantFormat(4, 16, False)]


@settings(max_examples=15, deadline=None)
@given(fmt=st.sampled_from([None, QuantFormat(4, 32, False), QuantFormat(8, 32, True)] + INT_DOT_ONLY),
       n=st.integers(1, 40), t=st.integers(1, 6), k=st.integers(1, 3), seed=st.integers(0, 999))
@example(fmt=INT_DOT_ONLY[0], n=17, t=3, k=2, seed=1)
@example(fmt=INT_DOT_ONLY[1], n=5, t=2, k=3, seed=2)
@example(fmt=INT_DOT_ONLY[2], n=16, t=1, k=1, seed=3)
@example(fmt=INT_DOT_ONLY[3], n=33, t=4, k=2, seed=4)
def test_grouped_linear_matches_numpy(fmt, n, t, k, seed):
    """Each slot multiplies its token's row by its expert's weights; unchosen experts stay unread. Value
    tables (looked up with ``pshufb``) and 4-bit groups of 16 on x86 with AVX2."""
    import tvm

    from ferrum.schedules.quant_linear import dequantize_ref
    from ferrum_runtime.artifact import host_cpu_flags

    experts, kdim = 6, 64
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((experts * n, kdim)).astype(np.float32)
    x = rng.standard_normal((t, kdim)).astype(np.float32)
    logits = rng.standard_normal((t, experts)).astype(np.float32)
    _, ids, off, order = _route(logits, experts, k, False)
    if fmt is None:
        tensors, dense = [w], w
    elif fmt.int_dot_only:
        if "avx2" not in host_cpu_flags():
            pytest.skip("this CPU has no AVX2")
        qw, sc, mn = _random_packed(rng, fmt, experts * n, kdim)
        tensors = [qw, sc] + ([] if mn is None else [mn])
        dense = dequantize_ref(fmt, qw, sc, mn).astype(np.float32)
    else:
        qt = quantize_rtn(w, fmt)
        packed = qt.pack()
        tensors, dense = [packed[r] for r in ("qweight", "scales", "mins") if r in packed], qt.dequantize()
    out = tvm.runtime.tensor(np.zeros((t * k, n), np.float32))
    lib = _build(make_grouped_linear_cpu(experts, kdim, n, k, fmt, "float32", "float32"),
                 "haswell" if fmt is not None and fmt.int_dot_only else None)
    lib(tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in tensors], tvm.runtime.tensor(off),
        tvm.runtime.tensor(order), out)
    ref = np.stack([dense.reshape(experts, n, kdim)[ids[s]] @ x[s // k] for s in range(t * k)])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_moe_ref_matches_a_direct_loop():
    """The reference itself, against a loop written from transformers' Qwen3MoeSparseMoeBlock."""
    rng = np.random.default_rng(0)
    t, d, inter, experts, k = 5, 8, 6, 4, 2
    x = rng.standard_normal((t, d))
    logits = rng.standard_normal((t, experts))
    gu = rng.standard_normal((experts * 2 * inter, d))
    dn = rng.standard_normal((experts * d, inter))
    out = moe_ref(x, logits, gu, dn, k, True)
    for i in range(t):
        p = np.exp(logits[i] - logits[i].max())
        p /= p.sum()
        top = np.argsort(-p)[:k]
        expect = np.zeros(d)
        for e in top:
            g = gu[e * 2 * inter:e * 2 * inter + inter] @ x[i]
            u = gu[e * 2 * inter + inter:(e + 1) * 2 * inter] @ x[i]
            expect += p[e] / p[top].sum() * (dn[e * d:(e + 1) * d] @ (g / (1 + np.exp(-g)) * u))
        np.testing.assert_allclose(out[i], expect, rtol=1e-10)



@pytest.mark.parametrize("isa,mcpu,flag", R16_ISAS, ids=[i[0] for i in R16_ISAS])
@settings(max_examples=12, deadline=None)
@given(fmt=st.sampled_from([QuantFormat(4, 32, False), QuantFormat(8, 32, True), QuantFormat(8, 16, False)]
                           + INT_DOT_ONLY),
       t=st.sampled_from([1, 2, 5, 9]), k=st.integers(1, 4), act_bits=st.sampled_from([8, 16]),
       seed=st.integers(0, 999))
@example(fmt=INT_DOT_ONLY[0], t=9, k=4, act_bits=16, seed=1)  # experts with 4+ slots: 4-token blocks
@example(fmt=INT_DOT_ONLY[3], t=1, k=2, act_bits=8, seed=2)
def test_grouped_r16_matches_numpy(isa, mcpu, flag, fmt, t, k, act_bits, seed):
    """The experts on the r16 integer-dot kernel (``make_qlinear_r16_cpu`` with ``experts``): each slot's
    token times its expert's rows, within the proven bound of rounding activations (test_quant_linear's),
    for every format the kernel takes; experts with fewer than 4 slots and with more, unchosen ones."""
    import tvm

    from ferrum.schedules.quant_linear import (activation_error_bound, dequantize_ref, interleave_r16,
                                               make_qlinear_r16_cpu)
    from ferrum_runtime.artifact import host_cpu_flags

    if flag not in host_cpu_flags():
        pytest.skip(f"this CPU has no {flag}")
    experts, n, kdim = 6, 32, 64
    k = min(k, experts)
    rng = np.random.default_rng(seed)
    qw, sc, mn = _random_packed(rng, fmt, experts * n, kdim)
    packed = {"qweight": qw, "scales": sc, **({} if mn is None else {"mins": mn})}
    r16 = interleave_r16(packed)
    x = rng.standard_normal((t, kdim)).astype(np.float32)
    _, ids, off, order = _route(rng.standard_normal((t, experts)).astype(np.float32), experts, k, False)
    out = tvm.runtime.tensor(np.zeros((t * k, n), np.float32))
    lib = _build(make_qlinear_r16_cpu(kdim, n, fmt, "float32", "float32", None, isa, act_bits, experts=experts,
                                      x_div=k), mcpu)
    lib(tvm.runtime.tensor(x), *[tvm.runtime.tensor(r16[r]) for r in ("qweight", "scales", "mins") if r in r16],
        tvm.runtime.tensor(off), tvm.runtime.tensor(order), out)
    w = dequantize_ref(fmt, packed["qweight"], packed["scales"], packed.get("mins")).reshape(experts, n, kdim)
    for s in range(t * k):
        xs = x[s // k][None]
        ref = xs.astype(np.float64) @ w[ids[s]].T
        bound = activation_error_bound(xs, fmt, w[ids[s]], act_bits) + 1e-5 * (np.abs(xs) @ np.abs(w[ids[s]]).T) + 1e-6
        assert np.all(np.abs(out.numpy()[s] - ref[0]) <= bound[0]), s

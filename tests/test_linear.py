"""The CPU linear kernel vs numpy over shapes, including K not a multiple of the vector width."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrum.schedules.linear import linear_ref, make_linear_cpu

pytestmark = pytest.mark.kernel


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(1, 70), t=st.integers(1, 9), bias=st.booleans(),
       out_dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 1000))
def test_linear_matches_numpy(k, n, t, bias, out_dtype, seed):
    import tvm

    f = make_linear_cpu(k, n, "float32", out_dtype, bias)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target={"kind": "llvm"})
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((t, n), out_dtype))
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(w)] + ([tvm.runtime.tensor(b)] if bias else []) + [out]
    lib(*args)
    np.testing.assert_allclose(out.numpy(), linear_ref(x, w, b if bias else None, "float64"), rtol=1e-4, atol=1e-4)

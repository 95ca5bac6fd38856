"""The vectorizable float32 exp used by the CPU attention and SiLU kernels, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum.schedules.fast_math import exp_f32, exp_f32_ref


@pytest.mark.kernel
def test_exp_f32_matches_numpy_and_its_reference():
    import tvm
    from tvm.script import tirx as T

    n = 1 << 14

    @T.prim_func
    def fexp(a: T.Buffer((n,), "float32"), o: T.Buffer((n,), "float32")):
        for i0 in T.serial(n // 16):
            for lane in T.vectorized(16):
                o[i0 * 16 + lane] = exp_f32(a[i0 * 16 + lane])

    lib = tvm.compile(tvm.IRModule({"main": fexp}), target={"kind": "llvm"})
    x = np.concatenate([np.linspace(-90, 88, n - 6, dtype=np.float32),
                        np.float32([-3.0e38, -87.5, -87.0, 0.0, 1e-8, 88.0])])
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib(tvm.runtime.tensor(x), out)
    got = out.numpy()
    exact = np.exp(x.astype(np.float64))
    live = x >= -87.0
    assert np.all(got[~live] == 0)  # underflow is exactly 0 (masked attention scores rely on it)
    assert (np.abs(got[live] - exact[live]) / exact[live]).max() < 3e-7
    np.testing.assert_allclose(got, exp_f32_ref(x), rtol=2e-7, atol=0)
    assert got[np.where(x == 0)[0][0]] == 1.0

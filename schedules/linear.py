"""Dense linear ``out[T, N] = x[T, K] @ w[N, K]^T (+ bias[N])`` for the CPU, with its numpy reference.

Weights keep the checkpoint's ``[out_features, in_features]`` layout: every output is a dot product
over a contiguous row, which suits both the decode GEMV (stream each row once) and prefill. The CPU
kernel splits the outputs into blocks run in parallel and accumulates each dot product in ``lanes``
float32 partial sums that LLVM maps onto SIMD registers. The token count ``T`` is symbolic.

GPU targets do not use this kernel: they lower ``linear`` to a Relax matmul scheduled by dlight (the
tensor-core schedules are a later issue).
"""

from __future__ import annotations

import numpy as np

_ROWS_PER_TASK = 16


def make_linear_cpu(in_features: int, out_features: int, dtype: str, out_dtype: str, bias: bool, lanes: int = 16):
    """PrimFunc ``linear(x[T,K], w[N,K], [bias[N],] out[T,N])``."""
    from tvm.script import tirx as T

    K, N, L = in_features, out_features, lanes
    KV = K // L  # full vector chunks; the remaining K % L columns run in a scalar tail
    tasks = (N + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK

    @T.macro
    def rows(x, w, b, out, ntok):
        for task in T.parallel(tasks):
            acc = T.alloc_buffer((L,), "float32")
            for i in T.serial(ntok):
                for r in T.serial(_ROWS_PER_TASK):
                    if task * _ROWS_PER_TASK + r < N:
                        for ll in T.vectorized(L):
                            acc[ll] = T.float32(0)
                        for ko in T.serial(KV):
                            for ll in T.vectorized(L):
                                acc[ll] = acc[ll] + T.Cast("float32", x[i, ko * L + ll]) * T.Cast(
                                    "float32", w[task * _ROWS_PER_TASK + r, ko * L + ll])
                        for kt in T.serial(K - KV * L):
                            acc[0] = acc[0] + T.Cast("float32", x[i, KV * L + kt]) * T.Cast(
                                "float32", w[task * _ROWS_PER_TASK + r, KV * L + kt])
                        for ll in T.serial(L - 1):
                            acc[0] = acc[0] + acc[ll + 1]
                        if bias:
                            acc[0] = acc[0] + T.Cast("float32", b[task * _ROWS_PER_TASK + r])
                        out[i, task * _ROWS_PER_TASK + r] = T.Cast(out_dtype, acc[0])

    if bias:

        @T.prim_func(private=True)
        def linear_bias(x_h: T.handle, w: T.Buffer((N, K), dtype), b: T.Buffer((N,), dtype),  # type: ignore[valid-type]
                        o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            ntok = T.int64()
            rows(T.match_buffer(x_h, (ntok, K), dtype), w, b, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)

        return linear_bias

    @T.prim_func(private=True)
    def linear(x_h: T.handle, w: T.Buffer((N, K), dtype), o_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True})
        ntok = T.int64()
        rows(T.match_buffer(x_h, (ntok, K), dtype), w, None, T.match_buffer(o_h, (ntok, N), out_dtype), ntok)

    return linear


def linear_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, out_dtype: str | None = None) -> np.ndarray:
    """``x @ w.T + bias`` in float64, cast to ``out_dtype`` (default: x's dtype)."""
    out = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        out = out + bias.astype(np.float64)
    return out.astype(out_dtype or x.dtype)

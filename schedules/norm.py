"""Residual add fused with RMSNorm for GPUs, with its numpy reference.

A decoder layer's residual stream is ``h = x + r`` followed by ``rms_norm(h) * w``; on GPUs that is one
kernel reading ``x`` and ``r`` once and writing both ``h`` (the next residual) and the normalised rows,
instead of an add kernel and a norm kernel that reads ``h`` back. ``h`` is rounded to the model's dtype
before it is squared, as the unfused add would store it and as transformers computes it.
"""

from __future__ import annotations

import numpy as np

from .block_reduce import block_sum, threads_for

GPU_THREADS = 256


def make_add_rms_norm_gpu(hidden: int, dtype: str, weight_dtype: str, eps: float):
    """PrimFunc ``add_rms_norm(x[T,D], r[T,D], w[D], h[T,D], y[T,D])``: ``h = x + r`` and
    ``y = h / sqrt(mean(h^2) + eps) * w``. A block per token; each thread keeps its columns' sums in
    float32 and ``block_sum`` adds the squares. The weight is read with ``x`` and ``r``, before the sum,
    and parked in shared memory: read where it is used, after the sum's barriers, nvcc issued its loads
    there, a second round trip to memory in every call (SASS, 2026-11-27)."""
    from tvm.script import tirx as T

    D, NT = hidden, threads_for(hidden, GPU_THREADS)
    row_sum = block_sum(NT, 1)
    E = -(-D // NT)  # columns per thread

    @T.prim_func(private=True)
    def add_rms_norm(x_h: T.handle, r_h: T.handle, w: T.Buffer((D,), weight_dtype), h_h: T.handle,  # type: ignore[valid-type]
                     y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok = T.int64()
        x = T.match_buffer(x_h, (ntok, D), dtype)
        r = T.match_buffer(r_h, (ntok, D), dtype)
        h = T.match_buffer(h_h, (ntok, D), dtype)
        y = T.match_buffer(y_h, (ntok, D), dtype)
        for t in T.thread_binding(ntok, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                part = T.alloc_buffer((NT, 1), "float32", scope="shared")
                ws = T.alloc_buffer((E * NT,), weight_dtype, scope="shared")  # this thread's weights, early
                xr = T.alloc_buffer((3, E), "float32", scope="local")  # its x, r and weights as loaded
                vals = T.alloc_buffer((E,), "float32", scope="local")  # this thread's h, as stored
                sq = T.alloc_buffer((1,), "float32", scope="local")
                sq[0] = T.float32(0)
                for e in T.unroll(E):  # every load first: one round trip
                    if e * NT + tx < D:
                        xr[0, e] = T.Cast("float32", x[t, e * NT + tx])
                        xr[1, e] = T.Cast("float32", r[t, e * NT + tx])
                        xr[2, e] = T.Cast("float32", w[e * NT + tx])
                for e in T.unroll(E):
                    if e * NT + tx < D:
                        vals[e] = T.Cast("float32", T.Cast(dtype, xr[0, e] + xr[1, e]))
                        h[t, e * NT + tx] = T.Cast(dtype, vals[e])
                        sq[0] = sq[0] + vals[e] * vals[e]
                        ws[e * NT + tx] = T.Cast(weight_dtype, xr[2, e])
                row_sum(part, sq, tx)
                rstd: T.let[T.float32] = T.rsqrt(sq[0] / T.float32(D) + T.float32(eps))
                for e in T.unroll(E):
                    if e * NT + tx < D:
                        y[t, e * NT + tx] = T.Cast(dtype, vals[e] * rstd * T.Cast("float32", ws[e * NT + tx]))

    return add_rms_norm


def add_rms_norm_ref(x: np.ndarray, r: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(h, y)``: ``h = x + r`` in x's dtype and ``y = rms_norm(h) * w`` (computed in float64)."""
    h = (x.astype(np.float64) + r.astype(np.float64)).astype(x.dtype)
    hf = h.astype(np.float64)
    y = hf / np.sqrt((hf * hf).mean(axis=-1, keepdims=True) + eps) * w.astype(np.float64)
    return h, y.astype(x.dtype)

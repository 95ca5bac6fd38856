"""Attention heads out of the fused q/k/v projection, with the optional per-head RMSNorm (Qwen3's q/k norm)
and rotate-half RoPE, in one GPU kernel; with its numpy reference.

On GPUs each of slice, reshape, norm and RoPE was its own kernel (reshape and slice copies included): four
launches and three round trips through memory per q and per k per layer. Here a block per (token, head)
reads the head's ``D`` columns of the q/k/v row once and writes the rotated head.
"""

from __future__ import annotations

import numpy as np

from .block_reduce import block_sum, threads_for


def make_head_rope_gpu(width: int, first_head: int, heads: int, head_dim: int, dtype: str, norm_eps: float | None,
                       weight_dtype: str = "float32", rotate: bool = True):
    """PrimFunc ``head_rope(src[T, width], [norm_w[D],] [table[T, 2, D/2] f32,] out[T, heads, D])``: head
    ``h`` is columns ``(first_head + h) * D ...`` of ``src``; with ``norm_eps`` it is RMS-normalised with
    ``norm_w`` (in float32, rounded to ``dtype`` as the unfused norm stores it), then rotated with the
    step's cos (``table[t, 0]``) and sin (``table[t, 1]``): ``out[d] = x[d] cos - x[d + D/2] sin`` for the
    first half, ``x[d] cos + x[d - D/2] sin`` for the second, rounded to ``dtype``. Without ``rotate`` (and
    without a norm) it only cuts the heads out (the values, for the KV cache)."""
    from tvm.script import tirx as T

    D, half = head_dim, head_dim // 2
    NT = threads_for(D)
    sums = block_sum(NT, 1)
    has_norm = norm_eps is not None
    eps = float(norm_eps or 0.0)
    assert rotate or not has_norm, "a norm without RoPE is not a pattern lowering produces"

    @T.prim_func(private=True, s_tir=True)
    def head_rope(s_h: T.handle, w: T.Buffer((D,), weight_dtype), t_h: T.handle, o_h: T.handle):  # type: ignore[valid-type]
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok = T.int64()
        src = T.match_buffer(s_h, (ntok, width), dtype)
        table = T.match_buffer(t_h, (ntok, 2, half), "float32")
        out = T.match_buffer(o_h, (ntok, heads, D), dtype)
        with T.sblock("root"):  # Relax's reshape-pattern check of one-input calls wants a block
            for th in T.thread_binding(ntok * heads, thread="blockIdx.x"):
                for tx in T.thread_binding(NT, thread="threadIdx.x"):
                    part = T.alloc_buffer((NT, 1), "float32", scope="shared")
                    xs = T.alloc_buffer((D,), "float32", scope="shared")
                    v = T.alloc_buffer((1,), "float32", scope="local")
                    sq = T.alloc_buffer((1,), "float32", scope="local")
                    t: T.let[T.int64] = th // heads
                    col: T.let[T.int64] = (first_head + th % heads) * D
                    v[0] = T.float32(0)
                    if tx < D:
                        v[0] = T.Cast("float32", src[t, col + tx])
                    if has_norm:
                        sq[0] = v[0] * v[0]
                        sums(part, sq, tx)
                        if tx < D:
                            v[0] = T.Cast("float32", T.Cast(dtype, v[0] * T.rsqrt(sq[0] / T.float32(D) + T.float32(eps))
                                                            * T.Cast("float32", w[tx])))
                    if tx < D:
                        xs[tx] = v[0]
                    T.tvm_storage_sync("shared")
                    if tx < D:
                        if rotate:
                            rot: T.let[T.float32] = T.if_then_else(tx < half, T.float32(0) - xs[T.min(tx + half, D - 1)],
                                                                   xs[T.max(tx - half, 0)])
                            out[t, th % heads, tx] = T.Cast(dtype, v[0] * table[t, 0, tx % half]
                                                            + rot * table[t, 1, tx % half])
                        else:
                            out[t, th % heads, tx] = T.Cast(dtype, v[0])

    import tvm

    s_h, w, t_h, o_h = head_rope.params  # the weight without a norm and the table without RoPE are unread
    keep = [s_h] + ([w] if has_norm else []) + ([t_h] if rotate else []) + [o_h]
    return tvm.tirx.PrimFunc(keep, head_rope.body, head_rope.ret_type, head_rope.attrs)


def head_rope_ref(src: np.ndarray, first_head: int, heads: int, head_dim: int, table: np.ndarray | None,
                  norm_w: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
    """float64 ``[T, heads, D]``: the heads' columns of ``src``, RMS-normalised with ``norm_w`` when given
    (rounded to ``src``'s dtype, as stored between the unfused ops), rotated with ``table``'s cos/sin when
    given."""
    x = src[:, first_head * head_dim:(first_head + heads) * head_dim].reshape(len(src), heads, head_dim)
    x = x.astype(np.float64)
    if table is None:
        return x
    if norm_w is not None:
        x = (x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * norm_w).astype(src.dtype).astype(np.float64)
    cos, sin = table[:, 0, None, :].astype(np.float64), table[:, 1, None, :].astype(np.float64)
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

"""Attention heads out of the fused q/k/v projection, with the optional per-head RMSNorm (Qwen3's q/k norm)
and rotate-half RoPE, in one GPU kernel; with its numpy reference.

On GPUs each of slice, reshape, norm and RoPE was its own kernel (reshape and slice copies included): four
launches and three round trips through memory per q and per k per layer. Here a block per (token, head)
reads the head's ``D`` columns of the q/k/v row once and writes the rotated head
(``make_head_rope_gpu``); ``make_qkv_append_gpu`` does it for the queries, keys and values of one attention
at once and writes the keys and values straight into the paged KV cache (the KV append, fused).
"""

from __future__ import annotations

import numpy as np

from .block_reduce import block_sum, threads_for


def _head_macro(D: int, dtype: str, eps: float | None):
    """Macro ``(src, t, col, qw, kw, use_k, norm, rotate, table, v, tx)``: thread ``tx`` of a block over one
    head (``D`` columns of ``src`` row ``t`` from ``col``) leaves its element in ``v[0]``, the caller's
    local register, RMS-normalised with ``kw`` if ``use_k`` else ``qw`` when ``norm`` (in float32, rounded
    to ``dtype`` as the unfused norm stores it) and rotated with ``table`` row ``t`` when ``rotate``. Its
    shared scratch is its own. ``norm`` and ``rotate`` may differ between blocks: the block sum runs
    unconditionally (its barriers cannot sit in a condition); with ``eps`` None there is no norm at all,
    with ``rotate`` False no table. The norm weight and the table's cos and sin are loaded with the
    element, before the sum (the weight kept in shared memory until the norm: nvcc sinks a load whose only
    use is after barriers down to it): read after its barriers, each was a round trip more (3 in all)."""
    from tvm.script import tirx as T

    NT, half = threads_for(D), D // 2
    sums = block_sum(NT, 1)

    @T.macro
    def head(src, t, col, qw, kw, use_k, norm, rotate, table, v, tx):
        part = T.alloc_buffer((NT, 1), "float32", scope="shared")
        xs = T.alloc_buffer((D,), "float32", scope="shared")
        sq = T.alloc_buffer((1,), "float32", scope="local")
        pre = T.alloc_buffer((3,), "float32", scope="local")  # cos, sin (slots 1, 2)
        v[0] = T.float32(0)
        if tx < D:
            v[0] = T.Cast("float32", src[t, col + tx])
            if eps is not None:  # parked in shared memory: nvcc sinks a load only used after barriers to its use
                xs[tx] = T.Cast("float32", T.if_then_else(use_k, kw[tx], qw[tx]))
            if rotate is not False:
                pre[1] = table[t, 0, tx % half]
                pre[2] = table[t, 1, tx % half]
        if eps is not None:
            sq[0] = v[0] * v[0]
            sums(part, sq, tx)
            if tx < D and norm:
                v[0] = T.Cast("float32", T.Cast(dtype, v[0] * T.rsqrt(sq[0] / T.float32(D) + T.float32(eps or 0.0))
                                                * xs[tx]))
        if tx < D:
            xs[tx] = v[0]
        T.tvm_storage_sync("shared")
        if tx < D and rotate:
            rot: T.let[T.float32] = T.if_then_else(tx < half, T.float32(0) - xs[T.min(tx + half, D - 1)],
                                                   xs[T.max(tx - half, 0)])
            v[0] = v[0] * pre[1] + rot * pre[2]

    return head


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
    assert rotate or norm_eps is None, "a norm without RoPE is not a pattern lowering produces"
    head = _head_macro(D, dtype, norm_eps)

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
                    v = T.alloc_buffer((1,), "float32", scope="local")
                    t: T.let[T.int64] = th // heads
                    head(src, t, (first_head + th % heads) * D, w, w, False, True, rotate, table, v, tx)
                    if tx < D:
                        out[t, th % heads, tx] = T.Cast(dtype, v[0])

    import tvm

    s_h, w, t_h, o_h = head_rope.params  # the weight without a norm and the table without RoPE are unread
    keep = [s_h] + ([w] if norm_eps is not None else []) + ([t_h] if rotate else []) + [o_h]
    return tvm.tirx.PrimFunc(keep, head_rope.body, head_rope.ret_type, head_rope.attrs)


def make_qkv_append_gpu(width: int, firsts: tuple[int, int, int], heads: int, kv_heads: int, head_dim: int,
                        block_size: int, dtype: str, cache_dtype: str, norm_eps: float | None,
                        weight_dtype: str = "float32"):
    """PrimFunc ``qkv_append(cache, src[T, width], [q_norm_w[D], k_norm_w[D],] table[T, 2, D/2],
    slot_mapping[T], q[T, heads, D])``, in place on ``cache[NB, 2, kv_heads, block_size, D]``: everything
    between an attention's q/k/v projection and its attention kernel, in one launch. Query head ``h`` is
    columns ``(firsts[0] + h) * D ...`` of ``src``, key head ``h`` ``(firsts[1] + h) * D``, value head ``h``
    ``(firsts[2] + h) * D``. Queries and keys as ``make_head_rope_gpu`` makes them (norm when ``norm_eps``,
    RoPE); the rotated keys and the values go straight into the cache at ``slot_mapping[t]`` (cast to
    ``cache_dtype``; a negative slot writes nothing), the queries to ``q``. A block per (token, head of any
    of the three kinds); its threads write consecutive elements of one cache row."""
    from tvm.script import tirx as T

    D, half, H, KV, BS = head_dim, head_dim // 2, heads, kv_heads, block_size
    NT, A = threads_for(D), heads + 2 * kv_heads
    head = _head_macro(D, dtype, norm_eps)
    qf, kf, vf = firsts

    @T.prim_func(private=True, s_tir=True)
    def qkv_append(c_h: T.handle, s_h: T.handle, qw: T.Buffer((D,), weight_dtype), kw: T.Buffer((D,), weight_dtype),  # type: ignore[valid-type]
                   t_h: T.handle, m_h: T.handle, q_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nb, ntok = T.int64(), T.int64()
        cache = T.match_buffer(c_h, (nb, 2, KV, BS, D), cache_dtype)
        src = T.match_buffer(s_h, (ntok, width), dtype)
        table = T.match_buffer(t_h, (ntok, 2, half), "float32")
        slot_mapping = T.match_buffer(m_h, (ntok,), "int32")
        q = T.match_buffer(q_h, (ntok, H, D), dtype)
        with T.sblock("root"):
            for th in T.thread_binding(ntok * A, thread="blockIdx.x"):
                for tx in T.thread_binding(NT, thread="threadIdx.x"):
                    v = T.alloc_buffer((1,), "float32", scope="local")
                    t: T.let[T.int64] = th // A
                    hh: T.let[T.int64] = th % A  # queries, then keys, then values
                    col: T.let[T.int64] = T.if_then_else(hh < H, (qf + hh) * D, T.if_then_else(
                        hh < H + KV, (kf + hh - H) * D, (vf + hh - H - KV) * D))
                    slot: T.let[T.int32] = slot_mapping[t]  # loaded with the head, not after it
                    head(src, t, col, qw, kw, hh >= H, hh < H + KV, hh < H + KV, table, v, tx)
                    if tx < D:
                        if hh < H:
                            q[t, hh, tx] = T.Cast(dtype, v[0])
                        elif slot >= 0:  # keys rounded to the model's dtype first, as the unfused path stores them
                            cache[slot // BS, T.if_then_else(hh < H + KV, 0, 1), (hh - H) % KV, slot % BS, tx] = T.Cast(
                                cache_dtype, T.Cast(dtype, v[0]))

    import tvm

    c_h, s_h, qw, kw, t_h, m_h, q_h = qkv_append.params
    keep = [c_h, s_h] + ([qw, kw] if norm_eps is not None else []) + [t_h, m_h, q_h]
    return tvm.tirx.PrimFunc(keep, qkv_append.body, qkv_append.ret_type, qkv_append.attrs)


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

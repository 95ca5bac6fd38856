"""Paged attention over the runtime-owned KV cache (DESIGN §5): KV append and ragged causal attention.

Cache layout, one tensor per layer: ``[num_blocks, 2, kv_heads, block_size, head_dim]`` (axis 1: 0 = K,
1 = V). A sequence's token at position ``p`` lives in block ``block_tables[b, p // block_size]`` at offset
``p % block_size``; block tables may list blocks in any order.

The batch is flattened and ragged: sequence ``b`` owns query tokens ``query_start[b] : query_start[b+1]``
and token ``t`` sits at absolute position ``positions[t]``. A query attends causally to every position
``<= positions[t]`` of its own sequence (within ``sliding_window`` when set), so one kernel serves prefill,
chunked prefill (queries that start mid-sequence) and decode. Keys of the current step must be appended
(``kv_append``) before ``attention`` runs.

Kernels are built per (heads, head_dim, block_size, dtype) with the token count, batch size and number
of blocks symbolic. The numpy references at the bottom are the ground truth for tests.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .fast_math import exp_f32

KERNEL_KINDS = ("cpu", "gpu")


def make_kv_append(kv_heads: int, head_dim: int, block_size: int, dtype: str, kind: str, cache_dtype: str = ""):
    """PrimFunc ``kv_append(cache, k[T,kvh,D], v[T,kvh,D], slot_mapping[T])``, in place on ``cache``.

    ``k``/``v`` are ``dtype``, the cache ``cache_dtype`` (default: the same); values are cast on the way in.
    A negative slot (padding) writes nothing.
    """
    from tvm.script import tirx as T

    _check_kind(kind)
    H, D, BS = kv_heads, head_dim, block_size
    cdtype = cache_dtype or dtype

    @T.macro
    def append_one(cache, k, v, slot_mapping, t, h):
        slot: T.let[T.int32] = slot_mapping[t]
        if slot >= 0:
            for d in T.serial(D):
                cache[slot // BS, 0, h, slot % BS, d] = T.Cast(cdtype, k[t, h, d])
                cache[slot // BS, 1, h, slot % BS, d] = T.Cast(cdtype, v[t, h, d])

    outer, inner, C = _thread_loops(kind)

    @T.prim_func(private=True)
    def kv_append(c_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        nb, ntok = T.int64(), T.int64()
        cache = T.match_buffer(c_h, (nb, 2, H, BS, D), cdtype)
        k = T.match_buffer(k_h, (ntok, H, D), dtype)
        v = T.match_buffer(v_h, (ntok, H, D), dtype)
        slot_mapping = T.match_buffer(s_h, (ntok,), "int32")
        for bx in outer((ntok * H + C - 1) // C):
            for tx in inner(C):
                if bx * C + tx < ntok * H:
                    append_one(cache, k, v, slot_mapping, (bx * C + tx) // H, (bx * C + tx) % H)

    return _mark(kv_append, kind)


def make_attention(
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: str,
    kind: str,
    sliding_window: int = 0,
    scale: float | None = None,
    cache_dtype: str = "",
):
    """PrimFunc ``attention(q[T,H,D], cache, positions[T], query_start[B+1], block_tables[B,M], out[T,H,D])``.

    One online-softmax pass per (token, head) in float32, a KV block at a time (one rescale per block);
    GQA maps query head ``h`` to KV head ``h // (num_heads // kv_heads)``. ``q``/``out`` are ``dtype``, the
    cache ``cache_dtype`` (default: the same; a float16 cache halves the bytes decode reads).
    """
    from tvm.script import tirx as T

    _check_kind(kind)
    if num_heads % kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of kv_heads ({kv_heads})")
    H, KVH, D, BS = num_heads, kv_heads, head_dim, block_size
    group = num_heads // kv_heads
    sm_scale = float(scale if scale is not None else 1.0 / math.sqrt(head_dim))
    window = int(sliding_window) if sliding_window > 0 else 1 << 30

    # CPU: the head dimension runs in SIMD lanes; GPU threads keep it serial
    vec = T.vectorized if kind == "cpu" else T.serial
    L = next(n for n in (16, 8, 4, 2, 1) if D % n == 0)
    scratch = scratch_scope(kind)
    exp = exp_f32 if kind == "cpu" else T.exp  # CPU: vector code, not one expf call per score

    @T.macro
    def attend_one(q, cache, positions, query_start, block_tables, out, nbatch, t, h):
        # one KV block at a time: its scores first, then one rescale of the running sums per block
        acc = T.alloc_buffer((D,), "float32", scope=scratch)
        scores = T.alloc_buffer((BS,), "float32", scope=scratch)
        lanes = T.alloc_buffer((L,), "float32", scope=scratch)
        tree = T.alloc_buffer((16,), "float32", scope=scratch)  # the halving levels of one key's lanes
        state = T.alloc_buffer((4,), "float32", scope=scratch)  # max, denominator, block max, rescale
        seq = T.alloc_buffer((2,), "int32", scope=scratch)  # sequence, physical block
        pos: T.let[T.int32] = positions[t]
        seq[0] = 0
        for b in T.serial(nbatch):
            if T.Cast("int64", query_start[b + 1]) <= t:
                seq[0] = T.Cast("int32", b) + 1
        start: T.let[T.int32] = T.max(pos - window + 1, 0)
        state[0] = T.float32(-3.0e38)
        state[1] = T.float32(0)
        for d in vec(D):
            acc[d] = T.float32(0)
        for jb in T.serial(pos // BS - start // BS + 1):
            blk: T.let[T.int32] = start // BS + jb
            seq[1] = block_tables[seq[0], blk]
            state[2] = T.float32(-3.0e38)
            for i in T.serial(BS):
                if blk * BS + i >= start and blk * BS + i <= pos:
                    for ll in vec(L):
                        lanes[ll] = T.float32(0)
                    for d0 in T.serial(D // L):
                        for ll in vec(L):
                            lanes[ll] = lanes[ll] + T.Cast("float32", q[t, h, d0 * L + ll]) * T.Cast(
                                "float32", cache[seq[1], 0, h // group, i, d0 * L + ll])
                    # halve the lanes into fresh buffers (a 4-deep add tree for 16 lanes, not a 15-long
                    # dependent chain; whole-buffer writes let LLVM keep each level in a register)
                    if L >= 16:
                        for ll in vec(8):
                            tree[ll] = lanes[ll] + lanes[ll + 8]
                    if L == 8:
                        for ll in vec(8):
                            tree[ll] = lanes[ll]
                    if L >= 8:
                        for ll in vec(4):
                            tree[8 + ll] = tree[ll] + tree[ll + 4]
                    if L == 4:
                        for ll in vec(4):
                            tree[8 + ll] = lanes[ll]
                    if L >= 4:
                        for ll in vec(2):
                            tree[12 + ll] = tree[8 + ll] + tree[10 + ll]
                        scores[i] = (tree[12] + tree[13]) * T.float32(sm_scale)
                    if L == 2:
                        scores[i] = (lanes[0] + lanes[1]) * T.float32(sm_scale)
                    if L == 1:
                        scores[i] = lanes[0] * T.float32(sm_scale)
                    state[2] = T.max(state[2], scores[i])
                else:
                    scores[i] = T.float32(-3.0e38)
            state[3] = exp(state[0] - T.max(state[0], state[2]))
            state[0] = T.max(state[0], state[2])
            state[1] = state[1] * state[3]
            for d in vec(D):
                acc[d] = acc[d] * state[3]
            for i in vec(BS):  # masked scores are -3e38: their weight is 0
                scores[i] = exp(scores[i] - state[0])
            for i in T.serial(BS):
                state[1] = state[1] + scores[i]
                if blk * BS + i >= start and blk * BS + i <= pos:
                    for d in vec(D):
                        acc[d] = acc[d] + scores[i] * T.Cast("float32", cache[seq[1], 1, h // group, i, d])
        for d in T.serial(D):
            out[t, h, d] = T.Cast(dtype, acc[d] / state[1])

    outer, inner, C = _thread_loops(kind)

    @T.prim_func(private=True)
    def attention(q_h: T.handle, c_h: T.handle, p_h: T.handle, qs_h: T.handle, bt_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        ntok, nb, nbatch, mb = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (ntok, H, D), dtype)
        cache = T.match_buffer(c_h, (nb, 2, KVH, BS, D), cache_dtype or dtype)
        positions = T.match_buffer(p_h, (ntok,), "int32")
        query_start = T.match_buffer(qs_h, (nbatch + 1,), "int32")
        block_tables = T.match_buffer(bt_h, (nbatch, mb), "int32")
        out = T.match_buffer(o_h, (ntok, H, D), dtype)
        # tokens in the order 0, n-1, 1, n-2, ...: a causal prefill's long and short rows alternate, so the
        # contiguous ranges of work items each CPU thread takes carry equal work
        for bx in outer((ntok * H + C - 1) // C):
            for tx in inner(C):
                if bx * C + tx < ntok * H:
                    j: T.let[T.int64] = (bx * C + tx) // H
                    attend_one(q, cache, positions, query_start, block_tables, out, nbatch,
                               T.if_then_else(j % 2 == 0, j // 2, ntok - 1 - j // 2), (bx * C + tx) % H)

    return _mark(attention, kind)


def _thread_loops(kind: str):
    """``(outer, inner, chunk)``: the two loops over work items, written once for both kinds. On the CPU
    every item is a parallel task (decode has few: batch x heads); on GPUs blocks of 64 threads."""
    from tvm.script import tirx as T

    if kind == "cpu":
        return T.parallel, T.serial, 1
    return (functools.partial(T.thread_binding, thread="blockIdx.x"),
            functools.partial(T.thread_binding, thread="threadIdx.x"), 64)


def scratch_scope(kind: str) -> str:
    """Storage scope of a kernel's small per-thread scratch buffers. On GPUs "local" means registers; on
    the CPU TVM 0.27 turns every "local" buffer into a workspace-pool call per use (per parallel task),
    while a small "global" buffer becomes a stack slot that LLVM keeps in registers."""
    return "global" if kind == "cpu" else "local"


def _mark(func, kind: str):
    """GPU kernels are already bound to threads: tell dlight to leave them alone."""
    return func.with_attr("tirx.is_scheduled", True) if kind == "gpu" else func


def _check_kind(kind: str) -> None:
    if kind not in KERNEL_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KERNEL_KINDS}")


# ----------------------------------------------------------------------------- numpy references


def kv_append_ref(cache: np.ndarray, k: np.ndarray, v: np.ndarray, slot_mapping: np.ndarray) -> None:
    """In place: ``cache[slot // bs, 0|1, :, slot % bs, :] = k|v[t]`` for every non-negative slot."""
    block_size = cache.shape[3]
    for t, slot in enumerate(slot_mapping):
        if slot < 0:
            continue
        cache[slot // block_size, 0, :, slot % block_size, :] = k[t]
        cache[slot // block_size, 1, :, slot % block_size, :] = v[t]


def attention_ref(
    q: np.ndarray,  # [T, H, D]
    cache: np.ndarray,  # [NB, 2, KVH, BS, D]
    positions: np.ndarray,  # [T]
    query_start: np.ndarray,  # [B+1]
    block_tables: np.ndarray,  # [B, M]
    sliding_window: int = 0,
    scale: float | None = None,
) -> np.ndarray:
    """Causal attention of every query token over its own sequence's paged keys, in float64."""
    ntok, num_heads, head_dim = q.shape
    kv_heads, block_size = cache.shape[2], cache.shape[3]
    group = num_heads // kv_heads
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out = np.zeros(q.shape, dtype=np.float64)
    for b in range(len(query_start) - 1):
        for t in range(query_start[b], query_start[b + 1]):
            pos = int(positions[t])
            start = max(pos - sliding_window + 1, 0) if sliding_window > 0 else 0
            js = np.arange(start, pos + 1)
            blocks = block_tables[b, js // block_size]
            keys = cache[blocks, 0, :, js % block_size, :].astype(np.float64)  # [L, KVH, D]
            vals = cache[blocks, 1, :, js % block_size, :].astype(np.float64)
            for h in range(num_heads):
                s = keys[:, h // group, :] @ q[t, h].astype(np.float64) * sm_scale
                p = np.exp(s - s.max())
                out[t, h] = (p / p.sum()) @ vals[:, h // group, :]
    return out.astype(q.dtype)

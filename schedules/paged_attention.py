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


# GPU attention: query tiles x KV heads x KV splits (flash-decoding), then a merge over the splits
GPU_THREADS = 128
GPU_KEY_TILE = 16  # keys staged in shared memory per step (divides the block size, or equals it)
GPU_MAX_ROWS = 32  # query rows (tokens x grouped heads) per tile
SPLIT_KEYS = 256  # fewest keys per split worth a split of its own


def gpu_tile_tokens(num_heads: int, kv_heads: int, head_dim: int) -> int:
    """Query tokens per tile: a tile holds every query head of one KV head for these tokens, so each K/V
    element staged in shared memory serves ``tokens x group`` query rows (GQA-aware). At most 32 rows,
    fewer for wide heads (the staged queries stay within 16 KiB of shared memory)."""
    return max(1, min(GPU_MAX_ROWS, 4096 // head_dim) // (num_heads // kv_heads))


def gpu_num_splits(ntok, max_blocks, block_size: int):
    """Splits of each sequence's keys (a PrimExpr of the token count and the block-table width): enough
    for a few decode sequences over long contexts to fill the GPU, one once the batch has >= 256 tokens."""
    from tvm import tirx

    by_keys = (max_blocks * block_size + SPLIT_KEYS - 1) // SPLIT_KEYS
    return tirx.max(tirx.min(by_keys, 256 // tirx.max(ntok, 1)), 1)


def make_attention_gpu(
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: str,
    sliding_window: int = 0,
    scale: float | None = None,
    cache_dtype: str = "",
):
    """PrimFunc ``attention_split(q[T,H,D], cache, positions[T], query_start[B+1], block_tables[B,M],
    part_acc[T,H,S,D] f32, part_ml[T,H,S,2] f32)``: unnormalised partial attention per KV split.

    Grid: (query tiles, KV heads, splits S), 128 threads. A tile is up to ``gpu_tile_tokens`` consecutive
    query tokens of one sequence with all ``group`` query heads of one KV head (tiles are numbered
    sequence by sequence; the grid allocates ``ceil(T / tokens) + B`` and the excess exits). Split ``s``
    covers key positions ``[s*C, (s+1)*C)``, ``C = ceil(M*block_size / S)`` rounded up to the key tile.
    Per key tile: K and V are staged in shared memory (coalesced), each thread scores (row, key) pairs
    from shared memory, one thread per row updates the online softmax, and each thread rescales and
    accumulates its fixed ``rows*D/128`` output elements held in registers. Writes the running max and
    sum (``part_ml``) and the unnormalised output of every row and split; an empty split writes max
    ``-3e38``, sum 0. ``make_attention_merge_gpu`` combines the splits.
    """
    from tvm.script import tirx as T

    if num_heads % kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of kv_heads ({kv_heads})")
    H, KVH, D, BS, NT = num_heads, kv_heads, head_dim, block_size, GPU_THREADS
    G = num_heads // kv_heads
    QT = gpu_tile_tokens(num_heads, kv_heads, head_dim)
    R = QT * G  # query rows per tile
    KC = math.gcd(BS, GPU_KEY_TILE)
    sm_scale = float(scale if scale is not None else 1.0 / math.sqrt(head_dim))
    window = int(sliding_window) if sliding_window > 0 else 1 << 30
    ER, EK, EQ = -(-R * D // NT), -(-KC * D // NT), -(-R * KC // NT)  # per-thread elements of each tile
    NEG = -3.0e38
    cdtype = cache_dtype or dtype

    @T.prim_func(private=True)
    def attention_split(q_h: T.handle, c_h: T.handle, p_h: T.handle, qs_h: T.handle, bt_h: T.handle,
                        pa_h: T.handle, pm_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok, nb, nbatch, mb, ns = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (ntok, H, D), dtype)
        cache = T.match_buffer(c_h, (nb, 2, KVH, BS, D), cdtype)
        positions = T.match_buffer(p_h, (ntok,), "int32")
        query_start = T.match_buffer(qs_h, (nbatch + 1,), "int32")
        block_tables = T.match_buffer(bt_h, (nbatch, mb), "int32")
        part_acc = T.match_buffer(pa_h, (ntok, H, ns, D), "float32")
        part_ml = T.match_buffer(pm_h, (ntok, H, ns, 2), "float32")
        for tile in T.thread_binding((ntok + QT - 1) // QT + nbatch, thread="blockIdx.x"):
            for kh in T.thread_binding(KVH, thread="blockIdx.y"):
                for sp in T.thread_binding(ns, thread="blockIdx.z"):
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        q_s = T.alloc_buffer((R, D), "float32", scope="shared")
                        k_s = T.alloc_buffer((KC, D), "float32", scope="shared")
                        v_s = T.alloc_buffer((KC, D), "float32", scope="shared")
                        p_s = T.alloc_buffer((R, KC), "float32", scope="shared")  # scores
                        w_s = T.alloc_buffer((R, KC), "float32", scope="shared")  # their softmax weights
                        alpha = T.alloc_buffer((R,), "float32", scope="shared")  # each row's rescale
                        # thread r < R keeps row r's running max and sum; a branch never writes shared
                        # memory it then reads (TVM would want a barrier inside the branch)
                        ml = T.alloc_buffer((3,), "float32", scope="local")  # max, sum, scratch
                        # sequence, first token, tokens (0: no such tile), first key, keys
                        info = T.alloc_buffer((5,), "int32", scope="shared")
                        acc = T.alloc_buffer((ER,), "float32", scope="local")
                        scan = T.alloc_buffer((4,), "int32", scope="local")  # tiles before b, found, ...
                        if tx == 0:
                            # shared memory is never read in a condition (TVM's sync planner rejects it)
                            scan[0] = 0
                            scan[1] = 0
                            info[2] = 0
                            info[3] = 0
                            info[4] = 0
                            for b in T.serial(nbatch):
                                n_b: T.let[T.int32] = (query_start[b + 1] - query_start[b] + QT - 1) // QT
                                if scan[1] == 0:
                                    if T.Cast("int32", tile) < scan[0] + n_b:
                                        scan[1] = 1
                                        scan[2] = query_start[b] + (T.Cast("int32", tile) - scan[0]) * QT
                                        scan[3] = T.min(QT, query_start[b + 1] - scan[2])
                                        info[0] = T.Cast("int32", b)
                                        info[1] = scan[2]
                                        info[2] = scan[3]
                                    else:
                                        scan[0] = scan[0] + n_b
                            if scan[1] == 1:
                                # keys this tile needs: from the first token's window start to the last
                                # token's position, clipped to this split's range
                                chunk: T.let[T.int32] = ((T.Cast("int32", mb) * BS + T.Cast("int32", ns) - 1)
                                                         // T.Cast("int32", ns) + KC - 1) // KC * KC
                                lo: T.let[T.int32] = T.max(T.max(positions[scan[2]] - window + 1, 0),
                                                           T.Cast("int32", sp) * chunk)
                                hi: T.let[T.int32] = T.min(positions[scan[2] + scan[3] - 1] + 1,
                                                           (T.Cast("int32", sp) + 1) * chunk)
                                info[3] = lo // KC * KC
                                info[4] = T.max(hi - lo // KC * KC, 0)
                        T.tvm_storage_sync("shared")
                        # no early exit: TVM plans barriers outside conditions only, so an absent tile
                        # (count 0) runs zero key tiles and writes nothing
                        count: T.let[T.int32] = info[2]  # tokens in this tile; 0: no such tile
                        seq: T.let[T.int32] = info[0]
                        tok0: T.let[T.int32] = info[1]
                        key0: T.let[T.int32] = info[3]
                        nkeys: T.let[T.int32] = info[4]
                        for e in T.unroll(ER):  # unrolled: acc[e] stays in registers
                            if e * NT + tx < R * D:
                                r: T.let[T.int32] = (e * NT + tx) // D
                                d: T.let[T.int32] = (e * NT + tx) % D
                                acc[e] = T.float32(0)
                                if r // G < count:
                                    q_s[r, d] = T.Cast("float32", q[tok0 + r // G, kh * G + r % G, d]) * T.float32(
                                        sm_scale)
                                else:
                                    q_s[r, d] = T.float32(0)
                        if tx < R:
                            ml[0] = T.float32(NEG)
                            ml[1] = T.float32(0)
                        for kt in T.serial((nkeys + KC - 1) // KC):
                            j0: T.let[T.int32] = key0 + kt * KC
                            T.tvm_storage_sync("shared")  # the previous tile's readers are done
                            for e in T.unroll(EK):
                                if e * NT + tx < KC * D:
                                    jk: T.let[T.int32] = (e * NT + tx) // D
                                    dk: T.let[T.int32] = (e * NT + tx) % D
                                    blk: T.let[T.int32] = block_tables[seq, (j0 + jk) // BS]
                                    k_s[jk, dk] = T.Cast("float32", cache[blk, 0, kh, (j0 + jk) % BS, dk])
                                    v_s[jk, dk] = T.Cast("float32", cache[blk, 1, kh, (j0 + jk) % BS, dk])
                            T.tvm_storage_sync("shared")
                            for e in T.unroll(EQ):
                                if e * NT + tx < R * KC:
                                    rs: T.let[T.int32] = (e * NT + tx) // KC
                                    js: T.let[T.int32] = (e * NT + tx) % KC
                                    j: T.let[T.int32] = j0 + js
                                    pos: T.let[T.int32] = positions[tok0 + T.min(rs // G, count - 1)]
                                    if (rs // G < count and j <= pos and j >= pos - window + 1
                                            and j >= key0 and j < key0 + nkeys):
                                        ml[2] = T.float32(0)  # the dot product, in a register
                                        for dd in T.serial(D):
                                            ml[2] = ml[2] + q_s[rs, dd] * k_s[js, dd]
                                        p_s[rs, js] = ml[2]
                                    else:
                                        p_s[rs, js] = T.float32(NEG)
                            T.tvm_storage_sync("shared")
                            if tx < R:
                                ml[2] = ml[0]  # the old max
                                for jj in T.serial(KC):
                                    ml[0] = T.max(ml[0], p_s[tx, jj])
                                alpha[tx] = T.exp(ml[2] - ml[0])
                                ml[1] = ml[1] * T.exp(ml[2] - ml[0])
                                for jj in T.serial(KC):
                                    # a masked key (-3e38) weighs 0, also while the row has no key yet
                                    w: T.let[T.float32] = T.if_then_else(p_s[tx, jj] > T.float32(-1.0e38),
                                                                         T.exp(p_s[tx, jj] - ml[0]), T.float32(0))
                                    w_s[tx, jj] = w
                                    ml[1] = ml[1] + w
                            T.tvm_storage_sync("shared")
                            for e in T.unroll(ER):
                                if e * NT + tx < R * D:
                                    ra: T.let[T.int32] = (e * NT + tx) // D
                                    da: T.let[T.int32] = (e * NT + tx) % D
                                    acc[e] = acc[e] * alpha[ra]
                                    for jv in T.serial(KC):
                                        acc[e] = acc[e] + w_s[ra, jv] * v_s[jv, da]
                        T.tvm_storage_sync("shared")
                        for e in T.unroll(ER):
                            if e * NT + tx < R * D:
                                ro: T.let[T.int32] = (e * NT + tx) // D
                                if ro // G < count:
                                    part_acc[tok0 + ro // G, kh * G + ro % G, sp, (e * NT + tx) % D] = acc[e]
                        if tx < R:
                            if tx // G < count:
                                part_ml[tok0 + tx // G, kh * G + tx % G, sp, 0] = ml[0]
                                part_ml[tok0 + tx // G, kh * G + tx % G, sp, 1] = ml[1]

    return attention_split


def make_attention_merge_gpu(num_heads: int, head_dim: int, dtype: str):
    """PrimFunc ``attention_merge(part_acc[T,H,S,D], part_ml[T,H,S,2], out[T,H,D])``: one block per
    (token, head), a thread per output element: ``sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s``."""
    from tvm.script import tirx as T

    H, D = num_heads, head_dim
    NT = min(D, GPU_THREADS)

    @T.prim_func(private=True)
    def attention_merge(pa_h: T.handle, pm_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok, ns = T.int64(), T.int64()
        part_acc = T.match_buffer(pa_h, (ntok, H, ns, D), "float32")
        part_ml = T.match_buffer(pm_h, (ntok, H, ns, 2), "float32")
        out = T.match_buffer(o_h, (ntok, H, D), dtype)
        for th in T.thread_binding(ntok * H, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                st = T.alloc_buffer((3,), "float32", scope="local")  # max, denominator, numerator
                st[0] = T.float32(-3.0e38)
                for s in T.serial(ns):
                    st[0] = T.max(st[0], part_ml[th // H, th % H, s, 0])
                for d0 in T.serial((D + NT - 1) // NT):
                    if d0 * NT + tx < D:
                        st[1] = T.float32(0)
                        st[2] = T.float32(0)
                        for s in T.serial(ns):
                            w: T.let[T.float32] = T.exp(part_ml[th // H, th % H, s, 0] - st[0])
                            st[1] = st[1] + w * part_ml[th // H, th % H, s, 1]
                            st[2] = st[2] + w * part_acc[th // H, th % H, s, d0 * NT + tx]
                        out[th // H, th % H, d0 * NT + tx] = T.Cast(dtype, st[2] / st[1])

    return attention_merge


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

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

from . import dtype_bytes, mma_operand_type, zero_const
from .fast_math import exp_f32

KERNEL_KINDS = ("cpu", "gpu")


def _attention_params(num_heads: int, kv_heads: int, head_dim: int, sliding_window: int,
                      scale: float | None) -> tuple[int, float, int]:
    """``(group, softmax scale, window)`` of an attention kernel: the query heads per KV head (a
    ``ValueError`` unless they divide), ``scale`` or ``1/sqrt(head_dim)``, and the sliding window in
    positions (``1 << 30`` for none)."""
    if num_heads % kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of kv_heads ({kv_heads})")
    sm_scale = float(scale if scale is not None else 1.0 / math.sqrt(head_dim))
    return num_heads // kv_heads, sm_scale, int(sliding_window) if sliding_window > 0 else 1 << 30


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
    group, sm_scale, window = _attention_params(num_heads, kv_heads, head_dim, sliding_window, scale)
    H, KVH, D, BS = num_heads, kv_heads, head_dim, block_size

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
GPU_MAX_ROWS = 32  # query rows (tokens x grouped heads) per tile
SPLIT_KEYS = 64  # fewest keys per split worth a split of its own (4 key tiles)


def _find_tile_macro(tokens: int):
    """Macro ``(query_start, nbatch, tile, scan, info)`` for one thread: finds query tile ``tile`` when each
    sequence's tokens are cut into tiles of ``tokens``, numbered sequence by sequence. Sets ``scan[1]`` 1
    if it exists, ``scan[2]``/``scan[3]`` its first token and token count, and the shared ``info`` to
    ``(sequence, first token, tokens, 0, 0)``: all zeros for a tile past the end. ``scan`` is the
    caller's local int32[4]; shared memory is never read in a condition (TVM's sync planner rejects it)."""
    from tvm.script import tirx as T

    QT = tokens

    @T.macro
    def find_tile(query_start, nbatch, tile, scan, info):
        scan[0] = 0  # tiles of the sequences before b
        scan[1] = 0
        for i in T.serial(5):
            info[i] = 0
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

    return find_tile


def _tile_keys_macro(tokens: int, window: int, align: int = 1):
    """Macro ``(query_start, positions, nbatch, tile, scan, info)`` for one thread: ``_find_tile_macro``'s
    tile, then the keys its tokens attend, from its first token's window start (down to a multiple of
    ``align``) to its last token: the first in ``info[3]``, how many in ``info[4]``, and its first token's
    position in ``info[5]`` (``info``: shared int32[6])."""
    from tvm.script import tirx as T

    find_tile = _find_tile_macro(tokens)

    @T.macro
    def tile_keys(query_start, positions, nbatch, tile, scan, info):
        find_tile(query_start, nbatch, tile, scan, info)
        if scan[1] == 1:
            lo: T.let[T.int32] = T.max(positions[scan[2]] - window + 1, 0) // align * align
            info[3] = lo
            info[4] = positions[scan[2] + scan[3] - 1] + 1 - lo
            info[5] = positions[scan[2]]

    return tile_keys


def _cast_load_macro(dtype: str, cache_dtype: str):
    """Macro ``(dst, d0, cache, blk, kv, kh, slot, c0)``: ``dst[d0 .. d0+8]`` = the cache's ``[blk, kv, kh,
    slot, c0 .. c0+8]`` as ``dtype``, in loads of at most 16 bytes (the GPU verifier's widest vector: a
    float32 cache takes two)."""
    from tvm.script import tirx as T

    CV = min(8, 16 // dtype_bytes(cache_dtype))

    @T.macro
    def cast_load(dst, d0, cache, blk, kv, kh, slot, c0):
        for v0 in T.unroll(8 // CV):
            for v in T.vectorized(CV):
                dst[d0 + v0 * CV + v] = T.Cast(dtype, cache[blk, kv, kh, slot, c0 + v0 * CV + v])

    return cast_load


def _tiled_attention_func(heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: str, cache_dtype: str,
                          tile_tokens: int, head_blocks: int, threads: int, tile_keys, body):
    """PrimFunc ``(q[T,H,D], cache, positions[T], query_start[B+1], block_tables[B,M], out[T,H,D])`` of the
    tensor-core attentions: a grid of (query tiles of ``tile_tokens``, one per sequence more for the ragged
    ends) x ``head_blocks``, ``threads`` threads a block. Block ``x`` takes tile ``tiles - 1 - x``: the
    last tiles of a sequence, which attend to the most keys, start first and the short ones fill the tail
    (a causal prompt's work grows with its position). Thread 0 finds the block's tile and keys (macro
    ``tile_keys``: ``_tile_keys_macro``'s) into shared ``info``, then every thread runs macro ``body(q,
    cache, positions, block_tables, out, info, hy, tx)``."""
    from tvm.script import tirx as T

    H, KVH, D, BS, QT = heads, kv_heads, head_dim, block_size, tile_tokens

    @T.prim_func(private=True)
    def attention(q_h: T.handle, c_h: T.handle, p_h: T.handle, qs_h: T.handle, bt_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok, nb, nbatch, mb = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (ntok, H, D), dtype)
        cache = T.match_buffer(c_h, (nb, 2, KVH, BS, D), cache_dtype)
        positions = T.match_buffer(p_h, (ntok,), "int32")
        query_start = T.match_buffer(qs_h, (nbatch + 1,), "int32")
        block_tables = T.match_buffer(bt_h, (nbatch, mb), "int32")
        out = T.match_buffer(o_h, (ntok, H, D), dtype)
        for tile in T.thread_binding((ntok + QT - 1) // QT + nbatch, thread="blockIdx.x"):
            for hy in T.thread_binding(head_blocks, thread="blockIdx.y"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    info = T.alloc_buffer((6,), "int32", scope="shared")
                    scan = T.alloc_buffer((4,), "int32", scope="local")
                    if tx == 0:
                        tile_keys(query_start, positions, nbatch, (ntok + QT - 1) // QT + nbatch - 1 - tile, scan,
                                  info)
                    T.tvm_storage_sync("shared")
                    body(q, cache, positions, block_tables, out, info, hy, tx)

    return attention


def split_key_tile(rows: int, head_dim: int, stage_dtype: str, shared_bytes: int = 40 * 1024) -> int:
    """Keys per step of ``make_attention_gpu`` for a tile of ``rows`` query rows: the most of 64, 32, 16
    whose staged K and V (``stage_dtype``), queries, scores and weights fit ``shared_bytes`` (16 at
    least). With 40 KiB (CUDA) a decode tile (4 rows, 16-bit K/V of 128 wide heads) takes 64 keys per
    step, a whole split; a 32-row prefill tile 16."""
    e = dtype_bytes(stage_dtype)
    for kc in (64, 32, 16):
        need = (rows * head_dim * 4 + kc * (2 * head_dim * e + 8) + rows * (kc + 1) * 4 + kc * -(-rows // 4) * 16
                + 8 * rows * kc)
        if need <= shared_bytes:
            return kc
    return 16


def gpu_tile_tokens(num_heads: int, kv_heads: int, head_dim: int) -> int:
    """Query tokens per tile: a tile holds every query head of one KV head for these tokens, so each K/V
    element staged in shared memory serves ``tokens x group`` query rows (GQA-aware). At most 32 rows,
    fewer for wide heads (the staged queries stay within 16 KiB of shared memory)."""
    return max(1, min(GPU_MAX_ROWS, 4096 // head_dim) // (num_heads // kv_heads))


def gpu_num_splits(ntok, max_blocks, block_size: int):
    """Splits of each sequence's keys (a PrimExpr of the token count and the block-table width): enough
    for a few decode sequences over long contexts to fill the GPU, one once the batch has >= 64 tokens.
    On an H200 (Qwen3-4B heads, bench/gpu_kernels.py) 16 sequences of 2048 keys took 74 us at 4 splits
    against 84 at 16 (the cap was 256 // T), one sequence 14.4 us at 16 or 32 splits."""
    from tvm import tirx

    return _num_splits(ntok, max_blocks, block_size, tirx.max, tirx.min)


def gpu_num_splits_of(ntok: int, max_blocks: int, block_size: int) -> int:
    """``gpu_num_splits`` for known sizes, as an int (no TVM: the device machine's bench runs with the
    runtime-only library)."""
    return _num_splits(ntok, max_blocks, block_size, max, min)


def _num_splits(ntok, max_blocks, block_size: int, mx, mn):
    """The split rule over PrimExprs (``mx``, ``mn``: tirx's max and min) or ints (the builtins)."""
    by_keys = (max_blocks * block_size + SPLIT_KEYS - 1) // SPLIT_KEYS
    return mx(mn(by_keys, 64 // mx(ntok, 1)), 1)


def make_attention_gpu(
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: str,
    sliding_window: int = 0,
    scale: float | None = None,
    cache_dtype: str = "",
    tile_tokens: int = 0,
    max_lanes: int = 16,
    shared_bytes: int = 40 * 1024,
    pdl: str = "",
    merged: bool = False,
):
    """PrimFunc ``attention_split(q[T,H,D], cache, positions[T], query_start[B+1], block_tables[B,M],
    part_acc[T,H,S,D] f32, part_ml[T,H,S,2] f32)``: unnormalised partial attention per KV split.

    With ``merged`` (CUDA, one token a tile) its arguments are ``(q, cache, positions, query_start,
    block_tables, counters[T, KVH] int32, part_acc, part_ml, out[T,H,D])``, ``counters`` zeros in and out
    (in place): each split block, once its partials are written, fences them and counts itself on
    ``counters[token, kv head]`` (``atomicAdd``); the one that counts last merges the tile's splits into
    ``out`` as ``make_attention_merge_gpu`` does (``_merge_macro``) and sets the counter back to 0 for the
    next layer's kernel. The merge kernel, its launch and the gap before it go (one per decoder layer).

    Grid: (query tiles, KV heads, splits S), 128 threads. A tile is up to ``gpu_tile_tokens`` consecutive
    query tokens of one sequence with all ``group`` query heads of one KV head (tiles are numbered
    sequence by sequence; the grid allocates ``ceil(T / tokens) + B`` and the excess exits); ``tile_tokens``
    overrides that count (the decode entry points: 1, so a decode token's tile is its ``group`` rows and
    no thread works for rows that are not there). Split ``s`` covers key positions ``[s*C, (s+1)*C)``,
    ``C = ceil(M*block_size / S)`` rounded up to the key tile (``split_key_tile``: 64 keys for a decode
    tile, a whole split, so one round of loads). Per key tile:
    K and V are staged in shared memory in ``dtype`` (16-byte loads, coalesced, and vector stores: 8-byte
    K rows, padded by 8 bytes, and 16-byte V rows; keys past the split are zeros), each thread scores
    its (row, key) pairs from shared memory, all of one key (the key's K elements read once for them; at
    least 4 partial sums between them), the
    threads of each row (``128 / rows``, at most a tile's keys) update its online softmax together, and
    each thread rescales and accumulates its fixed ``rows*D/128`` output elements held in registers.
    Writes the running max and sum (``part_ml``) and the unnormalised output of every row and split; an
    empty split writes max ``-3e38``, sum 0. ``make_attention_merge_gpu`` combines the splits.
    ``max_lanes`` caps the vector width of loads (Metal: up to 4 elements), ``shared_bytes`` the shared
    memory the key tile is sized for (``split_key_tile``).

    The first key tile's block-table entries are read with the queries, before that tile's loop step (one
    dependent round trip fewer: a decode split is one tile). In the decode entry points (one token a tile) they
    are read earlier still, with the tile lookup's loads, on the guess that token ``t`` is sequence ``t``'s (a
    decode step's) and the split's first key its range's start: a decode split block then waits on one dependent
    round trip before issuing its key loads, where it waited on three (SASS), and the entries are re-read where
    the guess fails (a sequence with several tokens in the step, a window starting past the split's first tile).
    With ``pdl`` (CUDA sm_90, a programmatic dependent launch: ``ferrum_compiler.gpu_build``) the kernel waits
    for the one before it only after staging the first key tile's keys and values at positions before the
    sequence's first token of this step: the tile lookup, positions and block tables are the step's inputs,
    copied in before any kernel ran, and those cache rows were written by earlier steps (the kernel before this
    one, ``qkv_append``, writes this step's rows, which are staged after the wait, as are the queries). ``pdl``
    is FERRUM_PDL's mode: ``early`` lets the next kernel launch first thing (the launch pass adds that),
    ``late`` right after this kernel's wait.
    """
    import tvm
    from tvm.script import tirx as T

    G, sm_scale, window = _attention_params(num_heads, kv_heads, head_dim, sliding_window, scale)
    H, KVH, D, BS, NT = num_heads, kv_heads, head_dim, block_size, GPU_THREADS
    QT = tile_tokens or gpu_tile_tokens(num_heads, kv_heads, head_dim)
    R = QT * G  # query rows per tile
    cdtype = cache_dtype or dtype
    early = bool(pdl)  # the early reads and the wait after them
    late_trigger = pdl == "late"  # the next kernel let launch after that wait (FERRUM_PDL=late)
    SD = "float32" if dtype == "float32" else dtype  # K and V as staged in shared memory
    # a K row's padding: 8 bytes, so rows stay 8-byte aligned (8-byte stores, and loads in the scores' loop)
    # and the threads scoring neighbouring keys read different banks
    PK = 8 // dtype_bytes(SD)
    KC = split_key_tile(R, D, SD, shared_bytes)
    VEC = math.gcd(min(16 // dtype_bytes(cdtype), max_lanes), D)  # cache elements per (16-byte) load
    KU = math.gcd(PK, VEC)  # K elements a shared store (8 bytes; the V row takes all VEC at once)
    LR = min(KC, 1 << (NT // R).bit_length() - 1)  # threads per row in the softmax
    ER, EK, EQ = -(-R * D // NT), -(-KC * D // (NT * VEC)), -(-R * KC // NT)  # per-thread elements of each tile
    DP = math.gcd(D, 4)  # K elements a step of the scores' loop
    RW = -(-R // 4) * 4  # a key's row of softmax weights, padded to 16 bytes
    DQ = max(1, DP // EQ)  # partial sums per (row, key) pair in it
    assert NT % KC == 0, (NT, KC)  # a thread's pairs share their key
    assert not merged or QT == 1, "merged: one token a tile (its counter is the token's)"
    merge = _merge_macro()
    NEG = -3.0e38
    find_tile = _find_tile_macro(QT)
    NG = -(-KC // BS) + 1  # blocks a tile of KC keys from any position spans, at most

    def split_keys(mb, ns):
        """Keys of one split: the block table's keys over ``ns`` splits, rounded up to the key tile."""
        return ((T.Cast("int32", mb) * BS + T.Cast("int32", ns) - 1) // T.Cast("int32", ns) + KC - 1) // KC * KC

    @T.macro
    def load_key(cache, kv, e, blk, kh, j, dk):
        """Key position ``j`` (block ``blk``), columns ``dk...``: one 16-byte load of K and one of V into the
        thread's slot ``e`` (``store_key`` puts them in shared memory once all the tile's loads are out)."""
        for c in T.unroll(2):
            for i in T.vectorized(VEC):
                kv[e, c, i] = cache[blk, c, kh, j % BS, dk + i]

    @T.macro
    def store_key(kv, k_s, v_s, e, jk, dk):
        """Slot ``e``'s K and V into shared row ``jk``, columns ``dk...``: vector stores (element by element,
        a 16-byte chunk was 16 stores)."""
        for i0 in T.unroll(VEC // KU):
            for i in T.vectorized(KU):
                k_s[jk * (D + PK) + dk + i0 * KU + i] = T.Cast(SD, kv[e, 0, i0 * KU + i])
        for i in T.vectorized(VEC):
            v_s[jk, dk + i] = T.Cast(SD, kv[e, 1, i])

    @T.macro
    def tile_keys(info, positions, pos_first, pos_last, seq_first, mb, ns, sp):
        """``info[3:6]`` of a tile whose first and last tokens sit at positions ``pos_first`` and ``pos_last``:
        the keys it needs, from the first token's window start to the last token's position, clipped to
        split ``sp``'s range (first key, count), and with ``pdl`` the position of the sequence's first token
        of this step (token ``seq_first``)."""
        chunk: T.let[T.int32] = split_keys(mb, ns)
        lo: T.let[T.int32] = T.max(T.max(pos_first - window + 1, 0), T.Cast("int32", sp) * chunk)
        hi: T.let[T.int32] = T.min(pos_last + 1, (T.Cast("int32", sp) + 1) * chunk)
        info[3] = lo // KC * KC
        info[4] = T.max(hi - lo // KC * KC, 0)
        if early:
            info[5] = positions[seq_first]

    @T.macro
    def claim(info, positions, t1, b, nseq, qs0, qs1, pos_t, mb, ns, sp, guess, k0):
        """A one-token tile ``t1``: if sequence ``b`` (tokens ``qs0 .. qs1``) holds it, its bookkeeping, and
        whether the block-table entries read on a guess (sequence ``guess``, the split's first key ``k0``)
        are its.
        One test (not one on ``b`` enclosing one on its tokens: nvcc moved their loads into that branch)."""
        if b < nseq and qs0 <= t1 and t1 < qs1:
            info[0] = b
            info[1] = t1
            info[2] = 1
            tile_keys(info, positions, pos_t, pos_t, qs0, mb, ns, sp)
            # (the first key tile is the split's own unless the window starts past it)
            info[6] = T.Cast("int32", b == guess and pos_t - window + 1 < k0 + KC)

    @T.macro
    def body(q, cache, positions, query_start, block_tables, counters, part_acc, part_ml, out, ntok, nbatch, mb, ns):
        for tile in T.thread_binding((ntok + QT - 1) // QT + nbatch, thread="blockIdx.x"):
            for kh in T.thread_binding(KVH, thread="blockIdx.y"):
                for sp in T.thread_binding(ns, thread="blockIdx.z"):
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        q_s = T.alloc_buffer((R, D), "float32", scope="shared")
                        flag = T.alloc_buffer((1,), "int32", scope="shared")  # merged: splits done before
                        st = T.alloc_buffer((4,), "float32", scope="local")  # ... and the merge's sums
                        grp = T.alloc_buffer((3, MERGE_GROUP), "float32", scope="local")
                        # K rows padded by 8 bytes (PK), the scores' rows by one word: the threads scoring
                        # neighbouring keys (and the threads scanning neighbouring rows' scores) read
                        # different banks (flat: TVM would compact a 2-D buffer's never-read padding away)
                        k_s = T.alloc_buffer((KC * (D + PK),), SD, scope="shared")
                        v_s = T.alloc_buffer((KC, D), SD, scope="shared")
                        p_s = T.alloc_buffer((R * (KC + 1),), "float32", scope="shared")  # scores
                        # their softmax weights, key-major: a key's rows side by side (RW), which P V reads
                        # 16 bytes at a time
                        w_s = T.alloc_buffer((KC * RW,), "float32", scope="shared")
                        alpha = T.alloc_buffer((R,), "float32", scope="shared")  # each row's rescale
                        red_m = T.alloc_buffer((R * LR,), "float32", scope="shared")  # lanes' maxima
                        red_s = T.alloc_buffer((R * LR,), "float32", scope="shared")  # lanes' weight sums
                        sw = T.alloc_buffer((1,), "float32", scope="local")
                        dots = T.alloc_buffer((EQ * DQ,), "float32", scope="local")
                        # a key tile's loads of K and V, all issued before the first is stored: a store
                        # between them made each load wait for the one before (EK round trips a tile in SASS)
                        kv = T.alloc_buffer((EK, 2, VEC), cdtype, scope="local")
                        # the LR threads of row r (tx // LR) each keep its running max and the first its
                        # sum; a branch never writes shared memory it then reads (TVM would want a barrier
                        # inside the branch)
                        ml = T.alloc_buffer((3,), "float32", scope="local")  # max, sum, scratch
                        # sequence, first token, tokens (0: no such tile), first key, keys, and with pdl the
                        # position of the sequence's first token of this step (the rows written this step)
                        # ... and 1 where the block-table entries read on a guess (btg) are the tile's
                        info = T.alloc_buffer((7,), "int32", scope="shared")
                        btg = T.alloc_buffer((NG,), "int32", scope="shared")
                        acc = T.alloc_buffer((ER,), "float32", scope="local")
                        scan = T.alloc_buffer((4,), "int32", scope="local")  # tiles before b, found, ...
                        bt0 = T.alloc_buffer((EK,), "int32", scope="local")  # the key tile's blocks
                        if QT == 1:
                            # a decode tile is one token: tile t is token t. Thread i checks whether it is
                            # sequence i's and, if so, fills info; its loads and the token's position go out
                            # together, before any test (one round trip, where one thread walking the
                            # sequences took one every few of them); thread 0 zeroes a tile past them
                            # The first NT sequences' bounds are loaded outside any loop (clamped, so
                            # always in range): inside one, ptxas computed from the position before the
                            # loop and so waited for it before issuing them (two round trips in SASS)
                            t1: T.let[T.int32] = T.Cast("int32", tile)
                            nseq: T.let[T.int32] = T.Cast("int32", nbatch)
                            # In a decode step token t is sequence t's, and a split's first key is its
                            # range's start (no window): the first key tile's block-table entries are read
                            # on that guess with the lookup's loads, parked in shared memory (one round trip
                            # fewer before the keys when it holds; the tile reads them again when not)
                            guess: T.let[T.int32] = T.max(T.min(t1, nseq - 1), 0)
                            k0: T.let[T.int32] = T.Cast("int32", sp) * split_keys(mb, ns)
                            g0: T.let[T.int32] = k0 // BS
                            bg: T.let[T.int32] = block_tables[guess, T.min(g0 + T.min(tx, NG - 1),
                                                                           T.Cast("int32", mb) - 1)]
                            qa: T.let[T.int32] = query_start[T.min(tx, nseq)]
                            qb: T.let[T.int32] = query_start[T.min(tx + 1, nseq)]
                            end: T.let[T.int32] = query_start[nbatch]
                            pos_t: T.let[T.int32] = positions[T.min(t1, T.Cast("int32", ntok) - 1)]
                            claim(info, positions, t1, tx, nseq, qa, qb, pos_t, mb, ns, sp, guess, k0)
                            btg[T.min(tx, NG - 1)] = bg  # (no branch: threads past NG - 1 store its value again)
                            for i in T.serial(1, (nseq + NT - 1) // NT):  # more sequences than threads
                                if i * NT + tx < nseq:
                                    b: T.let[T.int32] = i * NT + tx
                                    claim(info, positions, t1, b, nseq, query_start[b], query_start[b + 1], pos_t, mb,
                                          ns, sp, guess, k0)
                            if tx == 0:
                                if t1 >= end:
                                    for i in T.serial(7):
                                        info[i] = 0
                        else:
                            if tx == 0:
                                find_tile(query_start, nbatch, tile, scan, info)
                                info[6] = 0
                                if early:
                                    info[5] = 0
                                if scan[1] == 1:
                                    tile_keys(info, positions, positions[scan[2]], positions[scan[2] + scan[3] - 1],
                                              scan[2] - (T.Cast("int32", tile) - scan[0]) * QT, mb, ns, sp)
                        T.tvm_storage_sync("shared")
                        # no early exit: TVM plans barriers outside conditions only, so an absent tile
                        # (count 0) runs zero key tiles and writes nothing
                        count: T.let[T.int32] = info[2]  # tokens in this tile; 0: no such tile
                        seq: T.let[T.int32] = info[0]
                        tok0: T.let[T.int32] = info[1]
                        key0: T.let[T.int32] = info[3]
                        nkeys: T.let[T.int32] = info[4]
                        fresh: T.let[T.int32] = info[5] if early else 0  # keys from here on: written this step
                        guessed: T.let[T.int32] = info[6]
                        for e in T.unroll(EK):
                            bt0[e] = 0
                            if (e * NT + tx) * VEC < KC * D:
                                if (e * NT + tx) * VEC // D < nkeys:
                                    if guessed == 1:
                                        bt0[e] = btg[(key0 + (e * NT + tx) * VEC // D) // BS - key0 // BS]
                                    else:
                                        bt0[e] = block_tables[seq, (key0 + (e * NT + tx) * VEC // D) // BS]
                        if early:  # everything above read the step's inputs only; the first key tile's rows
                            # written before this step are staged, then the wait
                            for e in T.unroll(EK):
                                if (e * NT + tx) * VEC < KC * D:
                                    jp: T.let[T.int32] = (e * NT + tx) * VEC // D
                                    if jp < nkeys and key0 + jp < fresh:
                                        load_key(cache, kv, e, bt0[e], kh, key0 + jp, (e * NT + tx) * VEC % D)
                            for e in T.unroll(EK):
                                if (e * NT + tx) * VEC < KC * D:
                                    js0: T.let[T.int32] = (e * NT + tx) * VEC // D
                                    if js0 < nkeys and key0 + js0 < fresh:
                                        store_key(kv, k_s, v_s, e, js0, (e * NT + tx) * VEC % D)
                            T.ptx.griddepcontrol.wait()
                            if late_trigger:
                                T.ptx.griddepcontrol.launch_dependents()
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
                        ml[0] = T.float32(NEG)
                        ml[1] = T.float32(0)
                        for kt in T.serial((nkeys + KC - 1) // KC):
                            j0: T.let[T.int32] = key0 + kt * KC
                            T.tvm_storage_sync("shared")  # the previous tile's readers are done
                            # 16-byte loads; keys past the split's end are zeros. The tile's block-table
                            # entries first (the first tile's were read with the queries), then every load,
                            # then the stores: one round trip each, whatever the tile's size
                            for e in T.unroll(EK):
                                if kt > 0 and (e * NT + tx) * VEC < KC * D:
                                    if j0 + (e * NT + tx) * VEC // D < key0 + nkeys:
                                        bt0[e] = block_tables[seq, (j0 + (e * NT + tx) * VEC // D) // BS]
                            for e in T.unroll(EK):
                                if (e * NT + tx) * VEC < KC * D:
                                    jk: T.let[T.int32] = (e * NT + tx) * VEC // D
                                    # (early: the first tile's older rows were staged before the wait)
                                    if j0 + jk < key0 + nkeys and (not early or kt > 0 or j0 + jk >= fresh):
                                        load_key(cache, kv, e, bt0[e], kh, j0 + jk, (e * NT + tx) * VEC % D)
                            for e in T.unroll(EK):
                                if (e * NT + tx) * VEC < KC * D:
                                    jk2: T.let[T.int32] = (e * NT + tx) * VEC // D
                                    dk: T.let[T.int32] = (e * NT + tx) * VEC % D
                                    if j0 + jk2 < key0 + nkeys:
                                        if not early or kt > 0 or j0 + jk2 >= fresh:
                                            store_key(kv, k_s, v_s, e, jk2, dk)
                                    else:
                                        for i0 in T.unroll(VEC // KU):
                                            for i in T.vectorized(KU):
                                                k_s[jk2 * (D + PK) + dk + i0 * KU + i] = T.Cast(SD, T.float32(0))
                                        for i in T.vectorized(VEC):
                                            v_s[jk2, dk + i] = T.Cast(SD, T.float32(0))
                            T.tvm_storage_sync("shared")
                            # the thread's EQ (row, key) pairs share key tx % KC (KC divides NT): each element
                            # of that key's K row is read once for all of them; each row's dot product in DQ
                            # interleaved partial sums (EQ x DQ chains)
                            js: T.let[T.int32] = tx % KC
                            for e in T.unroll(EQ * DQ):
                                dots[e] = T.float32(0)
                            for d0 in T.serial(D // DP):
                                for i in T.unroll(DP):
                                    for e in T.unroll(EQ):  # (a pair past the tile reads the last row)
                                        dots[e * DQ + i % DQ] = dots[e * DQ + i % DQ] + q_s[
                                            T.min((e * NT + tx) // KC, R - 1), d0 * DP + i] * T.Cast(
                                            "float32", k_s[js * (D + PK) + d0 * DP + i])
                            for e in T.unroll(EQ):
                                if e * NT + tx < R * KC:
                                    rs: T.let[T.int32] = (e * NT + tx) // KC
                                    j: T.let[T.int32] = j0 + js
                                    pos: T.let[T.int32] = positions[tok0 + T.min(rs // G, count - 1)]
                                    if (rs // G < count and j <= pos and j >= pos - window + 1
                                            and j >= key0 and j < key0 + nkeys):
                                        ml[2] = T.float32(0)
                                        for i in T.unroll(DQ):
                                            ml[2] = ml[2] + dots[e * DQ + i]
                                        p_s[rs * (KC + 1) + js] = ml[2]
                                    else:
                                        p_s[rs * (KC + 1) + js] = T.float32(NEG)
                            T.tvm_storage_sync("shared")
                            # the online softmax, LR threads per row, each over keys lane, lane + LR, ...
                            rw: T.let[T.int32] = tx // LR  # this thread's row (past the last: none)
                            ln: T.let[T.int32] = tx % LR
                            if rw < R:
                                ml[2] = T.float32(NEG)
                                for jj in T.unroll(KC // LR):
                                    ml[2] = T.max(ml[2], p_s[rw * (KC + 1) + jj * LR + ln])
                                red_m[tx] = ml[2]
                            T.tvm_storage_sync("shared")
                            if rw < R:
                                ml[2] = ml[0]  # the old max
                                for i in T.unroll(LR):
                                    ml[0] = T.max(ml[0], red_m[rw * LR + i])
                                if ln == 0:
                                    alpha[rw] = T.exp(ml[2] - ml[0])
                                ml[2] = T.exp(ml[2] - ml[0])  # this row's rescale, for the sum
                                sw[0] = T.float32(0)
                                for jj in T.unroll(KC // LR):
                                    # a masked key (-3e38) weighs 0, also while the row has no key yet
                                    w: T.let[T.float32] = T.if_then_else(
                                        p_s[rw * (KC + 1) + jj * LR + ln] > T.float32(-1.0e38),
                                        T.exp(p_s[rw * (KC + 1) + jj * LR + ln] - ml[0]), T.float32(0))
                                    w_s[(jj * LR + ln) * RW + rw] = w
                                    sw[0] = sw[0] + w
                                red_s[tx] = sw[0]
                            T.tvm_storage_sync("shared")
                            if rw < R and ln == 0:
                                ml[1] = ml[1] * ml[2]
                                for i in T.unroll(LR):
                                    ml[1] = ml[1] + red_s[rw * LR + i]
                            for e in T.unroll(ER):
                                if e * NT + tx < R * D:
                                    acc[e] = acc[e] * alpha[(e * NT + tx) // D]
                            # keys outer: a key's V element is read once for the thread's ER outputs (one
                            # column of ER rows when D divides the block), and their ER sums interleave
                            # (keys inner, each output was its own chain over the keys, re-reading V)
                            for jv in T.serial(KC):
                                for e in T.unroll(ER):
                                    if e * NT + tx < R * D:
                                        acc[e] = acc[e] + w_s[jv * RW + (e * NT + tx) // D] * T.Cast(
                                            "float32", v_s[jv, (e * NT + tx) % D])
                        T.tvm_storage_sync("shared")
                        for e in T.unroll(ER):
                            if e * NT + tx < R * D:
                                ro: T.let[T.int32] = (e * NT + tx) // D
                                if ro // G < count:
                                    part_acc[tok0 + ro // G, kh * G + ro % G, sp, (e * NT + tx) % D] = acc[e]
                        if tx // LR < R and tx % LR == 0:
                            if tx // LR // G < count:
                                part_ml[tok0 + tx // LR // G, kh * G + tx // LR % G, sp, 0] = ml[0]
                                part_ml[tok0 + tx // LR // G, kh * G + tx // LR % G, sp, 1] = ml[1]
                        if merged:  # the tile's last split to finish merges them all (threadFenceReduction)
                            T.evaluate(T.call_extern("void", "__threadfence"))  # this thread's partials out
                            T.tvm_storage_sync("shared")
                            if tx == 0:
                                flag[0] = -1
                                if count > 0:
                                    flag[0] = T.call_extern("int32", "atomicAdd", T.address_of(counters[tok0, kh]),
                                                            1)
                            T.tvm_storage_sync("shared")
                            arrived: T.let[T.int32] = flag[0]
                            if arrived == T.Cast("int32", ns) - 1:
                                T.evaluate(T.call_extern("void", "__threadfence"))
                                for e in T.unroll(ER):
                                    if e * NT + tx < R * D:
                                        rm: T.let[T.int32] = (e * NT + tx) // D
                                        if rm // G < count:
                                            merge(part_acc, part_ml, tok0 + rm // G, kh * G + rm % G, (e * NT + tx) % D,
                                                  ns, st, grp)
                                            out[tok0 + rm // G, kh * G + rm % G, (e * NT + tx) % D] = T.Cast(
                                                dtype, st[2] / st[1])
                                if tx == 0:  # for the next layer's kernel
                                    counters[tok0, kh] = 0

    # one signature for both forms; without ``merged`` the counters and the output are dropped below
    @T.prim_func(private=True)
    def attention_split(q_h: T.handle, c_h: T.handle, p_h: T.handle, qs_h: T.handle, bt_h: T.handle,
                        n_h: T.handle, pa_h: T.handle, pm_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok, nb, nbatch, mb, ns = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (ntok, H, D), dtype)
        cache = T.match_buffer(c_h, (nb, 2, KVH, BS, D), cdtype)
        positions = T.match_buffer(p_h, (ntok,), "int32")
        query_start = T.match_buffer(qs_h, (nbatch + 1,), "int32")
        block_tables = T.match_buffer(bt_h, (nbatch, mb), "int32")
        counters = T.match_buffer(n_h, (ntok, KVH), "int32")
        part_acc = T.match_buffer(pa_h, (ntok, H, ns, D), "float32")
        part_ml = T.match_buffer(pm_h, (ntok, H, ns, 2), "float32")
        out = T.match_buffer(o_h, (ntok, H, D), dtype)
        body(q, cache, positions, query_start, block_tables, counters, part_acc, part_ml, out, ntok, nbatch, mb, ns)

    if merged:
        return attention_split
    q_h, c_h, p_h, qs_h, bt_h, _, pa_h, pm_h, _ = attention_split.params
    return tvm.tirx.PrimFunc([q_h, c_h, p_h, qs_h, bt_h, pa_h, pm_h], attention_split.body, attention_split.ret_type,
                             attention_split.attrs)


# Tensor-core prefill attention (CUDA): 4 warps, 64 query rows per block, 32 keys per step
TC_WARPS = 4
TC_KEYS = 32
TC_SHARED_BYTES = 48 * 1024


def tc_heads_per_tile(num_heads: int, kv_heads: int) -> int:
    """Query heads of one KV head a tensor-core tile holds: the largest of 4, 2, 1 dividing the group."""
    group = num_heads // kv_heads
    return next(h for h in (4, 2, 1) if group % h == 0)


def tc_shared_bytes(head_dim: int, dtype: str) -> int:
    """Shared memory of ``make_prefill_attention_tc``'s block: queries, padded K and V tiles, f32 scores,
    the softmax weights, the row statistics' exchange and the tile's bookkeeping."""
    e = dtype_bytes(dtype)
    rows = 16 * TC_WARPS
    return (rows * head_dim * e + 2 * TC_KEYS * (head_dim + 8) * e + rows * (TC_KEYS + 4) * 4
            + rows * (TC_KEYS + 8) * e + 32 * TC_WARPS * 4 + 6 * 4)


def tc_attention_fits(head_dim: int, dtype: str) -> bool:
    """Whether ``make_prefill_attention_tc`` builds for this head size: a multiple of 16 whose tiles fit
    48 KiB of shared memory (head_dim <= 128 in float16)."""
    return head_dim % 16 == 0 and tc_shared_bytes(head_dim, dtype) <= TC_SHARED_BYTES


def make_prefill_attention_tc(
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: str,
    sliding_window: int = 0,
    scale: float | None = None,
    cache_dtype: str = "",
):
    """PrimFunc ``attention_tc(q[T,H,D], cache, positions[T], query_start[B+1], block_tables[B,M],
    out[T,H,D])``: ragged causal attention with both products on tensor cores (wmma 16x16x16, float32
    accumulators). For ``forward`` (prefill): a batch of decode tokens fills a tile with one row in 16.

    Grid: (query tiles, KV heads x head groups), 4 warps. A tile is ``HG`` query heads of one KV head
    (``tc_heads_per_tile``) over ``64 / HG`` consecutive tokens of one sequence; warp ``w`` owns 16 rows:
    head ``w % HG`` of 16 tokens, so every K and V tile staged in shared memory serves all 64 rows
    (GQA-aware). Tiles are numbered sequence by sequence as in ``make_attention_gpu`` and launched last
    first (``_tiled_attention_func``).

    wmma fragments are opaque, so the running output cannot be rescaled per row as the online softmax
    wants. Instead two passes over the keys: the first computes each row's max and softmax denominator
    (S = Q K^T on tensor cores; two threads per row, 16 keys each, combined through shared memory); the
    second recomputes S, turns it into the final weights ``exp(s - max) / sum`` (rounded to ``dtype``)
    and accumulates ``P V`` on tensor cores. Q K^T runs twice: 1.5x the products of one pass, still far fewer cycles
    than CUDA cores. The output leaves through shared memory one 16x16 tile per warp at a time.

    ``dtype`` float32 builds exist for the CPU emulator only (tests/gpu_emu.py); the GPU has no float32
    wmma. ``head_dim`` must satisfy ``tc_attention_fits``.
    """
    from tvm.script import tirx as T

    G, sm_scale, window = _attention_params(num_heads, kv_heads, head_dim, sliding_window, scale)
    if not tc_attention_fits(head_dim, dtype):
        raise ValueError(f"head_dim {head_dim} ({dtype}) does not fit the tensor-core attention tile")
    H, KVH, D, BS = num_heads, kv_heads, head_dim, block_size
    HG = tc_heads_per_tile(num_heads, kv_heads)
    NG = G // HG  # head groups per KV head
    W, KT = TC_WARPS, TC_KEYS
    NT, R = 32 * W, 16 * W  # threads, query rows
    QT = 16 * (W // HG)  # tokens per tile
    DF = D // 16
    LK, LS, LP = D + 8, KT + 4, KT + 8  # padded row strides of the K/V, score and weight tiles
    NEG = -3.0e38
    cdtype = cache_dtype or dtype
    tile_keys = _tile_keys_macro(QT, window)
    ZERO = zero_const(dtype)
    EC = (KT * D // 8 + NT - 1) // NT  # 16-byte chunks of a K (V) tile per thread
    CV = min(8, 16 // dtype_bytes(cdtype))  # cache elements per load

    @T.macro
    def scores(q_f, k_f, s_f, k_s, s_s, w):
        """S = Q K^T of this warp's 16 rows and the staged keys, into its rows of ``s_s``."""
        for jf in T.serial(KT // 16):
            T.tvm_fill_fragment(s_f.data, 16, 16, 16, jf, T.float32(0))
        for kk in T.serial(DF):
            for jf in T.serial(KT // 16):
                T.tvm_load_matrix_sync(k_f.data, 16, 16, 16, 0, k_s.access_ptr("r", offset=jf * 16 * LK + kk * 16),
                                       LK, "col_major")
                T.tvm_mma_sync(s_f.data, jf, q_f.data, kk, k_f.data, 0, s_f.data, jf)
        for jf in T.serial(KT // 16):
            T.tvm_store_matrix_sync(s_f.data, 16, 16, 16, jf, s_s.access_ptr("w", offset=w * 16 * LS + jf * 16),
                                    LS, "row_major")

    def stager(kinds: int):
        """Macro ``(cache, block_tables, k_s, v_s, blk, raw, seq, kh, j0, end, tx)``: keys (and, with
        ``kinds`` 2, values) ``j0 .. j0+KT`` of sequence ``seq`` into ``k_s`` (``v_s``); zeros past ``end``
        (a weight 0 times garbage could be NaN). A thread's chunks (8 consecutive elements, 16 bytes) in
        three rounds: their block-table entries (``blk``), all their loads (into ``raw``), the stores. One
        chunk after another, each store waited for its load and each load for its block-table entry: 8
        dependent round trips a step in pass 1 and 16 in pass 2 in SASS (2026-11-27)."""
        @T.macro
        def stage(cache, block_tables, k_s, v_s, blk, raw, seq, kh, j0, end, tx):
            for e in T.unroll(EC):
                if e * NT + tx < KT * D // 8:
                    if j0 + (e * NT + tx) // (D // 8) < end:
                        blk[e] = block_tables[seq, (j0 + (e * NT + tx) // (D // 8)) // BS]
            for e in T.unroll(EC):
                if e * NT + tx < KT * D // 8:
                    jk: T.let[T.int32] = (e * NT + tx) // (D // 8)
                    if j0 + jk < end:
                        for c in T.unroll(kinds):
                            for v0 in T.unroll(8 // CV):  # loads of at most 16 bytes (a float32 cache: 2)
                                for v in T.vectorized(CV):
                                    raw[e, c, v0 * CV + v] = cache[blk[e], c, kh, (j0 + jk) % BS,
                                                                   (e * NT + tx) % (D // 8) * 8 + v0 * CV + v]
            for e in T.unroll(EC):
                if e * NT + tx < KT * D // 8:
                    jk2: T.let[T.int32] = (e * NT + tx) // (D // 8)
                    dk: T.let[T.int32] = (e * NT + tx) % (D // 8) * 8
                    if j0 + jk2 < end:
                        for v0 in T.unroll(8 // CV):
                            for v in T.vectorized(CV):
                                k_s[jk2 * LK + dk + v0 * CV + v] = T.Cast(dtype, raw[e, 0, v0 * CV + v])
                        if kinds == 2:
                            for v0 in T.unroll(8 // CV):
                                for v in T.vectorized(CV):
                                    v_s[jk2 * LK + dk + v0 * CV + v] = T.Cast(dtype, raw[e, 1, v0 * CV + v])
                    else:  # element by element: TVM's OpenCL bfloat16 pass cannot store a vector constant
                        for v in T.unroll(8):
                            k_s[jk2 * LK + dk + v] = ZERO
                            if kinds == 2:
                                v_s[jk2 * LK + dk + v] = ZERO

        return stage

    stage_k, stage_kv = stager(1), stager(2)

    @T.macro
    def body(q, cache, positions, block_tables, out, info, hy, tx):
        q_s = T.alloc_buffer((R * D,), dtype, scope="shared")
        k_s = T.alloc_buffer((KT * LK,), dtype, scope="shared")
        v_s = T.alloc_buffer((KT * LK,), dtype, scope="shared")
        s_s = T.alloc_buffer((R * LS,), "float32", scope="shared")
        p_s = T.alloc_buffer((R * LP,), dtype, scope="shared")
        q_f = T.alloc_buffer((DF * 256,), dtype, scope="wmma.matrix_a")
        p_f = T.alloc_buffer((KT // 16 * 256,), dtype, scope="wmma.matrix_a")
        k_f = T.alloc_buffer((256,), dtype, scope="wmma.matrix_b")
        v_f = T.alloc_buffer((256,), dtype, scope="wmma.matrix_b")
        s_f = T.alloc_buffer((KT // 16 * 256,), "float32", scope="wmma.accumulator")
        o_f = T.alloc_buffer((DF * 256,), "float32", scope="wmma.accumulator")
        # thread tx keeps row tx % 64's statistics (both its threads alike) and works on
        # half tx // 64 of each key tile; they combine their halves through part
        part = T.alloc_buffer((NT,), "float32", scope="shared")
        ml = T.alloc_buffer((4,), "float32", scope="local")  # row max, sum, old max, this half's
        row = T.alloc_buffer((2,), "int32", scope="local")  # row's token in the tile, position
        blk = T.alloc_buffer((EC,), "int32", scope="local")  # a step's chunks' blocks and loads (stage)
        raw = T.alloc_buffer((EC, 2, 8), cdtype, scope="local")
        kh: T.let[T.int32] = T.Cast("int32", hy) // NG
        h0: T.let[T.int32] = kh * G + T.Cast("int32", hy) % NG * HG  # the tile's first head
        w: T.let[T.int32] = T.Cast("int32", tx) // 32
        count: T.let[T.int32] = info[2]  # 0: no such tile (it runs no key tile, writes nothing)
        seq: T.let[T.int32] = info[0]
        tok0: T.let[T.int32] = info[1]
        key0: T.let[T.int32] = info[3]
        nkeys: T.let[T.int32] = info[4]
        # queries: row r = warp * 16 + i is head h0 + warp % HG of token warp // HG * 16 + i
        for e in T.serial(R * D // 8 // NT):  # 8 consecutive elements per thread
            r: T.let[T.int32] = (e * NT + tx) // (D // 8)
            dq: T.let[T.int32] = (e * NT + tx) % (D // 8) * 8
            t: T.let[T.int32] = (r // 16) // HG * 16 + r % 16
            if t < count:
                for v in T.vectorized(8):
                    q_s[r * D + dq + v] = q[tok0 + t, h0 + (r // 16) % HG, dq + v]
            else:
                for v in T.unroll(8):
                    q_s[r * D + dq + v] = ZERO
        rr: T.let[T.int32] = T.Cast("int32", tx) % R  # this thread's row
        c0: T.let[T.int32] = T.Cast("int32", tx) // R * (KT // 2)  # and its half of the columns
        row[0] = rr // 16 // HG * 16 + rr % 16
        row[1] = positions[tok0 + T.min(row[0], T.max(count, 1) - 1)]
        ml[0] = T.float32(NEG)
        ml[1] = T.float32(0)
        T.tvm_storage_sync("shared")
        for kk in T.serial(DF):
            T.tvm_load_matrix_sync(q_f.data, 16, 16, 16, kk,
                                   q_s.access_ptr("r", offset=w * 16 * D + kk * 16), D, "row_major")
        for kt in T.serial((nkeys + KT - 1) // KT):  # pass 1: row max and denominator
            T.tvm_storage_sync("shared")
            stage_k(cache, block_tables, k_s, v_s, blk, raw, seq, kh, key0 + kt * KT, key0 + nkeys, tx)
            T.tvm_storage_sync("shared")
            scores(q_f, k_f, s_f, k_s, s_s, w)
            T.tvm_storage_sync("shared")
            ml[2] = ml[0]
            ml[3] = T.float32(NEG)
            for jr in T.serial(KT // 2):  # rotated by the row: no shared-memory bank conflicts
                jj: T.let[T.int32] = c0 + (jr + rr) % (KT // 2)
                j: T.let[T.int32] = key0 + kt * KT + jj
                if row[0] < count and j <= row[1] and j >= row[1] - window + 1:
                    ml[3] = T.max(ml[3], s_s[rr * LS + jj] * T.float32(sm_scale))
            part[tx] = ml[3]
            T.tvm_storage_sync("shared")
            ml[0] = T.max(ml[0], T.max(part[rr], part[R + rr]))
            ml[3] = T.float32(0)
            for jr in T.serial(KT // 2):
                jj2: T.let[T.int32] = c0 + (jr + rr) % (KT // 2)
                j2: T.let[T.int32] = key0 + kt * KT + jj2
                if row[0] < count and j2 <= row[1] and j2 >= row[1] - window + 1:
                    ml[3] = ml[3] + T.exp(s_s[rr * LS + jj2] * T.float32(sm_scale) - ml[0])
            T.tvm_storage_sync("shared")  # both maxima read
            part[tx] = ml[3]
            T.tvm_storage_sync("shared")
            ml[1] = ml[1] * T.exp(ml[2] - ml[0]) + part[rr] + part[R + rr]
        for df in T.serial(DF):
            T.tvm_fill_fragment(o_f.data, 16, 16, 16, df, T.float32(0))
        for kt in T.serial((nkeys + KT - 1) // KT):  # pass 2: final weights, P V
            T.tvm_storage_sync("shared")
            stage_kv(cache, block_tables, k_s, v_s, blk, raw, seq, kh, key0 + kt * KT, key0 + nkeys, tx)
            T.tvm_storage_sync("shared")
            scores(q_f, k_f, s_f, k_s, s_s, w)
            T.tvm_storage_sync("shared")
            for jr in T.serial(KT // 2):
                jj3: T.let[T.int32] = c0 + (jr + rr) % (KT // 2)
                j3: T.let[T.int32] = key0 + kt * KT + jj3
                if row[0] < count and j3 <= row[1] and j3 >= row[1] - window + 1:
                    p_s[rr * LP + jj3] = T.Cast(dtype, T.exp(s_s[rr * LS + jj3] * T.float32(sm_scale)
                                                            - ml[0]) / ml[1])
                else:
                    p_s[rr * LP + jj3] = ZERO
            T.tvm_storage_sync("shared")
            for jf in T.serial(KT // 16):
                T.tvm_load_matrix_sync(p_f.data, 16, 16, 16, jf,
                                       p_s.access_ptr("r", offset=w * 16 * LP + jf * 16), LP, "row_major")
            for df in T.serial(DF):
                for jf in T.serial(KT // 16):
                    T.tvm_load_matrix_sync(v_f.data, 16, 16, 16, 0,
                                           v_s.access_ptr("r", offset=jf * 16 * LK + df * 16), LK,
                                           "row_major")
                    T.tvm_mma_sync(o_f.data, df, p_f.data, jf, v_f.data, 0, o_f.data, df)
        for df in T.serial(DF):  # out, one 16x16 tile per warp at a time through s_s
            T.tvm_storage_sync("shared")
            T.tvm_store_matrix_sync(o_f.data, 16, 16, 16, df, s_s.access_ptr("w", offset=w * 16 * LS),
                                    LS, "row_major")
            T.tvm_storage_sync("shared")
            for e in T.serial(R * 16 // NT):
                ro: T.let[T.int32] = (e * NT + tx) // 16
                to: T.let[T.int32] = (ro // 16) // HG * 16 + ro % 16
                if to < count:
                    out[tok0 + to, h0 + (ro // 16) % HG, df * 16 + (e * NT + tx) % 16] = T.Cast(
                        dtype, s_s[ro * LS + (e * NT + tx) % 16])

    return _tiled_attention_func(H, KVH, D, BS, dtype, cdtype, QT, KVH * NG, NT, tile_keys, body)


# Single-pass prefill attention on mma.sync (CUDA sm_80+): 4 warps, 64 query rows, 64 keys per step (or 32)
FA_WARPS = 4
FA_KEYS = 64
FA_SHARED_BYTES = 48 * 1024


def _fa_strides(head_dim: int, keys: int = FA_KEYS) -> tuple[int, int]:
    """Row strides (elements) of ``make_prefill_attention_mma``'s staged K tile ``[key][d]`` and transposed V
    tile ``[d][key]``: 16-byte aligned and 64 bytes more than a multiple of 128, so the two rows a quarter
    warp's 16-byte fragment loads touch (64 bytes each) cover the 32 banks once."""
    return head_dim + (32 - head_dim) % 64, keys + (32 - keys) % 64


def fa_shared_bytes(head_dim: int, keys: int = FA_KEYS) -> int:
    """Shared memory of ``make_prefill_attention_mma``'s block: the staged K and V^T tiles (16-bit) and the
    tile's bookkeeping."""
    lk, lv = _fa_strides(head_dim, keys)
    return 2 * (keys * lk + head_dim * lv) + 6 * 4


def fa_attention_fits(head_dim: int, dtype: str) -> bool:
    """Whether ``make_prefill_attention_mma`` builds: float16 or bfloat16, and a head size of 32, 64 or 128 (a
    multiple of the 32-column step whose 16-byte chunks split the block's threads evenly, within 48 KiB of
    shared memory)."""
    return (dtype in ("float16", "bfloat16") and head_dim in (32, 64, 128)
            and fa_shared_bytes(head_dim) <= FA_SHARED_BYTES)


def make_prefill_attention_mma(
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: str,
    sliding_window: int = 0,
    scale: float | None = None,
    cache_dtype: str = "",
    keys: int = FA_KEYS,
):
    """PrimFunc ``attention_fa(q[T,H,D], cache, positions[T], query_start[B+1], block_tables[B,M],
    out[T,H,D])``, as ``make_prefill_attention_tc`` computes, in one pass over the keys with the scores,
    softmax and output in registers (flash attention's online softmax): ``mma.sync.m16n8k16`` with float32
    accumulators for ``S = Q K^T`` and ``O += P V``.

    Tiles as ``make_prefill_attention_tc``'s: ``HG`` query heads of one KV head over ``64 / HG`` tokens of
    one sequence, warp ``w`` 16 rows (head ``w % HG``), each staged K and V tile serving all 64 rows. Per
    step of 64 keys the block stages K as ``[key][d]`` and V transposed, ``[d][key]``, then two barriers
    and nothing else shared: a warp's 16x64 scores are 8 accumulator fragments, each row's running max
    and sum are kept by the 4 lanes that hold it (the max combined over them with two shuffles per step,
    the sum once at the end), the weights become the A operand of ``P V`` in place.

    Lane ``l`` (``g = l // 4``, ``c = l % 4``) holds rows ``g`` and ``g + 8``. As in
    ``mma_linear.make_mma_linear_gpu``, a sum's terms may come in any order as long as both operands agree,
    so every lane's 4 logical columns of an mma are 4 consecutive physical ones and its operands load 16
    bytes at a time:

    - ``S``: the reduction runs over ``d``; a step of 32 columns gives lane ``c`` the columns ``8c .. 8c+8``
      of its queries (kept in registers for the whole kernel) and of the key of its B column ``g``.
    - ``P V``: the reduction runs over keys. Column ``2c + e`` of score fragment ``i = 4 jj + 2 q + h`` is
      key ``32 jj + 8 c + 4 q + 2 h + e``, which the K load of that fragment arranges, so the lane's
      weights for ``P V``'s k-step ``2 jj + q`` are its own keys ``32 jj + 8c + 4q .. +4``, and one 16-byte
      load from row ``d`` of V^T feeds two k-steps.

    Absent keys (past the tile, outside the window, after a row's position) score ``-3e38`` and weigh 0,
    masked only in the steps that hold any (the diagonal, a window's start); absent tokens' rows are
    computed and never stored. Steps are staged with plain loads between the two barriers (no cp.async
    pipeline: the other resident block's warps cover the wait). ``dtype`` float16 or bfloat16
    (``fa_attention_fits``). For Qwen3-4B's heads on sm_90 ptxas gives 255 registers, no spills, 44 KiB of
    shared memory: 2 blocks per SM; the loop issues about 630 instructions per step and warp, 128 of them
    mma's (docs/bench/2026-11-27f-flash-attention.md). ``keys`` 32 instead of 64 per step halves the
    scores' registers and the staged tiles (bench/gpu_kernels.py times both; the lowering builds 64).
    """
    from tvm.script import tirx as T

    G, sm_scale, window = _attention_params(num_heads, kv_heads, head_dim, sliding_window, scale)
    if not fa_attention_fits(head_dim, dtype):
        raise ValueError(f"head_dim {head_dim} ({dtype}) does not fit the mma attention tile")
    if keys not in (32, 64):
        raise ValueError(f"the mma attention steps over 32 or 64 keys, not {keys}")
    H, KVH, D, BS = num_heads, kv_heads, head_dim, block_size
    HG = tc_heads_per_tile(num_heads, kv_heads)
    NG = G // HG  # head groups per KV head
    W, KT = FA_WARPS, keys
    NT = 32 * W
    QT = 16 * (W // HG)  # tokens per tile
    DS, NS, NO = D // 32, KT // 8, D // 8  # 32-column steps of d, score fragments, output fragments
    EK = KT * D // 8 // NT  # keys a thread stages into the K tile
    LK, LV = _fa_strides(D, KT)
    NEG = -3.0e38  # an absent key's score
    FLOOR = -1.0e30  # a row's running max before any key: the weight of an absent key, 2^(NEG scale - FLOOR), is 0
    scale2 = sm_scale * 1.4426950408889634  # scores in base 2: exp(x s) = 2^(x s log2 e)
    cdtype = cache_dtype or dtype
    ab = mma_operand_type(dtype)
    tile_keys = _tile_keys_macro(QT, window, KT)  # key steps start at a multiple of KT
    cast_load = _cast_load_macro(dtype, cdtype)
    ZERO = zero_const(dtype)

    def key_of(i, c, e):
        """Key (within the step) of column ``2c + e`` of score fragment ``i`` (see the docstring)."""
        return i // 4 * 32 + c * 8 + i // 2 % 2 * 4 + i % 2 * 2 + e

    @T.macro
    def stage(cache, block_tables, k_s, v_s, vl, kl, seq, kh, j0, end, tx):
        """Keys ``j0 .. j0+KT`` of sequence ``seq`` into ``k_s`` ([key][d]: 16 bytes of ``EK`` consecutive keys
        per thread) and their values into ``v_s`` ([d][key]: 8 keys x 8 columns per thread, transposed in
        registers). A key past ``end`` reads key ``end - 1``: finite, where its weight 0 times garbage could be
        NaN. Steps start at a multiple of KT, so a thread's keys share one block-table entry when the block
        size is a multiple of their count."""
        jk: T.let[T.int32] = T.Cast("int32", tx) // (D // 8) * EK
        dk: T.let[T.int32] = T.Cast("int32", tx) % (D // 8) * 8
        for e in T.unroll(EK):
            jc: T.let[T.int32] = T.min(j0 + jk + e, end - 1)
            cast_load(k_s, (jk + e) * LK + dk, cache, block_tables[
                seq, (T.min(j0 + jk, end - 1) if BS % EK == 0 else jc) // BS], 0, kh, jc % BS, dk)
        if tx < KT * D // 64:  # V: keys a8 .. a8+8 x columns b8 .. b8+8
            a8: T.let[T.int32] = T.Cast("int32", tx) % (KT // 8) * 8
            b8: T.let[T.int32] = T.Cast("int32", tx) // (KT // 8) * 8
            for r in T.unroll(8):
                jv: T.let[T.int32] = T.min(j0 + a8 + r, end - 1)
                cast_load(vl, r * 8, cache, block_tables[
                    seq, (T.min(j0 + a8, end - 1) if BS % 8 == 0 else jv) // BS], 1, kh, jv % BS, b8)
            for r in T.unroll(8):  # (a gather in a vector store is invalid CUDA from TVM: one by one)
                for v in T.unroll(8):
                    kl[v] = vl[v * 8 + r]
                for v in T.vectorized(8):
                    v_s[(b8 + r) * LV + a8 + v] = kl[v]

    @T.macro
    def body(q, cache, positions, block_tables, out, info, hy, tx):
        k_s = T.alloc_buffer((KT * LK,), dtype, scope="shared")
        v_s = T.alloc_buffer((D * LV,), dtype, scope="shared")
        ql = T.alloc_buffer((DS * 2 * 8,), dtype, scope="local")  # (d step, row g / g+8, 8 columns)
        kl = T.alloc_buffer((8,), dtype, scope="local")  # one 16-byte K or V^T load
        vl = T.alloc_buffer((64,), dtype, scope="local")  # staging: 8 keys x 8 columns of V
        # each mma's operands in arrays of their own, passed at offset 0 (TVM counts an operand's
        # offset in its array's C type, which for a vector-loaded array is 16 bytes wide)
        a0 = T.alloc_buffer((8,), dtype, scope="local")
        a1 = T.alloc_buffer((8,), dtype, scope="local")
        bf = T.alloc_buffer((4,), dtype, scope="local")
        sacc = T.alloc_buffer((NS * 4,), "float32", scope="local")  # (score fragment, 4)
        oacc = T.alloc_buffer((NO * 4,), "float32", scope="local")  # (output fragment, 4)
        ml = T.alloc_buffer((6,), "float32", scope="local")  # rows g, g+8: max, sum; step max
        # rows g, g+8: token in the tile, first key, keys (0 for an absent token): j - first < keys
        row = T.alloc_buffer((6,), "int32", scope="local")
        kh: T.let[T.int32] = T.Cast("int32", hy) // NG
        w: T.let[T.int32] = T.Cast("int32", tx) // 32
        g: T.let[T.int32] = T.Cast("int32", tx) % 32 // 4
        c: T.let[T.int32] = T.Cast("int32", tx) % 4
        head: T.let[T.int32] = kh * G + T.Cast("int32", hy) % NG * HG + w % HG  # the warp's head
        count: T.let[T.int32] = info[2]  # 0: no such tile (it runs no key step, writes nothing)
        seq: T.let[T.int32] = info[0]
        tok0: T.let[T.int32] = info[1]
        key0: T.let[T.int32] = info[3]
        nkeys: T.let[T.int32] = info[4]
        first: T.let[T.int32] = info[5]
        for h in T.unroll(2):  # the lane's rows: token w // HG * 16 + g + 8h of the tile
            row[h * 3] = w // HG * 16 + g + h * 8
            row[h * 3 + 1] = positions[tok0 + T.min(row[h * 3], T.max(count, 1) - 1)] - window + 1
            row[h * 3 + 2] = T.Select(row[h * 3] < count, window, 0)
            ml[h * 2] = T.float32(FLOOR)
            ml[h * 2 + 1] = T.float32(0)
            for s in T.unroll(DS):
                if row[h * 3] < count:
                    for v in T.vectorized(8):
                        ql[(s * 2 + h) * 8 + v] = q[tok0 + row[h * 3], head, s * 32 + c * 8 + v]
                else:
                    for v in T.unroll(8):
                        ql[(s * 2 + h) * 8 + v] = ZERO
        for i in T.unroll(NO * 4):
            oacc[i] = T.float32(0)
        for kt in T.serial((nkeys + KT - 1) // KT):
            j0: T.let[T.int32] = key0 + kt * KT
            T.tvm_storage_sync("shared")  # every warp done with the previous step's tiles
            stage(cache, block_tables, k_s, v_s, vl, kl, seq, kh, j0, key0 + nkeys, tx)
            T.tvm_storage_sync("shared")
            for i in T.unroll(NS * 4):
                sacc[i] = T.float32(0)
            for s in T.unroll(DS):  # S = Q K^T, 32 columns of d at a time
                for i in T.unroll(8):  # A of the two mma's: the lane's columns 0-3 and 4-7 of rows g, g+8
                    a0[i] = ql[(s * 2 + i // 2 % 2) * 8 + i // 4 * 2 + i % 2]
                    a1[i] = ql[(s * 2 + i // 2 % 2) * 8 + 4 + i // 4 * 2 + i % 2]
                for i in T.unroll(NS):  # B column g of score fragment i: key key_of(i, g // 2, g % 2)
                    for v in T.vectorized(8):
                        kl[v] = k_s[key_of(i, g // 2, g % 2) * LK + s * 32 + c * 8 + v]
                    for v in T.unroll(4):
                        bf[v] = kl[v]
                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32", a0.data, 0,
                                                bf.data, 0, sacc.data, i * 4, False, dtype="float32"))
                    for v in T.unroll(4):
                        bf[v] = kl[4 + v]
                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32", a1.data, 0,
                                                bf.data, 0, sacc.data, i * 4, False, dtype="float32"))
            # absent keys, where the step holds any: past the first token or before the last one's window
            if j0 + KT - 1 > first or j0 <= key0 + nkeys - 1 - window:
                for h in T.unroll(2):
                    for i in T.unroll(NS):
                        for e in T.unroll(2):
                            j: T.let[T.int32] = j0 + key_of(i, c, e)
                            sacc[i * 4 + h * 2 + e] = T.Select(  # (one unsigned compare, no branch)
                                T.Cast("uint32", j - row[h * 3 + 1]) < T.Cast("uint32", row[h * 3 + 2]),
                                sacc[i * 4 + h * 2 + e], T.float32(NEG))
            for h in T.unroll(2):  # online softmax of row g + 8h
                ml[4] = T.float32(NEG)
                for i in T.unroll(NS):
                    for e in T.unroll(2):
                        ml[4] = T.max(ml[4], sacc[i * 4 + h * 2 + e])
                ml[4] = T.max(ml[4], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), ml[4], 1, 32, 32))
                ml[4] = T.max(ml[4], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), ml[4], 2, 32, 32))
                ml[4] = ml[4] * T.float32(scale2)  # (the scale is positive: the max of the scaled)
                ml[5] = T.exp2(ml[h * 2] - T.max(ml[h * 2], ml[4]))  # the old terms' factor
                ml[h * 2] = T.max(ml[h * 2], ml[4])
                ml[h * 2 + 1] = ml[h * 2 + 1] * ml[5]
                for i in T.unroll(NO):
                    for e in T.unroll(2):
                        oacc[i * 4 + h * 2 + e] = oacc[i * 4 + h * 2 + e] * ml[5]
                for i in T.unroll(NS):
                    for e in T.unroll(2):
                        sacc[i * 4 + h * 2 + e] = T.exp2(sacc[i * 4 + h * 2 + e] * T.float32(scale2)
                                                         - ml[h * 2])
                        ml[h * 2 + 1] = ml[h * 2 + 1] + sacc[i * 4 + h * 2 + e]
            for jj in T.unroll(KT // 32):  # O += P V, 32 keys at a time
                for i in T.unroll(8):  # A of k-step 2 jj + u: score fragments 4 jj + 2u, +1
                    a0[i] = T.Cast(dtype, sacc[(jj * 4 + i // 4) * 4 + i // 2 % 2 * 2 + i % 2])
                    a1[i] = T.Cast(dtype, sacc[(jj * 4 + 2 + i // 4) * 4 + i // 2 % 2 * 2 + i % 2])
                for i in T.unroll(NO):  # B column g of output fragment i: row 8i + g of V^T
                    for v in T.vectorized(8):
                        kl[v] = v_s[(i * 8 + g) * LV + jj * 32 + c * 8 + v]
                    for v in T.unroll(4):
                        bf[v] = kl[v]
                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32", a0.data, 0,
                                                bf.data, 0, oacc.data, i * 4, False, dtype="float32"))
                    for v in T.unroll(4):
                        bf[v] = kl[4 + v]
                    T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32", a1.data, 0,
                                                bf.data, 0, oacc.data, i * 4, False, dtype="float32"))
        for h in T.unroll(2):  # each row's sum over its 4 lanes, then out = O / sum
            ml[h * 2 + 1] = ml[h * 2 + 1] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF),
                                                                   ml[h * 2 + 1], 1, 32, 32)
            ml[h * 2 + 1] = ml[h * 2 + 1] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF),
                                                                   ml[h * 2 + 1], 2, 32, 32)
            ml[h * 2 + 1] = T.float32(1) / ml[h * 2 + 1]
            if row[h * 3] < count:
                for i in T.unroll(NO):
                    for e in T.unroll(2):
                        out[tok0 + row[h * 3], head, i * 8 + c * 2 + e] = T.Cast(
                            dtype, oacc[i * 4 + h * 2 + e] * ml[h * 2 + 1])

    return _tiled_attention_func(H, KVH, D, BS, dtype, cdtype, QT, KVH * NG, NT, tile_keys, body)


MERGE_GROUP = 8  # splits whose partials make_attention_merge_gpu loads at once


def _merge_macro():
    """Macro ``(part_acc, part_ml, tok, h, d, ns, st, grp)``: output element ``d`` of head ``h`` of token
    ``tok`` from its ``ns`` splits' partials, ``st[2] / st[1]`` (``st``: local float32[4], ``grp``: local
    float32[3, MERGE_GROUP]). One pass over the splits, ``MERGE_GROUP`` at a time: a group's maxima, sums
    and partial outputs are all loaded (predicated, no remainder loop) before any is used, and the running
    sums are rescaled to the group's new maximum once (an online softmax over the splits)."""
    from tvm.script import tirx as T

    SG = MERGE_GROUP

    @T.macro
    def merge(part_acc, part_ml, tok, h, d, ns, st, grp):
        st[0] = T.float32(-3.0e38)
        st[1] = T.float32(0)
        st[2] = T.float32(0)
        for g in T.serial((ns + SG - 1) // SG):
            # the partial outputs and sums first, the maxima last: the compiler issues them in this order and
            # the first use waits on a maximum (an absent split weighs nothing: max -3e38, sums 0)
            for u in T.unroll(SG):
                grp[2, u] = T.float32(0)
                if g * SG + u < ns:
                    grp[2, u] = part_acc[tok, h, g * SG + u, d]
            for k in T.unroll(2):
                for u in T.unroll(SG):
                    grp[1 - k, u] = T.Select(k == 0, T.float32(0), T.float32(-3.0e38))
                    if g * SG + u < ns:
                        grp[1 - k, u] = part_ml[tok, h, g * SG + u, 1 - k]
            st[3] = st[0]  # the old maximum
            for u in T.unroll(SG):
                st[0] = T.max(st[0], grp[0, u])
            st[1] = st[1] * T.exp(st[3] - st[0])
            st[2] = st[2] * T.exp(st[3] - st[0])
            for u in T.unroll(SG):
                st[1] = st[1] + T.exp(grp[0, u] - st[0]) * grp[1, u]
                st[2] = st[2] + T.exp(grp[0, u] - st[0]) * grp[2, u]

    return merge


def make_attention_merge_gpu(num_heads: int, head_dim: int, dtype: str):
    """PrimFunc ``attention_merge(part_acc[T,H,S,D], part_ml[T,H,S,2], out[T,H,D])``: one block per
    (token, head), a thread per output element: ``sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s``.

    One pass over the splits (``_merge_macro``): a decode step's 6 splits are one round trip to memory;
    two loops (the maximum, then the sums), each unrolled by 4 with a remainder loop of one load at a time,
    took 6 (SASS, 2026-11-27). With FERRUM_MERGED_ATTENTION (an experiment) CUDA decode builds merge in the
    split kernel instead (``make_attention_gpu(merged=True)``)."""
    from tvm.script import tirx as T

    H, D, SG = num_heads, head_dim, MERGE_GROUP
    NT = min(D, GPU_THREADS)
    merge = _merge_macro()

    @T.prim_func(private=True)
    def attention_merge(pa_h: T.handle, pm_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntok, ns = T.int64(), T.int64()
        part_acc = T.match_buffer(pa_h, (ntok, H, ns, D), "float32")
        part_ml = T.match_buffer(pm_h, (ntok, H, ns, 2), "float32")
        out = T.match_buffer(o_h, (ntok, H, D), dtype)
        for th in T.thread_binding(ntok * H, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                st = T.alloc_buffer((4,), "float32", scope="local")  # max, denominator, numerator, scratch
                grp = T.alloc_buffer((3, SG), "float32", scope="local")  # a group's maxima, sums, outputs
                for d0 in T.serial((D + NT - 1) // NT):
                    if d0 * NT + tx < D:
                        merge(part_acc, part_ml, th // H, th % H, d0 * NT + tx, ns, st, grp)
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

"""Sampling on the device: greedy token choice (argmax over the vocabulary), with its numpy reference.

A decode step of plain greedy rows then returns ``L`` token ids instead of ``[L, vocab]`` float32 logits
(608 KiB per row for a 151936-token vocabulary, copied to the host and scanned there). Ties go to the
lowest token id, as ``numpy.argmax`` and the host sampler break them.
"""

from __future__ import annotations

import numpy as np

from . import block_reduce
from .block_reduce import block_argmax

GPU_THREADS = 256
ARGMAX_THREADS = 1024
ARGMAX_UNROLL = 4
NEG_INF = float("-inf")


def make_argmax(vocab: int, kind: str):
    """PrimFunc ``argmax(logits[L, V] float32, out[L] int32)``.

    GPU: a block of 1024 threads per row; thread ``i`` scans columns ``i, i+1024, ...`` keeping its first
    maximum, loading ``ARGMAX_UNROLL`` of them before comparing (independent loads in flight: one load at a
    time left a 151936-column row at memory latency x 594, 0.22 ms on an H200), then a shared-memory tree
    keeps the larger value (the lower id on a tie). CPU: rows in parallel, one scan each.
    """
    from tvm.script import tirx as T

    V = vocab
    if kind == "cpu":
        L = 16  # SIMD lanes: lane l keeps the first maximum of columns l, l+16, ...
        VL = V // L * L

        @T.prim_func(private=True)
        def argmax_cpu(l_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            nrow = T.int64()
            logits = T.match_buffer(l_h, (nrow, V), "float32")
            out = T.match_buffer(o_h, (nrow,), "int32")
            for r in T.parallel(nrow):
                best = T.alloc_buffer((L,), "float32")
                idx = T.alloc_buffer((L,), "int32")
                for ll in T.vectorized(L):
                    best[ll] = T.float32(NEG_INF)
                    idx[ll] = V
                for c in T.serial(VL // L):
                    for ll in T.vectorized(L):  # strictly greater: a lane keeps its first maximum
                        idx[ll] = T.if_then_else(logits[r, c * L + ll] > best[ll], T.Cast("int32", c * L + ll),
                                                 idx[ll])
                        best[ll] = T.max(best[ll], logits[r, c * L + ll])
                for v in T.serial(V - VL):  # the columns past the last full vector, in lane 0's place
                    if logits[r, VL + v] > best[0] or (logits[r, VL + v] == best[0] and VL + v < idx[0]):
                        best[0] = logits[r, VL + v]
                        idx[0] = T.Cast("int32", VL + v)
                for ll in T.serial(L - 1):  # lanes in order; equal values go to the lower id
                    if best[ll + 1] > best[0] or (best[ll + 1] == best[0] and idx[ll + 1] < idx[0]):
                        best[0] = best[ll + 1]
                        idx[0] = idx[ll + 1]
                out[r] = T.if_then_else(best[0] > T.float32(NEG_INF), idx[0], 0)  # all -inf: id 0, as numpy

        return argmax_cpu

    NT, U = ARGMAX_THREADS, ARGMAX_UNROLL
    row_argmax = block_argmax(NT)

    @T.prim_func(private=True)
    def argmax_gpu(l_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nrow = T.int64()
        logits = T.match_buffer(l_h, (nrow, V), "float32")
        out = T.match_buffer(o_h, (nrow,), "int32")
        for r in T.thread_binding(nrow, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                vals = T.alloc_buffer((NT,), "float32", scope="shared")
                ids = T.alloc_buffer((NT,), "int32", scope="shared")
                best = T.alloc_buffer((1,), "float32", scope="local")
                idx = T.alloc_buffer((1,), "int32", scope="local")
                seen = T.alloc_buffer((U,), "float32", scope="local")
                best[0] = T.float32(NEG_INF)
                idx[0] = V  # no column yet: loses every tie, so a thread past the vocabulary never wins
                for c in T.serial((V + NT * U - 1) // (NT * U)):
                    for u in T.unroll(U):  # the loads first, then the comparisons, in column order
                        if (c * U + u) * NT + tx < V:
                            seen[u] = logits[r, (c * U + u) * NT + tx]
                    for u in T.unroll(U):
                        if (c * U + u) * NT + tx < V:
                            if seen[u] > best[0] or idx[0] == V:
                                best[0] = seen[u]
                                idx[0] = T.Cast("int32", (c * U + u) * NT + tx)
                row_argmax(vals, ids, best, idx, tx)
                if tx == 0:
                    out[r] = idx[0]

    return argmax_gpu


def argmax_ref(logits: np.ndarray) -> np.ndarray:
    """First index of each row's maximum, int32."""
    return np.argmax(logits, axis=1).astype(np.int32)


SAMPLE_THREADS = 1024
SAMPLE_UNROLL = 4


def make_sample_gpu(vocab: int):
    """PrimFunc ``sample(logits[L,V] f32, params[L,4] f32, uniform[L] f32, out[L] int32)``: one token per
    row. ``params[r]`` = (temperature, top_k, top_p, min_p) as the host sampler takes them (temperature
    below 1e-5: greedy; top_k 0 or >= V: off; top_p 1: off; min_p 0: off); ``uniform[r]`` in [0, 1) is the
    row's draw from its sequence's generator.

    A block of 1024 threads per row. Passes over the row, each strided (thread ``i`` reads ids ``i, i +
    1024, ...``: a warp reads 128 consecutive bytes) with 4 loads in flight: the maximum (and its lowest
    id, the greedy answer); for top-k the k-th largest logit, found by a binary search over the logits'
    order-preserving 32-bit keys (``count(key >= K) >= k``); for top-p the smallest key ``K`` with
    ``mass(kept, key > K) < top_p * mass(kept)`` by the same search (the exponential only for ids above
    the probe). A search that is off (and every pass of a greedy row) costs nothing. Then the draw, in id
    order: thread ``i`` owns the contiguous ids ``[i*C, (i+1)*C)``, sums its kept probabilities ``exp((x
    - max) / T)`` (min_p drops those below ``min_p``), a prefix sum over threads (sums of runs of 32
    threads, then within the run) finds the thread holding ``uniform * total``, and it walks its ids to
    the first whose cumulative probability exceeds it. Float32 throughout, and tokens tied with the k-th logit are all kept (the host sampler sums in
    float64 and keeps the lowest ids of such ties): the same distribution, not always the same token as
    the host for the same draw.
    """
    from tvm import tirx
    from tvm.script import tirx as T

    V, NT, U = vocab, SAMPLE_THREADS, SAMPLE_UNROLL
    C = -(-V // NT)  # contiguous ids per thread, for the draw
    W = 32  # the prefix over threads: W runs of W threads
    assert W * W == NT
    S = -(-V // (NT * U))  # strided steps of U loads
    block_sum, row_argmax = block_reduce.block_sum(NT, 1), block_argmax(NT)

    def key_of(x):
        """float32 -> its bits as an unsigned key in the same order (negatives flipped), as int64."""
        bits = tirx.reinterpret("uint32", x)
        return tirx.Cast("int64", tirx.if_then_else(x < tirx.const(0, "float32"), tirx.bitwise_not(bits),
                                                    tirx.bitwise_or(bits, tirx.const(0x80000000, "uint32"))))

    def prob(x, top, temp):
        """The unnormalised probability of logit ``x``: 1 for the row's maximum ``top``."""
        return tirx.exp((x - top) / temp)

    @T.macro
    def load(seen, logits, r, c, tx):
        """``seen[u]`` = logit ``(c * U + u) * NT + tx`` of row ``r`` for the ids inside the vocabulary."""
        for u in T.unroll(U):
            if (c * U + u) * NT + tx < V:
                seen[u] = logits[r, (c * U + u) * NT + tx]

    @T.prim_func(private=True)
    def sample(l_h: T.handle, p_h: T.handle, u_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nrow = T.int64()
        logits = T.match_buffer(l_h, (nrow, V), "float32")
        params = T.match_buffer(p_h, (nrow, 4), "float32")
        uniform = T.match_buffer(u_h, (nrow,), "float32")
        out = T.match_buffer(o_h, (nrow,), "int32")
        for r in T.thread_binding(nrow, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                part = T.alloc_buffer((NT, 1), "float32", scope="shared")
                part1 = T.alloc_buffer((NT,), "float32", scope="shared")
                part_id = T.alloc_buffer((NT,), "int32", scope="shared")
                seen = T.alloc_buffer((U,), "float32", scope="local")
                mine = T.alloc_buffer((1,), "float32", scope="local")
                best = T.alloc_buffer((2,), "float32", scope="local")  # max, then the kept mass
                idx = T.alloc_buffer((1,), "int32", scope="local")
                bounds = T.alloc_buffer((4,), "int64", scope="local")  # search lo, hi; top-k cut; kept from
                cum = T.alloc_buffer((1,), "float32", scope="local")
                pick = T.alloc_buffer((1,), "int32", scope="local")
                temp: T.let[T.float32] = params[r, 0]
                top_k: T.let[T.int64] = T.Cast("int64", params[r, 1])
                top_p: T.let[T.float32] = params[r, 2]
                min_p: T.let[T.float32] = params[r, 3]
                # 1. the maximum and its lowest id (a thread sees its ids in increasing order)
                best[0] = T.float32(NEG_INF)
                idx[0] = V
                for c in T.serial(S):
                    load(seen, logits, r, c, tx)
                    for u in T.unroll(U):
                        if (c * U + u) * NT + tx < V:
                            if seen[u] > best[0] or idx[0] == V:
                                best[0] = seen[u]
                                idx[0] = T.Cast("int32", (c * U + u) * NT + tx)
                row_argmax(part1, part_id, best, idx, tx)
                greedy: T.let[T.bool] = temp < T.float32(1.0e-5)
                # 2. top-k: the largest key K with count(key >= K) >= k (all keys when off or greedy)
                bounds[0] = T.int64(0)
                bounds[1] = T.int64(0xFFFFFFFF)
                searching_k: T.let[T.bool] = not greedy and top_k > 0 and top_k < V
                for _it in T.serial(T.if_then_else(searching_k, 32, 0)):  # the same for every thread
                    mid: T.let[T.int64] = (bounds[0] + bounds[1] + 1) // 2
                    mine[0] = T.float32(0)
                    for c in T.serial(S):
                        load(seen, logits, r, c, tx)
                        for u in T.unroll(U):
                            if (c * U + u) * NT + tx < V:
                                if key_of(seen[u]) >= mid:
                                    mine[0] = mine[0] + T.float32(1)
                    block_sum(part, mine, tx)
                    if T.Cast("int64", mine[0]) >= top_k:
                        bounds[0] = mid
                    else:
                        bounds[1] = mid - 1
                bounds[2] = bounds[0]
                # 3. top-p: the smallest key K with mass(kept, key > K) < top_p * mass(kept)
                searching_p: T.let[T.bool] = not greedy and top_p < T.float32(1)
                mine[0] = T.float32(0)
                if searching_p:
                    for c in T.serial(S):
                        load(seen, logits, r, c, tx)
                        for u in T.unroll(U):
                            if (c * U + u) * NT + tx < V:
                                if key_of(seen[u]) >= bounds[2]:
                                    mine[0] = mine[0] + prob(seen[u], best[0], temp)
                block_sum(part, mine, tx)
                best[1] = mine[0]
                bounds[0] = T.int64(0)
                bounds[1] = T.int64(0xFFFFFFFF)
                for _it in T.serial(T.if_then_else(searching_p, 32, 0)):
                    mid_p: T.let[T.int64] = (bounds[0] + bounds[1]) // 2
                    mine[0] = T.float32(0)
                    for c in T.serial(S):
                        load(seen, logits, r, c, tx)
                        for u in T.unroll(U):
                            if (c * U + u) * NT + tx < V:
                                if key_of(seen[u]) > mid_p and key_of(seen[u]) >= bounds[2]:
                                    mine[0] = mine[0] + prob(seen[u], best[0], temp)
                    block_sum(part, mine, tx)
                    if mine[0] < top_p * best[1]:
                        bounds[1] = mid_p
                    else:
                        bounds[0] = mid_p + 1
                # the kept keys: from the top-k cut, and from the top-p cut when there is one
                bounds[3] = T.max(bounds[2], T.if_then_else(searching_p, bounds[0], T.int64(0)))
                # 4. kept mass per thread's contiguous ids, its prefix over threads, and the draw
                mine[0] = T.float32(0)
                if not greedy:
                    for c in T.serial(C):
                        if tx * C + c < V:
                            if key_of(logits[r, tx * C + c]) >= bounds[3]:
                                pr: T.let[T.float32] = prob(logits[r, tx * C + c], best[0], temp)
                                if pr >= min_p:
                                    mine[0] = mine[0] + pr
                part1[tx] = mine[0]
                T.tvm_storage_sync("shared")
                if tx < W:  # the sums of the runs of W threads
                    cum[0] = T.float32(0)
                    for i in T.unroll(W):
                        cum[0] = cum[0] + part1[tx * W + i]
                    part[tx, 0] = cum[0]
                T.tvm_storage_sync("shared")
                cum[0] = T.float32(0)  # the mass before this thread's ids: earlier runs, then its run
                best[1] = T.float32(0)
                for j in T.unroll(W):
                    if j < tx // W:
                        cum[0] = cum[0] + part[j, 0]
                    best[1] = best[1] + part[j, 0]
                for i in T.unroll(W):
                    if i < tx % W:
                        cum[0] = cum[0] + part1[tx // W * W + i]
                T.tvm_storage_sync("shared")
                target: T.let[T.float32] = uniform[r] * best[1]
                # the thread whose range holds the target picks; ties at a range edge go to the later
                # thread (the first id whose cumulative mass exceeds the target)
                if not greedy and cum[0] <= target and (cum[0] + mine[0] > target or tx == NT - 1):
                    pick[0] = -1
                    for c in T.serial(C):
                        if tx * C + c < V:
                            if key_of(logits[r, tx * C + c]) >= bounds[3]:
                                pw: T.let[T.float32] = prob(logits[r, tx * C + c], best[0], temp)
                                if pw >= min_p:
                                    cum[0] = cum[0] + pw
                                    if pick[0] < 0 and cum[0] > target:
                                        pick[0] = T.Cast("int32", tx * C + c)
                                    idx[0] = T.Cast("int32", tx * C + c)  # the last kept id, for rounding
                    if pick[0] >= 0:
                        idx[0] = pick[0]
                    out[r] = idx[0]
                if greedy and tx == 0:
                    out[r] = idx[0]

    return sample


def kept_probs_ref(x: np.ndarray, temperature: float, top_k: float, top_p: float, min_p: float) -> np.ndarray:
    """float64 ``[V]``: ``exp((x - max) / temperature)`` where ``make_sample_gpu`` keeps the token, else 0:
    top-k with ties at the k-th logit kept, the top-p prefix by logit, min_p."""
    x = x.astype(np.float64)
    keep = np.ones(x.shape, bool)
    if 0 < top_k < len(x):
        keep &= x >= np.sort(x)[::-1][int(top_k) - 1]
    p = np.exp((x - x.max()) / temperature) * keep
    if top_p < 1:  # the mass strictly more likely than each token: suffix sums over the ascending logits
        order = np.argsort(x, kind="stable")
        suffix = np.append(np.cumsum(p[order][::-1])[::-1], 0.0)
        above = suffix[np.searchsorted(x[order], x, side="right")]
        keep &= above < top_p * p.sum()
    p = p * keep
    p[p < min_p] = 0
    return p


def sample_ref(logits: np.ndarray, params: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """The token ``make_sample_gpu`` picks, in float64: the argmax for greedy rows; else the first id whose
    cumulative kept probability (``kept_probs_ref``) exceeds ``uniform * total``."""
    out = np.zeros(len(logits), np.int32)
    for r, x in enumerate(logits):
        temp, top_k, top_p, min_p = (float(v) for v in params[r])
        if temp < 1e-5:
            out[r] = int(np.argmax(x))
            continue
        p = kept_probs_ref(x, temp, top_k, top_p, min_p)
        cdf = np.cumsum(p)
        hit = np.flatnonzero(cdf > uniform[r] * cdf[-1])
        out[r] = int(hit[0]) if hit.size else int(np.flatnonzero(p)[-1])
    return out

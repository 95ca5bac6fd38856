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


def row_lanes(vocab: int) -> int:
    """Logits a GPU thread loads at once from a row of ``vocab``: 4 (16 bytes; rows start 16-byte aligned)
    when ``vocab`` is a multiple of 4, else 1."""
    return 4 if vocab % 4 == 0 else 1


def make_argmax(vocab: int, kind: str):
    """PrimFunc ``argmax(logits[L, V] float32, out[L] int32)``.

    GPU: a block of 1024 threads per row; thread ``i`` scans the 16-byte runs of columns ``i, i+1024, ...``
    (``row_lanes``: 4 columns a load where the vocabulary allows) keeping its first maximum, loading
    ``ARGMAX_UNROLL`` runs before comparing (independent loads in flight: one 4-byte load at a time left a
    151936-column row at memory latency x 594, 0.22 ms on an H200; 4 of them 10.4 us), then
    ``block_argmax`` keeps the larger value (the lower id on a tie). CPU: rows in parallel, one scan each.
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

    NT, U, VL = ARGMAX_THREADS, ARGMAX_UNROLL, row_lanes(V)
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
                seen = T.alloc_buffer((U, VL), "float32", scope="local")
                best[0] = T.float32(NEG_INF)
                idx[0] = V  # no column yet: loses every tie, so a thread past the vocabulary never wins
                for c in T.serial((V + NT * U * VL - 1) // (NT * U * VL)):
                    for u in T.unroll(U):  # the loads first, then the comparisons, in column order
                        if ((c * U + u) * NT + tx) * VL < V:
                            for v in T.vectorized(VL):
                                seen[u, v] = logits[r, ((c * U + u) * NT + tx) * VL + v]
                    for u in T.unroll(U):
                        if ((c * U + u) * NT + tx) * VL < V:
                            for v in T.unroll(VL):
                                if seen[u, v] > best[0] or idx[0] == V:
                                    best[0] = seen[u, v]
                                    idx[0] = T.Cast("int32", ((c * U + u) * NT + tx) * VL + v)
                row_argmax(vals, ids, best, idx, tx)
                if tx == 0:
                    out[r] = idx[0]

    return argmax_gpu


def argmax_ref(logits: np.ndarray) -> np.ndarray:
    """First index of each row's maximum, int32."""
    return np.argmax(logits, axis=1).astype(np.int32)


SAMPLE_THREADS = 1024
SAMPLE_UNROLL = 4
SAMPLE_WARP = 32


def sample_candidates(shared_bytes: int) -> int:
    """How many (logit, id) candidates ``make_sample_gpu`` can copy into ``shared_bytes`` of shared memory
    beside its reduction buffers (4 words a thread of its ``SAMPLE_THREADS``)."""
    return (shared_bytes - 16 * SAMPLE_THREADS) // 8


SAMPLE_CANDIDATES = sample_candidates(40 * 1024)  # 3072: 24 KiB of them, 40 KiB in all


def multisection_rounds(span: int, probes: int) -> int:
    """Rounds of ``probes`` evenly spaced probes that narrow an integer range of ``span`` values to one:
    each leaves ``ceil(span / (probes + 1))``."""
    rounds = 0
    while span > 1:
        span, rounds = -(-span // (probes + 1)), rounds + 1
    return rounds


def make_sample_gpu(vocab: int, candidates: int = SAMPLE_CANDIDATES):
    """PrimFunc ``sample(logits[L,V] f32, params[L,4] f32, uniform[L] f32, out[L] int32)``: one token per
    row. ``params[r]`` = (temperature, top_k, top_p, min_p) as the host sampler takes them (temperature
    below 1e-5: greedy; top_k 0 or >= V: off; top_p 1: off; min_p 0: off); ``uniform[r]`` in [0, 1) is the
    row's draw from its sequence's generator.

    A block of 1024 threads per row. A strided pass (thread ``i`` reads the 16-byte runs ``i, i + 1024,
    ...`` of 4 logits, ``row_lanes``; a warp reads 512 consecutive bytes) with 4 runs in flight finds the
    maximum and its lowest id (the greedy answer). Then a floor under every key the filters can keep,
    known before any search over the row:
    - top-k (k <= 1024): the k-th largest of the threads' own maxima (k distinct logits reach it);
    - else top-p: ``max + T (ln((1 - top_p) / V) - 1)``. Tokens below it each have probability under
      ``(1 - top_p) / V`` of the maximum's, so all of them hold less than ``1 - top_p`` of the mass and the
      top-p cut is above them;
    - else min_p: ``max + T (ln(min_p) - 0.01)``.
    The logits at or above the floor (their order-preserving 32-bit keys) are copied with their ids, in
    id order, into shared memory when at most ``candidates`` are (a count over contiguous ranges of 16-byte
    runs, a prefix over threads, a second pass that writes); the searches and the draw then read those
    instead of the row. Without a floor, or with too many candidates, they read the row.
    - top-k: the k-th largest logit, the largest key ``K`` with ``count(key >= K) >= k``, between the floor
      and the maximum;
    - top-p: the smallest key ``K`` with ``mass(kept, key > K) < top_p * mass(kept)`` (the exponential
      only for ids above the probe); the kept mass of a top-p-only row is summed over the whole row
      during the count.
    Over values in shared memory (the threads' maxima, the candidates) a search is a multisection: each
    of the 32 warps counts (or sums the mass) for its own probe, its lanes striding over the values, and
    32 evenly spaced probes narrow the range 33-fold a round: 7 rounds of 2 barriers cover 32-bit keys
    (``multisection_rounds``), where a bisection took 32 block-wide sums of 4 barriers each. Over the row
    (a warp per probe would read it 32 times) the top-k search is a bisection of block-wide passes; the
    top-p one bisects only until the keys between its ends fit in shared memory (each pass also counts
    the keys above its probe), copies those there and ends with a multisection less the mass above them:
    a flat row of 151936 N(0, 1) logits at T 0.7, top-p 0.9 takes 10 passes then about 1900 candidates,
    where the bisection took 32 passes.
    - the draw, in id order: thread ``i`` owns a contiguous range of the source, sums its kept
      probabilities ``exp((x - max) / T)`` (min_p drops those below ``min_p``), a prefix sum over threads
      (sums of runs of 32 threads, then within the run) finds the thread holding ``uniform * total``, and
      it walks its range to the first whose cumulative probability exceeds it.
    A search that is off (and every pass of a greedy row) costs nothing. Float32 throughout, and tokens
    tied with the k-th logit are all kept (the host sampler sums in float64 and keeps the lowest ids of
    such ties): the same distribution, not always the same token as the host for the same draw.
    """
    from tvm import tirx
    from tvm.script import tirx as T

    V, NT, U, CAP, W = vocab, SAMPLE_THREADS, SAMPLE_UNROLL, candidates, SAMPLE_WARP
    assert CAP >= NT, "the threads' maxima are searched in the candidates' buffer"
    assert W * W == NT  # the prefix over threads: W runs of W threads; the searches: W probes of W lanes
    VL = row_lanes(V)  # logits a load
    C = -(-V // (NT * VL)) * VL  # contiguous ids per thread (whole runs), for the count, copy and draw
    CS = -(-C // (VL * U))  # steps of U runs over them
    S = -(-V // (NT * U * VL))  # strided steps of U runs over the row
    P = NT // W  # a multisection's probes: one per warp
    ROUNDS = multisection_rounds(2 ** 32, P)  # keys are 32-bit
    KEY_MAX = 2 ** 32 - 1
    block_sum, block_sum2, row_argmax = block_reduce.block_sum(NT, 1), block_reduce.block_sum(NT, 2), block_argmax(NT)

    def key_of(x):
        """float32 -> its bits as an unsigned key in the same order (negatives flipped), as int64."""
        bits = tirx.reinterpret("uint32", x)
        return tirx.Cast("int64", tirx.if_then_else(x < tirx.const(0, "float32"), tirx.bitwise_not(bits),
                                                    tirx.bitwise_or(bits, tirx.const(0x80000000, "uint32"))))

    def prob(x, top, inv_temp):
        """The unnormalised probability of logit ``x``: 1 for the row's maximum ``top``."""
        return tirx.exp((x - top) * inv_temp)

    @T.macro
    def load_strided(seen, logits, r, c, tx):
        """``seen[u, :]`` = run ``(c * U + u) * NT + tx`` of row ``r``, for the runs in the row."""
        for u in T.unroll(U):
            if ((c * U + u) * NT + tx) * VL < V:
                for v in T.vectorized(VL):
                    seen[u, v] = logits[r, ((c * U + u) * NT + tx) * VL + v]

    @T.macro
    def load_range(seen, logits, r, c, tx):
        """``seen[u, :]`` = run ``c * U + u`` of thread ``tx``'s contiguous range of row ``r``, for the runs in
        the range and the row."""
        for u in T.unroll(U):
            if (c * U + u) * VL < C and tx * C + (c * U + u) * VL < V:
                for v in T.vectorized(VL):
                    seen[u, v] = logits[r, tx * C + (c * U + u) * VL + v]

    @T.macro
    def mass_row(two, seen, logits, r, tx, above, at_least, count_from, top, inv_temp):
        """Over this thread's strided logits with a key >= ``at_least``: ``two[0]`` += the probabilities of
        those with a key > ``above``, ``two[1]`` += how many have a key >= ``count_from`` (a count alone:
        ``above`` past every key, and no exponential is taken)."""
        for c in T.serial(S):
            load_strided(seen, logits, r, c, tx)
            for u in T.unroll(U):
                if ((c * U + u) * NT + tx) * VL < V:
                    for v in T.unroll(VL):
                        if key_of(seen[u, v]) >= at_least:
                            if key_of(seen[u, v]) > above:
                                two[0] = two[0] + prob(seen[u, v], top, inv_temp)
                            if key_of(seen[u, v]) >= count_from:
                                two[1] = two[1] + T.float32(1)

    @T.macro
    def narrow(part, sb, mine, nxt, tx, bounds, ms, up, goal):
        """The end of a multisection round over ``[bounds[0], bounds[1]]`` (step ``ms[0]``), once each thread
        holds in ``mine[0]`` its part of its warp's probe's count or mass: the warps' totals, and the range
        narrowed to the two probes the answer lies between (``sb``: a shared copy of the range, kept up to
        date). ``up`` (a Python bool): the largest key whose count reaches ``goal`` (``k``; true at
        ``bounds[0]``), probes at ``bounds[0] + (w + 1) * step``; else the smallest key whose mass is below
        ``goal`` (true at ``bounds[1]``), probes one lower. The 32 totals are summed by 32 threads, each
        also summing the next probe's, so the thread whose probe is the last on its side of the answer
        (counts and sums over nested sets in one order are monotone in the probe) writes the new range:
        no thread scans all 32. ``part``: ``[NT, 1]``, lane ``l`` of warp ``w`` at row ``l * W + (w ^ l)``
        (a warp's writers and a column's readers on distinct banks)."""
        part[tx % W * W + T.bitwise_xor(tx // W, tx % W), 0] = mine[0]
        T.tvm_storage_sync("shared")
        if tx < P:
            mine[0] = T.float32(0)
            nxt[0] = T.float32(0)
            for i in T.unroll(W):
                mine[0] = mine[0] + part[i * W + T.bitwise_xor(tx, i), 0]
                nxt[0] = nxt[0] + part[i * W + T.bitwise_xor(T.min(tx + 1, P - 1), i), 0]
            ms[1] = bounds[0] + T.Cast("int64", tx + 1) * ms[0] - T.int64(0 if up else 1)  # this thread's probe
            ms[2] = ms[1] + ms[0]  # the next one
            live: T.let[T.bool] = bounds[0] < bounds[1] and ms[1] <= bounds[1]
            live_next: T.let[T.bool] = tx + 1 < P and bounds[0] < bounds[1] and ms[2] <= bounds[1]
            if up:
                here: T.let[T.bool] = live and T.Cast("int64", mine[0]) >= goal
                there: T.let[T.bool] = live_next and T.Cast("int64", nxt[0]) >= goal
                if here and not there:  # the last probe that reaches k
                    sb[0] = ms[1]
                    sb[1] = T.if_then_else(live_next, ms[2] - 1, bounds[1])
                if tx == 0 and live and not here:  # none does
                    sb[1] = ms[1] - 1
            else:
                below: T.let[T.bool] = live and mine[0] < goal
                below_next: T.let[T.bool] = live_next and nxt[0] < goal
                if live and not below and (below_next or not live_next):  # the last probe not below
                    sb[0] = ms[1] + 1
                    sb[1] = T.if_then_else(below_next, ms[2], bounds[1])
                if tx == 0 and below:  # every probe is
                    sb[1] = ms[1]
        T.tvm_storage_sync("shared")
        bounds[0] = sb[0]
        bounds[1] = sb[1]

    @T.macro
    def multisect(up, part, sb, src, n, tx, goal, at_least, top, inv_temp, bounds, ms, one, mine, nxt):
        """One multisection round over ``src[:n]`` (shared) in ``[bounds[0], bounds[1]]``, ``step = ceil(span /
        (P + 1))``. ``up`` (a Python bool): the largest key ``K`` with ``count(key >= K) >= goal`` (``k``; true
        at ``bounds[0]``), warp ``w`` counting at ``bounds[0] + (w + 1) * step``; else the smallest key ``K``
        with ``mass(key > K, key >= at_least) < goal`` (true at ``bounds[1]``), warp ``w`` summing at that
        probe less one (``at_least``, ``top`` and ``inv_temp`` are the mass's only)."""
        ms[0] = (bounds[1] - bounds[0] + P + 1) // (P + 1)
        probe: T.let[T.int64] = bounds[0] + T.Cast("int64", tx // W + 1) * ms[0] - T.int64(0 if up else 1)
        mine[0] = T.float32(0)
        if bounds[0] < bounds[1] and probe <= bounds[1]:
            for i in T.serial((n + W - 1) // W):
                if i * W + tx % W < n:
                    one[0] = src[i * W + tx % W]
                    if up:
                        if key_of(one[0]) >= probe:
                            mine[0] = mine[0] + T.float32(1)
                    elif key_of(one[0]) > probe and key_of(one[0]) >= at_least:
                        mine[0] = mine[0] + prob(one[0], top, inv_temp)
        narrow(part, sb, mine, nxt, tx, bounds, ms, up, goal)

    @T.macro
    def search_from(sb, bounds, tx):
        """``sb`` = the range a multisection starts from (every thread holds it in ``bounds``)."""
        if tx == 0:
            sb[0] = bounds[0]
            sb[1] = bounds[1]
        T.tvm_storage_sync("shared")

    @T.macro
    def take(picking, acc, x, tok, kept_key, top, inv_temp, min_p, target, pick, idx):
        """Token ``tok`` (logit ``x``) if the filters keep it: ``acc[0]`` += its probability and, when
        ``picking`` (a Python bool), it is the pick once ``acc[0]`` passes ``target`` (``idx[0]``: the last
        kept one, for rounding)."""
        if key_of(x) >= kept_key:
            if prob(x, top, inv_temp) >= min_p:  # (one exponential: the compiler shares it)
                acc[0] = acc[0] + prob(x, top, inv_temp)
                if picking:
                    if pick[0] < 0 and acc[0] > target:
                        pick[0] = tok
                    idx[0] = tok

    @T.macro
    def kept_cands(picking, acc, one, cand_val, cand_id, n, cn, tx, kept_key, top, inv_temp, min_p, target, pick, idx):
        """``take`` over this thread's contiguous range of the candidates (``cn`` of the ``n``)."""
        for c in T.serial(cn):
            if tx * cn + c < n:
                one[0] = cand_val[tx * cn + c]
                take(picking, acc, one[0], cand_id[tx * cn + c], kept_key, top, inv_temp, min_p, target, pick, idx)

    @T.macro
    def range_pass(mode, seen, logits, r, tx, key_floor, key_ceil, acc, mass, cand_val, cand_id, at, mass_too, top,
                   inv_temp, min_p, target, pick, idx):
        """Over this thread's contiguous range of row ``r`` (``U`` 16-byte runs in flight), by ``mode`` (a
        Python str): ``count``: ``acc[0]`` += the logits with a key in ``[key_floor, key_ceil]`` (and, with
        ``mass_too``, ``mass[0]`` += every logit's probability); ``copy``: those logits and their ids into
        the candidates from ``at[0]`` on; ``kept`` / ``pick``: ``take`` (``key_floor``: the kept keys)."""
        for c in T.serial(CS):
            load_range(seen, logits, r, c, tx)
            for u in T.unroll(U):
                if (c * U + u) * VL < C and tx * C + (c * U + u) * VL < V:
                    for v in T.unroll(VL):
                        if mode == "count":
                            if key_of(seen[u, v]) >= key_floor and key_of(seen[u, v]) <= key_ceil:
                                acc[0] = acc[0] + T.float32(1)
                            if mass_too:
                                mass[0] = mass[0] + prob(seen[u, v], top, inv_temp)
                        elif mode == "copy":
                            if key_of(seen[u, v]) >= key_floor and key_of(seen[u, v]) <= key_ceil:
                                cand_val[at[0]] = seen[u, v]
                                cand_id[at[0]] = T.Cast("int32", tx * C + (c * U + u) * VL + v)
                                at[0] = at[0] + 1
                        else:
                            take(mode == "pick", acc, seen[u, v], T.Cast("int32", tx * C + (c * U + u) * VL + v),
                                 key_floor, top, inv_temp, min_p, target, pick, idx)

    @T.macro
    def prefix(part, part1, mine, cum, total, tx):
        """``cum[0]``: the sum of ``mine[0]`` over the threads before ``tx`` (earlier runs of W threads,
        then its own run); ``total[0]``: over all of them."""
        part1[tx] = mine[0]
        T.tvm_storage_sync("shared")
        if tx < W:  # the sums of the runs of W threads
            cum[0] = T.float32(0)
            for i in T.unroll(W):
                cum[0] = cum[0] + part1[tx * W + i]
            part[tx, 0] = cum[0]
        T.tvm_storage_sync("shared")
        cum[0] = T.float32(0)
        total[0] = T.float32(0)
        for j in T.unroll(W):
            if j < tx // W:
                cum[0] = cum[0] + part[j, 0]
            total[0] = total[0] + part[j, 0]
        for i in T.unroll(W):
            if i < tx % W:
                cum[0] = cum[0] + part1[tx // W * W + i]
        T.tvm_storage_sync("shared")

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
                part = T.alloc_buffer((NT, 2), "float32", scope="shared")
                part1 = T.alloc_buffer((NT,), "float32", scope="shared")
                part_id = T.alloc_buffer((NT,), "int32", scope="shared")
                cand_val = T.alloc_buffer((CAP,), "float32", scope="shared")
                cand_id = T.alloc_buffer((CAP,), "int32", scope="shared")
                sb = T.alloc_buffer((2,), "int64", scope="shared")  # a multisection's range
                seen = T.alloc_buffer((U, VL), "float32", scope="local")
                one = T.alloc_buffer((1,), "float32", scope="local")  # a value read from shared memory
                nxt = T.alloc_buffer((1,), "float32", scope="local")  # a multisection's next probe's total
                mine = T.alloc_buffer((1,), "float32", scope="local")
                two = T.alloc_buffer((2,), "float32", scope="local")  # a row step's mass and count
                # a bisection over the row: its eligible keys >= bounds[0] and > bounds[1], the mass > bounds[1]
                span = T.alloc_buffer((3,), "float32", scope="local")
                full = T.alloc_buffer((1,), "float32", scope="local")  # a top-p-only row's kept mass
                best = T.alloc_buffer((3,), "float32", scope="local")  # max, the kept mass, own max
                total = T.alloc_buffer((1,), "float32", scope="local")  # prefix's sum over all threads
                idx = T.alloc_buffer((1,), "int32", scope="local")
                bounds = T.alloc_buffer((5,), "int64", scope="local")  # search lo, hi; top-k cut; kept; floor
                ms = T.alloc_buffer((3,), "int64", scope="local")  # a multisection's step, new lo and hi
                cum = T.alloc_buffer((1,), "float32", scope="local")
                pick = T.alloc_buffer((1,), "int32", scope="local")
                at = T.alloc_buffer((1,), "int32", scope="local")
                temp: T.let[T.float32] = params[r, 0]
                inv_temp: T.let[T.float32] = T.float32(1) / temp  # (for greedy rows, unused)
                top_k: T.let[T.int64] = T.Cast("int64", params[r, 1])
                top_p: T.let[T.float32] = params[r, 2]
                min_p: T.let[T.float32] = params[r, 3]
                # 1. the maximum and its lowest id (a thread sees its ids in increasing order)
                best[0] = T.float32(NEG_INF)
                idx[0] = V
                for c in T.serial(S):
                    load_strided(seen, logits, r, c, tx)
                    for u in T.unroll(U):
                        if ((c * U + u) * NT + tx) * VL < V:
                            for v in T.unroll(VL):
                                if seen[u, v] > best[0] or idx[0] == V:
                                    best[0] = seen[u, v]
                                    idx[0] = T.Cast("int32", ((c * U + u) * NT + tx) * VL + v)
                best[2] = best[0]
                row_argmax(part1, part_id, best, idx, tx)
                greedy: T.let[T.bool] = temp < T.float32(1.0e-5)
                searching_k: T.let[T.bool] = not greedy and top_k > 0 and top_k < V
                searching_p: T.let[T.bool] = not greedy and top_p < T.float32(1)
                top_key: T.let[T.int64] = key_of(best[0])
                # 2. the floor: top-k's from the threads' maxima (their k-th largest key), else top-p's or
                # min_p's from the maximum; 0 (none) for greedy rows and rows without a filter
                floor_k: T.let[T.bool] = searching_k and top_k <= NT
                cand_val[tx] = best[2]
                bounds[0] = T.int64(0)
                bounds[1] = top_key
                search_from(sb, bounds, tx)  # (its barrier also orders the maxima before their reads)
                for _it in T.serial(T.if_then_else(floor_k, ROUNDS, 0)):  # the same for every thread
                    multisect(True, part, sb, cand_val, NT, tx, top_k, T.int64(0), best[0], inv_temp, bounds, ms,
                              one, mine, nxt)
                bounds[4] = T.int64(0)
                if floor_k:
                    bounds[4] = bounds[0]
                elif searching_p and not searching_k:
                    bounds[4] = key_of(best[0] + temp * (T.log((T.float32(1) - top_p) / T.float32(V)) - T.float32(1)))
                elif not greedy and not searching_k and not searching_p and min_p > T.float32(0):
                    bounds[4] = key_of(best[0] + temp * (T.log(min_p) - T.float32(0.01)))
                compacting: T.let[T.bool] = bounds[4] > T.int64(0)
                # 3. count the candidates over contiguous ranges (and a top-p-only row's kept mass), copy
                # them in id order when they fit
                mine[0] = T.float32(0)
                full[0] = T.float32(0)
                if compacting:
                    range_pass("count", seen, logits, r, tx, bounds[4], T.int64(KEY_MAX),
                               mine, full, cand_val, cand_id, at,
                               searching_p and not searching_k, best[0], inv_temp, min_p, T.float32(0), pick, idx)
                prefix(part, part1, mine, cum, total, tx)
                n_cand: T.let[T.int32] = T.Cast("int32", total[0])
                use_cand: T.let[T.bool] = compacting and n_cand <= CAP
                if use_cand:
                    at[0] = T.Cast("int32", cum[0])
                    range_pass("copy", seen, logits, r, tx, bounds[4], T.int64(KEY_MAX),
                               mine, full, cand_val, cand_id, at, False,
                               best[0], inv_temp, min_p, T.float32(0), pick, idx)
                block_sum(part, full, tx)  # its barriers also order the copy before the reads
                n: T.let[T.int32] = T.if_then_else(use_cand, n_cand, V)
                cn: T.let[T.int32] = (n + NT - 1) // NT  # contiguous candidates per thread
                # 4. top-k: the largest key K with count(key >= K) >= k, from the floor up
                bounds[0] = bounds[4]
                bounds[1] = top_key
                search_from(sb, bounds, tx)
                for _it in T.serial(T.if_then_else(searching_k and use_cand, ROUNDS, 0)):
                    multisect(True, part, sb, cand_val, n, tx, top_k, T.int64(0), best[0], inv_temp, bounds, ms,
                              one, mine, nxt)
                for _it in T.serial(T.if_then_else(searching_k and not use_cand, 32, 0)):
                    mid: T.let[T.int64] = (bounds[0] + bounds[1] + 1) // 2
                    two[0] = T.float32(0)
                    two[1] = T.float32(0)
                    mass_row(two, seen, logits, r, tx, T.int64(KEY_MAX), mid, mid, best[0], inv_temp)
                    block_sum2(part, two, tx)
                    if T.Cast("int64", two[1]) >= top_k:
                        bounds[0] = mid
                    else:
                        bounds[1] = mid - 1
                bounds[2] = T.if_then_else(searching_k, bounds[0], T.int64(0))
                # 5. top-p: the smallest key K with mass(kept, key > K) < top_p * mass(kept)
                two[0] = T.float32(0)
                two[1] = T.float32(0)
                # (over the source, which holds every kept token, unless the floor is top-p's own; over the
                # row, also how many kept tokens the search starts with)
                if searching_p and (searching_k or not compacting):
                    if use_cand:
                        for i in T.serial(cn):
                            if i * NT + tx < n:
                                one[0] = cand_val[i * NT + tx]
                                if key_of(one[0]) >= bounds[2]:
                                    two[0] = two[0] + prob(one[0], best[0], inv_temp)
                    else:
                        mass_row(two, seen, logits, r, tx, T.int64(-1), bounds[2], T.max(bounds[4], bounds[2]),
                                 best[0], inv_temp)
                block_sum2(part, two, tx)
                best[1] = T.if_then_else(compacting and not searching_k, full[0], two[0])
                bounds[0] = T.max(bounds[4], bounds[2])
                bounds[1] = top_key
                search_from(sb, bounds, tx)
                for _it in T.serial(T.if_then_else(searching_p and use_cand, ROUNDS, 0)):
                    multisect(False, part, sb, cand_val, n, tx, top_p * best[1], bounds[2], best[0], inv_temp, bounds,
                              ms, one, mine, nxt)
                # over the row: a bisection, each step a pass, until the keys between its ends fit in shared
                # memory; then those are copied there and a multisection ends the search
                span[0] = T.if_then_else(compacting and not searching_k, T.Cast("float32", n_cand), two[1])
                span[1] = T.float32(0)
                span[2] = T.float32(0)
                while (searching_p and not use_cand and bounds[0] < bounds[1]
                       and span[0] - span[1] > T.float32(CAP)):  # (the same for every thread)
                    mid_p: T.let[T.int64] = (bounds[0] + bounds[1]) // 2
                    two[0] = T.float32(0)
                    two[1] = T.float32(0)
                    mass_row(two, seen, logits, r, tx, mid_p, bounds[2], mid_p + 1, best[0], inv_temp)
                    block_sum2(part, two, tx)
                    if two[0] < top_p * best[1]:
                        bounds[1] = mid_p
                        span[1] = two[1]
                        span[2] = two[0]
                    else:
                        bounds[0] = mid_p + 1
                        span[0] = two[1]
                narrowed: T.let[T.bool] = searching_p and not use_cand and bounds[0] < bounds[1]
                mine[0] = T.float32(0)
                if narrowed:
                    range_pass("count", seen, logits, r, tx, bounds[0], bounds[1], mine, full, cand_val, cand_id, at,
                               False, best[0], inv_temp, min_p, T.float32(0), pick, idx)
                prefix(part, part1, mine, cum, total, tx)
                if narrowed:
                    at[0] = T.Cast("int32", cum[0])
                    range_pass("copy", seen, logits, r, tx, bounds[0], bounds[1], mine, full, cand_val, cand_id, at,
                               False, best[0], inv_temp, min_p, T.float32(0), pick, idx)
                search_from(sb, bounds, tx)  # (its barrier also orders the copy before the reads)
                for _it in T.serial(T.if_then_else(narrowed, ROUNDS, 0)):
                    multisect(False, part, sb, cand_val, T.Cast("int32", total[0]), tx, top_p * best[1] - span[2],
                              bounds[2], best[0], inv_temp, bounds, ms, one, mine, nxt)
                # the kept keys: from the top-k cut, and from the top-p cut when there is one
                bounds[3] = T.max(bounds[2], T.if_then_else(searching_p, bounds[0], T.int64(0)))
                # 6. kept mass per thread's contiguous range of the source, its prefix, and the draw
                mine[0] = T.float32(0)
                if not greedy:
                    if use_cand:
                        kept_cands(False, mine, one, cand_val, cand_id, n, cn, tx, bounds[3], best[0], inv_temp, min_p,
                                   T.float32(0), pick, idx)
                    else:
                        range_pass("kept", seen, logits, r, tx, bounds[3], T.int64(KEY_MAX),
                                   mine, full, cand_val, cand_id, at, False,
                                   best[0], inv_temp, min_p, T.float32(0), pick, idx)
                prefix(part, part1, mine, cum, total, tx)  # total: the kept mass; cum: before this thread
                target: T.let[T.float32] = uniform[r] * total[0]
                # the thread whose range holds the target picks; ties at a range edge go to the later
                # thread (the first id whose cumulative mass exceeds the target)
                if not greedy and cum[0] <= target and (cum[0] + mine[0] > target or tx == NT - 1):
                    pick[0] = -1
                    if use_cand:
                        kept_cands(True, cum, one, cand_val, cand_id, n, cn, tx, bounds[3], best[0], inv_temp, min_p,
                                   target, pick, idx)
                    else:
                        range_pass("pick", seen, logits, r, tx, bounds[3], T.int64(KEY_MAX),
                                   cum, full, cand_val, cand_id, at, False,
                                   best[0], inv_temp, min_p, target, pick, idx)
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

"""Mixture-of-experts FFN (Qwen3-MoE): router top-k, token → expert dispatch, grouped expert GEMMs and the
weighted combine, for dense and INT4/INT8 experts, with the numpy reference.

Shapes (``T`` tokens, ``E`` experts, ``k`` experts per token, ``S = T * k`` slots, slot ``s`` is token
``s // k``'s ``s % k``-th choice):
- ``moe_topk(logits[T,E]) -> weights[T,k] float32, ids[S] int32``: softmax in float32, the ``k`` largest
  (ties: lowest expert id), renormalised to sum 1 when ``norm_topk_prob``.
- ``moe_dispatch(ids[S]) -> offsets[E+1], order[S]``: a counting sort of the slots by expert, so
  ``order[offsets[e]:offsets[e+1]]`` are the slots routed to expert ``e``.
- ``grouped_linear(x, W[E*N, K] (dense or packed as in quant_linear), offsets, order) -> out[S, N]``:
  ``out[s] = x[s // x_div] @ W[e*N:(e+1)*N].T`` for the expert ``e`` that slot ``s`` was sorted under.
  Experts' weights are stacked along rows, so quantization and packing are exactly those of a linear.
  The CPU kernel runs one task per (expert, block of rows): an expert with no tokens is skipped, so a
  decode step reads only the selected experts' weights, and a selected one is dequantized once into a
  float32 tile reused by every token routed to it (the grouped GEMM).
- combine (TE): ``y[t] = sum_j weights[t, j] * down_out[t*k + j]``.
GPU targets bind the routing loops to threads. Their decode entry point sorts the slots (one thread: a
decode step has few) and runs each expert matmul as a grouped GEMV (``quant_linear.make_gemv_gpu`` with
``experts``): a block per (4 rows, expert), so only chosen experts' weights are read. Their general entry
point computes the expert matmuls as one gathered TE reduction per slot (scheduled by dlight).
"""

from __future__ import annotations

import numpy as np

from . import quant_linear
from .paged_attention import _mark, _thread_loops, scratch_scope
from .quant_linear import QuantFormat

_ROWS_PER_TASK = 16
_LANES = 16


def make_moe_topk(num_experts: int, top_k: int, norm_topk_prob: bool, kind: str):
    from tvm.script import tirx as T

    E, K = num_experts, top_k
    outer, inner, C = _thread_loops(kind)
    scratch = scratch_scope(kind)

    @T.prim_func(private=True, s_tir=True)
    def moe_topk(l_h: T.handle, w_h: T.handle, i_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        ntok = T.int64()
        logits = T.match_buffer(l_h, (ntok, E), "float32")
        weights = T.match_buffer(w_h, (ntok, K), "float32")
        ids = T.match_buffer(i_h, (ntok * K,), "int32")
        with T.sblock("root"):  # a root block, as Relax's pattern analysis of single-input calls expects
            for bx in outer((ntok + C - 1) // C):
                for tx in inner(C):
                    if bx * C + tx < ntok:
                        t: T.let[T.int64] = bx * C + tx
                        st = T.alloc_buffer((3,), "float32", scope=scratch)  # max logit, softmax denominator, chosen sum
                        best = T.alloc_buffer((2,), "int32", scope=scratch)  # best id so far, "already chosen" flag
                        st[0] = logits[t, 0]
                        for e in T.serial(E):
                            st[0] = T.max(st[0], logits[t, e])
                        st[1] = T.float32(0)
                        for e in T.serial(E):
                            st[1] = st[1] + T.exp(logits[t, e] - st[0])
                        st[2] = T.float32(0)
                        for j in T.serial(K):
                            best[0] = -1
                            for e in T.serial(E):
                                best[1] = 0
                                for jj in T.serial(j):
                                    if ids[t * K + jj] == T.Cast("int32", e):
                                        best[1] = 1
                                if best[1] == 0:
                                    if best[0] < 0:
                                        best[0] = T.Cast("int32", e)
                                    elif logits[t, e] > logits[t, best[0]]:
                                        best[0] = T.Cast("int32", e)
                            ids[t * K + j] = best[0]
                            weights[t, j] = T.exp(logits[t, best[0]] - st[0]) / st[1]
                            st[2] = st[2] + weights[t, j]
                        if norm_topk_prob:
                            for j in T.serial(K):
                                weights[t, j] = weights[t, j] / st[2]

    return _mark(moe_topk, kind)


def make_moe_dispatch(num_experts: int, kind: str):
    """Counting sort of slots by expert; serial (``S`` is small next to the expert GEMMs it orders)."""
    from tvm.script import tirx as T

    E = num_experts
    outer, inner, _ = _thread_loops(kind)
    scratch = scratch_scope(kind)

    @T.prim_func(private=True, s_tir=True)
    def moe_dispatch(i_h: T.handle, off_h: T.handle, ord_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        nslot = T.int64()
        ids = T.match_buffer(i_h, (nslot,), "int32")
        offsets = T.match_buffer(off_h, (E + 1,), "int32")
        order = T.match_buffer(ord_h, (nslot,), "int32")
        with T.sblock("root"):  # a root block, as Relax's pattern analysis of single-input calls expects
            for bx in outer(1):
                for tx in inner(1):
                    cursor = T.alloc_buffer((E + 1,), "int32", scope=scratch)
                    for e in T.serial(E + 1):
                        offsets[e] = 0
                    for s in T.serial(nslot):
                        offsets[ids[s] + 1] = offsets[ids[s] + 1] + 1
                    for e in T.serial(E):
                        offsets[e + 1] = offsets[e + 1] + offsets[e]
                    for e in T.serial(E + 1):
                        cursor[e] = offsets[e]
                    for s in T.serial(nslot):
                        order[cursor[ids[s]]] = T.Cast("int32", s)
                        cursor[ids[s]] = cursor[ids[s]] + 1

    return _mark(moe_dispatch, kind)


def make_grouped_linear_cpu(num_experts: int, in_features: int, out_features: int, x_div: int,
                            fmt: QuantFormat | None, x_dtype: str, w_dtype: str):
    """PrimFunc ``grouped_linear(x[?, K], w..., offsets[E+1], order[S], out[S, N])`` (float32 out);
    ``w...`` is ``w[E*N, K]`` dense or ``qweight, scales[, mins]`` packed."""
    from tvm.script import tirx as T

    E, K, N, R, L = num_experts, in_features, out_features, _ROWS_PER_TASK, _LANES
    blocks = (N + R - 1) // R
    KV = K // L
    load_row = quant_linear.row_loader(fmt, K)
    if fmt is None:
        wspecs = [((E * N, K), w_dtype)]
    else:
        shapes = fmt.packed_shapes(E * N, K)
        wspecs = [shapes[r] for r in ("qweight", "scales", "mins") if r in shapes]

    @T.macro
    def body(x, w, scales, mins, offsets, order, out, nslot):
        for task in T.parallel(E * blocks):
            e: T.let[T.int32] = task // blocks
            n0: T.let[T.int32] = (task % blocks) * R
            if offsets[e + 1] > offsets[e]:  # experts nobody chose are never read
                tile = T.alloc_buffer((R, K), "float32")
                acc = T.alloc_buffer((L,), "float32")  # CPU: a stack slot (see scratch_scope)
                for r in T.serial(R):
                    if n0 + r < N:
                        load_row(tile, w, scales, mins, r, e * N + n0 + r)
                for p in T.serial(offsets[e + 1] - offsets[e]):
                    slot: T.let[T.int32] = order[offsets[e] + p]
                    for r in T.serial(R):
                        if n0 + r < N:
                            for ll in T.vectorized(L):
                                acc[ll] = T.float32(0)
                            for ko in T.serial(KV):
                                for ll in T.vectorized(L):
                                    acc[ll] = acc[ll] + T.Cast("float32", x[slot // x_div, ko * L + ll]) * tile[r, ko * L + ll]
                            for kt in T.serial(K - KV * L):
                                acc[0] = acc[0] + T.Cast("float32", x[slot // x_div, KV * L + kt]) * tile[r, KV * L + kt]
                            for ll in T.serial(L - 1):
                                acc[0] = acc[0] + acc[ll + 1]
                            out[slot, n0 + r] = acc[0]

    if len(wspecs) == 1:
        @T.prim_func(private=True)
        def grouped_linear_1(x_h: T.handle, w: T.Buffer(*wspecs[0]), off: T.Buffer((E + 1,), "int32"),  # type: ignore[misc,valid-type]
                             o_h: T.handle, out_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            nx, nslot = T.int64(), T.int64()
            body(T.match_buffer(x_h, (nx, K), x_dtype), w, None, None, off, T.match_buffer(o_h, (nslot,), "int32"),
                 T.match_buffer(out_h, (nslot, N), "float32"), nslot)
        return grouped_linear_1
    if len(wspecs) == 2:
        @T.prim_func(private=True)
        def grouped_linear_2(x_h: T.handle, w: T.Buffer(*wspecs[0]), s: T.Buffer(*wspecs[1]),  # type: ignore[misc,valid-type]
                             off: T.Buffer((E + 1,), "int32"), o_h: T.handle, out_h: T.handle):  # type: ignore[valid-type]
            T.func_attr({"tirx.noalias": True})
            nx, nslot = T.int64(), T.int64()
            body(T.match_buffer(x_h, (nx, K), x_dtype), w, s, None, off, T.match_buffer(o_h, (nslot,), "int32"),
                 T.match_buffer(out_h, (nslot, N), "float32"), nslot)
        return grouped_linear_2

    @T.prim_func(private=True)
    def grouped_linear_3(x_h: T.handle, w: T.Buffer(*wspecs[0]), s: T.Buffer(*wspecs[1]),  # type: ignore[misc,valid-type]
                         m: T.Buffer(*wspecs[2]), off: T.Buffer((E + 1,), "int32"), o_h: T.handle,  # type: ignore[misc,valid-type]
                         out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        nx, nslot = T.int64(), T.int64()
        body(T.match_buffer(x_h, (nx, K), x_dtype), w, s, m, off, T.match_buffer(o_h, (nslot,), "int32"),
             T.match_buffer(out_h, (nslot, N), "float32"), nslot)
    return grouped_linear_3


def grouped_linear_te(out_features: int, x_div: int, fmt: QuantFormat | None):
    """GPU form: ``f(x, w..., ids[S])`` → ``[S, N]``, each slot reading its own expert's rows."""
    from tvm import te, tirx

    N = out_features

    def f(x, *rest):
        ids, w = rest[-1], rest[:-1]
        K = x.shape[1]
        kk = te.reduce_axis((0, K), name="k")

        def weight(s, n, c):
            row = ids[s].astype("int64") * N + n
            if fmt is None:
                return w[0][row, c].astype("float32")
            mins = w[2] if not fmt.sym else None
            return quant_linear.dequant_expr(fmt, tirx, w[0], w[1], mins, row, c)

        return te.compute((ids.shape[0], N), lambda s, n: te.sum(
            x[s // x_div, kk].astype("float32") * weight(s, n, kk), axis=kk), name="grouped_linear")

    return f


def combine_te(top_k: int, out_dtype: str):
    """``f(weights[T,k], y[S,D])`` → ``[T, D]``: the routing-weighted sum of each token's experts."""
    from tvm import te

    def f(weights, y):
        j = te.reduce_axis((0, top_k), name="j")
        acc = te.compute((weights.shape[0], y.shape[1]), lambda t, d: te.sum(
            weights[t, j] * y[t * top_k + j, d], axis=j), name="moe_combine")
        if out_dtype == "float32":
            return acc
        return te.compute(acc.shape, lambda t, d: acc[t, d].astype(out_dtype), name="moe_combine_cast")

    return f


# ----------------------------------------------------------------------------- numpy references

def topk_ref(logits: np.ndarray, top_k: int, norm_topk_prob: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(weights[T,k], ids[T,k])``, as transformers' Qwen3MoeTopKRouter (ties: lowest id first)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, ids, axis=-1)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return w, ids.astype(np.int32)


def dispatch_ref(ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable").astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=num_experts))]).astype(np.int32)
    return offsets, order


def moe_ref(x: np.ndarray, logits: np.ndarray, gate_up: np.ndarray, down: np.ndarray, top_k: int,
            norm_topk_prob: bool) -> np.ndarray:
    """``x[T,D]``, router ``logits[T,E]``, ``gate_up[E*2I, D]`` (gate rows then up rows per expert),
    ``down[E*D, I]`` → ``[T, D]`` in float64."""
    num_experts = logits.shape[1]
    inter = gate_up.shape[0] // num_experts // 2
    d = x.shape[1]
    w, ids = topk_ref(logits, top_k, norm_topk_prob)
    out = np.zeros((x.shape[0], d))
    gu = gate_up.astype(np.float64).reshape(num_experts, 2 * inter, d)
    dn = down.astype(np.float64).reshape(num_experts, d, inter)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = ids[t, j]
            h = gu[e] @ x[t].astype(np.float64)
            g, u = h[:inter], h[inter:]
            out[t] += w[t, j] * (dn[e] @ (g / (1 + np.exp(-g)) * u))
    return out

"""Sampling on the device: greedy token choice (argmax over the vocabulary), with its numpy reference.

A decode step of plain greedy rows then returns ``L`` token ids instead of ``[L, vocab]`` float32 logits
(608 KiB per row for a 151936-token vocabulary, copied to the host and scanned there). Ties go to the
lowest token id, as ``numpy.argmax`` and the host sampler break them.
"""

from __future__ import annotations

import numpy as np

GPU_THREADS = 256
NEG_INF = float("-inf")


def make_argmax(vocab: int, kind: str):
    """PrimFunc ``argmax(logits[L, V] float32, out[L] int32)``.

    GPU: a block per row; thread ``i`` scans columns ``i, i+256, ...`` keeping its first maximum, then a
    shared-memory tree keeps the larger value (the lower id on a tie). CPU: rows in parallel, one scan each.
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

    NT = GPU_THREADS
    steps = NT.bit_length() - 1

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
                best[0] = T.float32(NEG_INF)
                idx[0] = V  # no column yet: loses every tie, so a thread past the vocabulary never wins
                for c in T.serial((V + NT - 1) // NT):
                    if c * NT + tx < V:
                        if logits[r, c * NT + tx] > best[0] or idx[0] == V:
                            best[0] = logits[r, c * NT + tx]
                            idx[0] = T.Cast("int32", c * NT + tx)
                vals[tx] = best[0]
                ids[tx] = idx[0]
                T.tvm_storage_sync("shared")
                for step in T.unroll(steps):  # read the partner into registers, then publish
                    if tx < T.shift_right(NT, step + 1):
                        other: T.let[T.float32] = vals[tx + T.shift_right(NT, step + 1)]
                        other_id: T.let[T.int32] = ids[tx + T.shift_right(NT, step + 1)]
                        if other > best[0] or (other == best[0] and other_id < idx[0]):
                            best[0] = other
                            idx[0] = other_id
                    T.tvm_storage_sync("shared")
                    if tx < T.shift_right(NT, step + 1):
                        vals[tx] = best[0]
                        ids[tx] = idx[0]
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    out[r] = idx[0]

    return argmax_gpu


def argmax_ref(logits: np.ndarray) -> np.ndarray:
    """First index of each row's maximum, int32."""
    return np.argmax(logits, axis=1).astype(np.int32)

"""Sampling on the device: greedy token choice (argmax over the vocabulary), with its numpy reference.

A decode step of plain greedy rows then returns ``L`` token ids instead of ``[L, vocab]`` float32 logits
(608 KiB per row for a 151936-token vocabulary, copied to the host and scanned there). Ties go to the
lowest token id, as ``numpy.argmax`` and the host sampler break them.
"""

from __future__ import annotations

import numpy as np

GPU_THREADS = 256


def make_argmax(vocab: int, kind: str):
    """PrimFunc ``argmax(logits[L, V] float32, out[L] int32)``.

    GPU: a block per row; thread ``i`` scans columns ``i, i+256, ...`` keeping its first maximum, then a
    shared-memory tree keeps the larger value (the lower id on a tie). CPU: rows in parallel, one scan each.
    """
    from tvm.script import tirx as T

    V = vocab
    if kind == "cpu":
        @T.prim_func(private=True)
        def argmax_cpu(l_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            nrow = T.int64()
            logits = T.match_buffer(l_h, (nrow, V), "float32")
            out = T.match_buffer(o_h, (nrow,), "int32")
            for r in T.parallel(nrow):
                best = T.alloc_buffer((1,), "float32")
                idx = T.alloc_buffer((1,), "int32")
                best[0] = logits[r, 0]
                idx[0] = 0
                for v in T.serial(V - 1):
                    if logits[r, v + 1] > best[0]:
                        best[0] = logits[r, v + 1]
                        idx[0] = T.Cast("int32", v + 1)
                out[r] = idx[0]

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
                best[0] = T.float32(-3.4e38)
                idx[0] = V  # no column yet (a thread past the vocabulary never wins a comparison)
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

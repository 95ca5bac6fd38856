"""Block-wide reductions for GPU kernels, as TIR macros shared by the kernel families.

They go through shared memory in rounds: threads read partials into registers, everyone waits, some
publish, everyone waits. A branch therefore only reads or only writes shared memory, which TVM's barrier
planner requires (it will not put a barrier inside a branch).
Warp shuffles would be faster on CUDA but have no OpenCL form, and the tests run these kernels on the
CPU through OpenCL (tests/gpu_emu.py).
"""

from __future__ import annotations


def threads_for(n: int, limit: int = 1024) -> int:
    """The power of two >= ``n`` (at least 2), capped at ``limit``: a block giving each of ``n`` columns
    its own thread, in the shape these reductions need."""
    return min(limit, 1 << max(n - 1, 1).bit_length())


def block_sum(threads: int, width: int):
    """Macro ``(part, mine, tx)``: ``part`` a shared ``[threads, width]`` float32 buffer, ``mine`` this
    thread's ``[width]`` local partial sums. Afterwards every thread's ``mine`` holds the block's sums.
    ``threads`` is a power of two. Transposed rather than a tree: 32 threads each sum every 32nd partial
    (consecutive threads, consecutive words: no bank conflicts), then every thread sums those 32: 4
    barriers whatever ``threads`` is (a tree over 1024 threads takes 22)."""
    from tvm.script import tirx as T

    L = min(32, threads)  # the threads of the first round
    R = threads // L  # partials each of them sums
    assert threads == L * R and threads & (threads - 1) == 0, threads

    @T.macro
    def reduce(part, mine, tx):
        for j in T.unroll(width):
            part[tx, j] = mine[j]
        T.tvm_storage_sync("shared")
        if tx < L:
            for j in T.unroll(width):
                mine[j] = T.float32(0)
                for i in T.unroll(R):
                    mine[j] = mine[j] + part[i * L + tx, j]
        T.tvm_storage_sync("shared")
        if tx < L:
            for j in T.unroll(width):
                part[tx, j] = mine[j]
        T.tvm_storage_sync("shared")
        for j in T.unroll(width):
            mine[j] = T.float32(0)
            for i in T.unroll(L):
                mine[j] = mine[j] + part[i, j]
        T.tvm_storage_sync("shared")  # part may be written again after this

    return reduce


def block_sum_columns(threads: int, width: int, groups: int = 1):
    """Macro ``(part, mine, tx)`` for many sums at once (``width`` >= 2): ``part`` a shared float32 buffer
    of ``threads * (width + 1)`` (rows of ``width`` and a padding word that keeps the column readers on
    distinct banks; flat, as TVM would compact a 2-D buffer's unread column away), ``mine`` this thread's
    ``[width]`` local partials (clobbered). The block's threads form ``groups`` runs of ``threads /
    groups`` consecutive threads (``width`` dividing that), each summed on its own: afterwards
    ``part[g * (threads / groups) * (width + 1) + j]`` holds column ``j`` of group ``g``'s sum. Transposed
    rather than a tree: each of a group's slices of ``width`` threads sums its share of every column, then
    ``width`` threads sum the slices (skipped when a group is one slice): at most 5 barriers instead of a
    tree's ``2 log2(threads)``, and a thread adds ``width`` partials once instead of at every step."""
    from tvm.script import tirx as T

    TG = threads // groups  # threads of a group
    assert width >= 2 and threads % groups == 0 and TG % width == 0, (threads, width, groups)
    S = TG // width  # slices of a group
    W = width + 1  # a row's stride

    @T.macro
    def reduce(part, mine, tx):
        for j in T.unroll(width):
            part[tx * W + j] = mine[j]
        T.tvm_storage_sync("shared")
        mine[0] = T.float32(0)
        for i in T.unroll(width):  # slice (tx % TG) // width of the group: its rows, column tx % width
            mine[0] = mine[0] + part[(tx // width * width + i) * W + tx % width]
        T.tvm_storage_sync("shared")
        part[(tx // TG * TG + tx % TG // width) * W + tx % width] = mine[0]
        T.tvm_storage_sync("shared")
        if S > 1:
            if tx % TG < width:
                mine[0] = T.float32(0)
                for i in T.unroll(S):
                    mine[0] = mine[0] + part[(tx // TG * TG + i) * W + tx % TG]
            T.tvm_storage_sync("shared")
            if tx % TG < width:
                part[tx // TG * TG * W + tx % TG] = mine[0]
            T.tvm_storage_sync("shared")

    return reduce


def block_argmax(threads: int):
    """Macro ``(vals, ids, best, idx, tx)``: ``vals``/``ids`` shared ``[threads]`` float32/int32 buffers,
    ``best[0]``/``idx[0]`` this thread's maximum and its id (an id past every real one for a thread with
    nothing). Afterwards every thread holds the block's maximum and, among equal ones, the lowest id.
    Transposed as ``block_sum``: 32 threads each keep the best of every 32nd entry, then every thread the
    best of those 32: 4 barriers (a tree over 1024 threads took 22)."""
    from tvm.script import tirx as T

    L = min(32, threads)  # the threads of the first round
    R = threads // L  # entries each of them compares
    assert threads == L * R and threads & (threads - 1) == 0, threads

    @T.macro
    def reduce(vals, ids, best, idx, tx):
        vals[tx] = best[0]
        ids[tx] = idx[0]
        T.tvm_storage_sync("shared")
        if tx < L:
            for i in T.unroll(1, R):  # (shared values bound first: never read in a condition)
                other: T.let[T.float32] = vals[i * L + tx]
                other_id: T.let[T.int32] = ids[i * L + tx]
                if other > best[0] or (other == best[0] and other_id < idx[0]):
                    best[0] = other
                    idx[0] = other_id
        T.tvm_storage_sync("shared")
        if tx < L:
            vals[tx] = best[0]
            ids[tx] = idx[0]
        T.tvm_storage_sync("shared")
        best[0] = vals[0]
        idx[0] = ids[0]
        for i in T.unroll(1, L):
            top: T.let[T.float32] = vals[i]
            top_id: T.let[T.int32] = ids[i]
            if top > best[0] or (top == best[0] and top_id < idx[0]):
                best[0] = top
                idx[0] = top_id
        T.tvm_storage_sync("shared")  # vals and ids may be written again after this

    return reduce

"""GPU kernels of ``schedules/`` run on this CPU (their TIR lowered for OpenCL, run by PoCL:
tests/gpu_emu.py) against the numpy references. float32 variants: PoCL has no half arithmetic; the
float16 builds of the same kernels are compiled for every CUDA arch in tests/test_gpu_targets.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ferrum.schedules import linear as lin
from ferrum.schedules import mma_linear as ml
from ferrum.schedules import moe
from ferrum.schedules import norm
from ferrum.schedules import paged_attention as pa
from ferrum.schedules import quant_linear as ql
from ferrum.schedules import rope
from ferrum.schedules import sampling as sm

from . import gpu_emu

pytestmark = pytest.mark.kernel

_built: dict = {}


def _kernel(key, make):
    if key not in _built:
        _built[key] = make()
    return _built[key]


def _ragged_attention(rng, ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, window=0):
    """Ragged batch (sequence b: ctx_lens[b] cached tokens, q_lens[b] new ones, shuffled blocks):
    ``(q, cache, positions, query_start, block_tables, reference output)``."""
    batch = len(ctx_lens)
    per_seq = max(-(-(c + q) // block_size) for c, q in zip(ctx_lens, q_lens))
    num_blocks = per_seq * batch + 2
    tables = rng.permutation(num_blocks)[: per_seq * batch].reshape(batch, per_seq).astype(np.int32)
    cache = rng.standard_normal((num_blocks, 2, kv_heads, block_size, head_dim)).astype(np.float32)
    positions = np.concatenate([np.arange(c, c + q) for c, q in zip(ctx_lens, q_lens)]).astype(np.int32)
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    ntok = int(query_start[-1])
    q = rng.standard_normal((ntok, heads, head_dim)).astype(np.float32)
    ref = pa.attention_ref(q, cache, positions, query_start, tables, sliding_window=window)
    return q, cache, positions, query_start, tables, ref


def run_attention(rng, ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, window=0, splits=None,
                  tile_tokens=0, pdl="", merged=False):
    """A ragged batch through the split kernel and the merge (``merged``: the split kernel's last block
    per token and KV head merges; its counters must be back to zero); returns (out, reference, partial
    max/sum)."""
    q, cache, positions, query_start, tables, ref = _ragged_attention(rng, ctx_lens, q_lens, heads, kv_heads,
                                                                      head_dim, block_size, window)
    ntok, per_seq = q.shape[0], tables.shape[1]
    ns = splits or pa.gpu_num_splits_of(ntok, per_seq, block_size)
    part_acc = np.full((ntok, heads, ns, head_dim), np.nan, np.float32)  # every element must be written
    part_ml = np.full((ntok, heads, ns, 2), np.nan, np.float32)
    out = np.full_like(q, np.nan)
    split = _kernel(("split", heads, kv_heads, head_dim, block_size, window, tile_tokens, pdl, merged),
                    lambda: pa.make_attention_gpu(heads, kv_heads, head_dim, block_size, "float32",
                                                  sliding_window=window, tile_tokens=tile_tokens, pdl=pdl,
                                                  merged=merged))
    if merged:
        counters = np.zeros((ntok, kv_heads), np.int32)
        gpu_emu.run(split, q, cache, positions, query_start, tables, counters, part_acc, part_ml, out)
        assert not counters.any()  # reset by each merging block, for the next layer
        return out, ref, part_ml
    gpu_emu.run(split, q, cache, positions, query_start, tables, part_acc, part_ml)
    merge = _kernel(("merge", heads, head_dim), lambda: pa.make_attention_merge_gpu(heads, head_dim, "float32"))
    gpu_emu.run(merge, part_acc, part_ml, out)
    return out, ref, part_ml


HEADS = st.sampled_from([(1, 1), (4, 2), (8, 2), (6, 1), (9, 3), (32, 8)])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 4), heads=HEADS, head_dim=st.sampled_from([8, 32, 128]),
       block_size=st.sampled_from([1, 4, 16, 32]), data=st.data())
def test_split_attention_matches_reference(seed, batch, heads, head_dim, block_size, data):
    rng = np.random.default_rng(seed)
    ctx = data.draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    qlen = data.draw(st.lists(st.integers(1, 40), min_size=batch, max_size=batch))
    out, ref, part_ml = run_attention(rng, ctx, qlen, heads[0], heads[1], head_dim, block_size)
    assert not np.isnan(part_ml).any()
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ctx,qlen,splits,tile_tokens,pdl,window", [
    ([600, 10, 33], [1, 1, 1], None, 0, "", 0),  # decode over long contexts: several splits, GQA group 4
    ([100, 513], [2, 1], 5, 0, "", 0),  # more splits than some sequences have keys: empty splits merge to nothing
    ([0, 40], [70, 1], None, 0, "", 0),  # a prefill spanning several query tiles beside a decode
    # the decode entry points' kernel, one token per tile: token t is sequence t's, and the block-table
    # entries it reads on that guess are the ones it uses
    ([600, 10, 33], [1, 1, 1], None, 1, "", 0),
    ([100, 5], [3, 4], 3, 1, "", 0),  # ... also given a few tokens of one sequence: the guess fails, re-read
    ([600, 10, 33], [1, 1, 1], 2, 1, "", 100),  # ... a window starting past a split's first tile: re-read
    ([600, 10, 33], [1, 1, 1], None, 1, "early", 0),  # ... waiting for the previous kernel (a no-op here) late
    ([0, 40], [70, 1], None, 0, "late", 0),  # ... and letting the next one launch after that wait
])
def test_decode_and_prefill_splits(ctx, qlen, splits, tile_tokens, pdl, window):
    out, ref, part_ml = run_attention(np.random.default_rng(1), ctx, qlen, 32, 8, 64, 16, splits=splits,
                                      tile_tokens=tile_tokens, pdl=pdl, window=window)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
    if splits == 5:  # sequence 0 (102 keys) leaves splits 1..4 of its tokens empty: max -3e38, sum 0
        assert (part_ml[:2, :, 1:, 0] < -1e38).all() and (part_ml[:2, :, 1:, 1] == 0).all()


@pytest.mark.parametrize("ctx,qlen,splits,pdl,window", [
    ([600, 10, 33], [1, 1, 1], None, "", 0),  # 10 splits of 64 keys, most of them empty for two sequences
    ([100, 5], [3, 4], 3, "", 0),  # several tokens of a sequence: one counter (token, KV head) each
    ([600, 10, 33], [1, 1, 1], 2, "early", 100),  # a window, the wait for the kernel before
    ([40], [1], 1, "", 0)])  # one split: its block is the last
def test_decode_splits_merged_in_the_kernel(ctx, qlen, splits, pdl, window):
    """``make_attention_gpu(merged=True)`` (CUDA decode builds): each (token, KV head)'s last split block
    to count itself merges every split into ``out`` and sets its counter back to zero."""
    out, ref, _ = run_attention(np.random.default_rng(2), ctx, qlen, 32, 8, 64, 16, splits=splits, tile_tokens=1,
                                pdl=pdl, window=window, merged=True)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_decode_attention_float16_build():
    """The decode entry points' float16 kernel (K/V staged as float16 with a 2-element row padding, 64-key
    tiles), emulated with half storage, over the float32 reference of the same float16 inputs."""
    rng = np.random.default_rng(3)
    q, cache, positions, query_start, tables, _ = _ragged_attention(rng, [300, 5, 64], [1, 1, 1], 32, 8, 128, 16)
    q, cache = q.astype(np.float16), cache.astype(np.float16)
    ref = pa.attention_ref(q.astype(np.float32), cache.astype(np.float32), positions, query_start, tables)
    ns = pa.gpu_num_splits_of(q.shape[0], tables.shape[1], 16)
    part_acc = np.full((q.shape[0], 32, ns, 128), np.nan, np.float32)
    part_ml = np.full((q.shape[0], 32, ns, 2), np.nan, np.float32)
    split = _kernel(("split16",), lambda: pa.make_attention_gpu(32, 8, 128, 16, "float16", tile_tokens=1))
    gpu_emu.run(split, q, cache, positions, query_start, tables, part_acc, part_ml)
    out = np.zeros_like(q)
    gpu_emu.run(_kernel(("merge16",), lambda: pa.make_attention_merge_gpu(32, 128, "float16")), part_acc, part_ml, out)
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=2e-3, rtol=2e-3)


def _reads_before_wait_from(func, name: str):
    """``func`` with every load of buffer ``name`` written before its ``griddepcontrol.wait`` (a statement
    of the kernel's top level: no loop holds both) reading a new last parameter of the same shape instead:
    the memory as it may still be while the kernel before this one runs."""
    import tvm

    lines = func.script().splitlines()
    wait = next(i for i, ln in enumerate(lines) if 'griddepcontrol("wait"' in ln)
    early = [re.sub(rf"\b{name}\[", f"{name}_early[", ln) for ln in lines[:wait]]
    assert early != lines[:wait], f"nothing reads {name} before the wait"
    at = next(i for i, ln in enumerate(early) if ln.startswith("def "))
    param = re.search(rf"\b{name}: T\.Buffer\(\(.*?\), \"\w+\"\)", early[at]).group(0)
    early[at] = early[at].replace("):", f", {name}_early{param[len(name):]}):", 1)
    return tvm.script.from_source("\n".join(early + lines[wait:]))


@pytest.mark.parametrize("ctx,qlen,splits", [([600, 10, 33], [1, 1, 1], None), ([100, 5, 0], [3, 4, 2], 3)])
def test_split_attention_reads_only_older_rows_before_its_wait(ctx, qlen, splits):
    """``make_attention_gpu(pdl="early")`` stages cache rows before waiting for the kernel before it (which
    writes this step's keys and values). Its loads before the wait are redirected to a second cache: with
    the rows this step writes NaN there, the output is still the reference (no such row is read only
    early), and with the older rows NaN in the cache proper instead, too (a split being one key tile here,
    every older row is read early and not again)."""
    heads, kv_heads, head_dim, block_size = 32, 8, 64, 16
    q, cache, positions, query_start, tables, ref = _ragged_attention(np.random.default_rng(5), ctx, qlen, heads,
                                                                      kv_heads, head_dim, block_size)
    split = _reads_before_wait_from(_kernel(("split", heads, kv_heads, head_dim, block_size, 0, 1, "early"), lambda: (
        pa.make_attention_gpu(heads, kv_heads, head_dim, block_size, "float32", tile_tokens=1, pdl="early"))), "cache")
    merge = _kernel(("merge", heads, head_dim), lambda: pa.make_attention_merge_gpu(heads, head_dim, "float32"))
    new = np.zeros(cache.shape[0] * block_size, bool)  # cache rows (block * block_size + offset) written this step
    for b, (c, n) in enumerate(zip(ctx, qlen)):
        p = np.arange(c, c + n)
        new[tables[b, p // block_size] * block_size + p % block_size] = True
    rows = new.reshape(cache.shape[0], block_size)
    ns = splits or pa.gpu_num_splits_of(q.shape[0], tables.shape[1], block_size)
    for early_nan in (True, False):
        nan_at = rows if early_nan else ~rows
        poisoned = np.where(nan_at[:, None, None, :, None], np.float32(np.nan), cache)
        early, late = (poisoned, cache) if early_nan else (cache, poisoned)
        part_acc = np.full((q.shape[0], heads, ns, head_dim), np.nan, np.float32)
        part_ml = np.full((q.shape[0], heads, ns, 2), np.nan, np.float32)
        gpu_emu.run(split, q, late, positions, query_start, tables, part_acc, part_ml, early)
        out = np.zeros_like(q)
        gpu_emu.run(merge, part_acc, part_ml, out)
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window(window):
    out, ref, _ = run_attention(np.random.default_rng(window), [0, 20, 300], [12, 1, 30], 4, 2, 16, 4, window=window)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ctx,qlen,heads,head_dim,block_size,window", [
    ([0, 5], [20, 40], (4, 1), 32, 16, 0),  # 4 heads of a KV head per tile, 16 tokens: 2 + 3 tiles
    ([0, 40, 3], [70, 1, 9], (8, 2), 16, 4, 0),  # key tiles across blocks; a decode token in its own tile
    ([10, 100], [33, 4], (9, 3), 16, 16, 0),  # group 3: one head per tile, 64 tokens
    ([0, 20, 300], [12, 1, 30], (4, 2), 16, 4, 5),  # group 2, sliding window
])
def test_tensor_core_attention_matches_reference(ctx, qlen, heads, head_dim, block_size, window):
    """``make_prefill_attention_tc``: both products through wmma (emulated: tests/gpu_emu.py), two passes
    over the keys; every output element written (NaN-filled before)."""
    q, cache, positions, query_start, tables, ref = _ragged_attention(np.random.default_rng(len(ctx) + window), ctx,
                                                                      qlen, *heads, head_dim, block_size, window)
    attend = _kernel(("tc", *heads, head_dim, block_size, window),
                     lambda: pa.make_prefill_attention_tc(*heads, head_dim, block_size, "float32",
                                                          sliding_window=window))
    out = np.full_like(q, np.nan)
    gpu_emu.run(attend, q, cache, positions, query_start, tables, out)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_tensor_core_attention_tile_limits():
    """The tile fits 48 KiB of shared memory up to head_dim 128 in float16; wider heads, or heads not a
    multiple of 16, are refused (lowering keeps the split kernel for them)."""
    assert pa.tc_attention_fits(128, "float16") and pa.tc_shared_bytes(128, "float16") <= 48 * 1024
    assert pa.tc_attention_fits(64, "bfloat16") and pa.tc_attention_fits(32, "float32")
    assert not pa.tc_attention_fits(256, "float16") and not pa.tc_attention_fits(72, "float16")
    assert [pa.tc_heads_per_tile(h, 1) for h in (1, 2, 3, 4, 6, 8, 12)] == [1, 2, 1, 4, 2, 4, 4]
    with pytest.raises(ValueError, match="does not fit"):
        pa.make_prefill_attention_tc(8, 2, 256, 16, "float16")


@pytest.mark.parametrize("ctx,qlen,heads,head_dim,block_size,window,dtype,cache_dtype,keys", [
    # 4 heads of a KV head per tile, 16 tokens: 2 + 3 tiles; a float32 cache (loaded 16 bytes at a time)
    ([0, 5], [20, 40], (4, 1), 32, 16, 0, "float16", "float32", 64),
    ([0, 40, 3], [70, 1, 9], (8, 2), 64, 4, 0, "bfloat16", "", 64),  # blocks of 4: a block-table read per V row
    # group 3: one head per tile, 64 tokens; blocks of 1; steps of 32 keys
    ([10, 100], [33, 4], (9, 3), 32, 1, 0, "float16", "", 32),
    # sliding window, keys from a multiple of 64: a step wholly before the first token but partly before the
    ([150], [90], (2, 2), 64, 16, 70, "bfloat16", "", 64),  # last one's window (keys 64-127 of tile 1)
])
def test_mma_attention_matches_reference(ctx, qlen, heads, head_dim, block_size, window, dtype, cache_dtype, keys):
    """``make_prefill_attention_mma`` (FERRUM_FLASH_ATTENTION): one pass over the keys with ``mma.sync``
    (emulated with the PTX fragment layouts: tests/gpu_emu.py) and the online softmax in registers, warp
    shuffles between a row's 4 lanes. 16-bit inputs (half computed as float here, bfloat16 exactly); the
    reference is float64 on the same rounded inputs, so the tolerance covers the weights' and outputs'
    rounding to 16 bits. Every output element written (NaN-filled before)."""
    import ml_dtypes

    rng = np.random.default_rng(len(ctx) + window + head_dim)
    q, cache, positions, query_start, tables, _ = _ragged_attention(rng, ctx, qlen, *heads, head_dim, block_size,
                                                                    window)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    q, cache = q.astype(np_dtype), cache.astype(np_dtype).astype(cache_dtype or np_dtype)
    ref = pa.attention_ref(q.astype(np.float32), cache.astype(np.float32), positions, query_start, tables,
                           sliding_window=window)
    attend = _kernel(("fa", *heads, head_dim, block_size, window, dtype, cache_dtype, keys),
                     lambda: pa.make_prefill_attention_mma(*heads, head_dim, block_size, dtype, sliding_window=window,
                                                           cache_dtype=cache_dtype, keys=keys))
    out = np.full(q.shape, np.nan, np_dtype)
    gpu_emu.run(attend, q, cache, positions, query_start, tables, out)
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=2e-3 if dtype == "float16" else 2e-2, rtol=0)


def test_mma_attention_tile_limits():
    """16-bit heads of 32, 64 or 128 columns (whose 16-byte chunks split the block's threads evenly and whose
    K and V^T tiles fit 48 KiB); others keep the wmma kernel."""
    assert pa.fa_attention_fits(128, "float16") and pa.fa_shared_bytes(128) <= 48 * 1024
    assert pa.fa_attention_fits(64, "bfloat16") and pa.fa_attention_fits(32, "float16")
    assert not any(pa.fa_attention_fits(d, "float16") for d in (16, 96, 80, 256))
    assert not pa.fa_attention_fits(64, "float32") and pa.fa_shared_bytes(128, 32) < pa.fa_shared_bytes(128) // 2
    with pytest.raises(ValueError, match="does not fit"):
        pa.make_prefill_attention_mma(8, 2, 96, 16, "float16")
    with pytest.raises(ValueError, match="32 or 64 keys"):
        pa.make_prefill_attention_mma(8, 2, 64, 16, "float16", keys=16)


def test_split_key_tile_follows_the_rows():
    """A decode tile (one token's 4 grouped heads) stages a whole 64-key split at once; a 32-row prefill
    tile stages 16 keys, its queries taking most of the shared memory."""
    assert pa.split_key_tile(4, 128, "float16") == 64 and pa.split_key_tile(2, 128, "bfloat16") == 64
    assert pa.split_key_tile(32, 128, "float16") == 16 and pa.split_key_tile(32, 64, "float16") == 32
    assert pa.split_key_tile(4, 128, "float32") == 32  # the emulator's float32 builds: twice the bytes


def test_split_count_follows_batch_and_context():
    splits = pa.gpu_num_splits_of
    assert splits(1, 256, 16) == 64  # one decode over 4096 keys: 64 splits of 64
    assert splits(16, 256, 16) == 4 and splits(4, 256, 16) == 16 and splits(1, 32, 16) == 8
    assert splits(64, 256, 16) == 1 and splits(1, 1, 16) == 1  # prefill-sized batches and short contexts
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer

    for ntok, m in [(1, 256), (3, 100), (16, 256), (64, 7), (0, 1), (200, 4096)]:  # the kernels' PrimExpr form
        expr = pa.gpu_num_splits(tirx.const(ntok, "int64"), tirx.const(m, "int64"), 16)
        assert int(Analyzer().simplify(expr).value) == splits(ntok, m, 16), (ntok, m)


# ---------------------------------------------------------------- GEMV (the decode entry point's linears)

def _linear_case(rng, k, n, ntok, fmt, bias, gated):
    """``(x as the kernel reads it, weight tensors, bias or None, reference output)`` of a random (q)linear:
    ``gated``: x is a gate|up output ``[T, 2K]`` and the linear's input SiLU(gate) * up."""
    xin = rng.standard_normal((ntok, 2 * k if gated else k)).astype(np.float32)
    x = xin[:, :k] / (1 + np.exp(-xin[:, :k])) * xin[:, k:] if gated else xin
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    if fmt is None:
        w = rng.standard_normal((n, k)).astype(np.float32)
        return xin, [w], b, lin.linear_ref(x, w, b)
    q = rng.integers(0, 16 if fmt.bits == 4 else 256, (n, k))
    qweight = ql.pack_int4(q) if fmt.bits == 4 else (q - 128).astype(np.int8)
    scales = (rng.random((n, k // fmt.group_size)) * 0.1).astype(np.float32)
    mins = None if fmt.sym else (0.1 * rng.standard_normal((n, k // fmt.group_size))).astype(np.float32)
    tensors = [qweight, scales] + ([] if mins is None else [mins])
    return xin, tensors, b, ql.qlinear_ref(x, fmt, qweight, scales, mins, b)


def _gemv_case(rng, k, n, ntok, fmt, bias, lanes=16, gated=False, layout=None, prefetch=False, tokens=4, rows=4,
               pdl=""):
    xin, tensors, b, ref = _linear_case(rng, k, n, ntok, fmt, bias, gated)
    out = np.full((ntok, n), np.nan, np.float32)
    key = ("gemv", k, n, fmt, bias, lanes, gated, layout, prefetch, tokens, rows, pdl)
    func = _kernel(key, lambda: ql.make_gemv_gpu(
        k, n, fmt, "float32", "float32", "float32", "float32" if bias else None, scale_dtype="float32",
        max_lanes=lanes, gated=gated, layout=layout, prefetch=prefetch, tokens=tokens, rows_per_thread=rows, pdl=pdl))
    gpu_emu.run(func, xin, *tensors, *([b] if bias else []), out)
    return out, ref


FORMATS = st.sampled_from([None, ql.QuantFormat(4, 32, True), ql.QuantFormat(4, 128, True),
                           ql.QuantFormat(4, 64, False), ql.QuantFormat(8, 32, True), ql.QuantFormat(8, 16, False)])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), fmt=FORMATS, groups=st.integers(1, 40), n=st.integers(1, 23),
       ntok=st.integers(1, 11), bias=st.booleans(), lanes=st.sampled_from([16, 4]), gated=st.booleans(),
       layout=st.sampled_from([None, (16, 8, 2), (32, 2, 3), (128, 1, 1), (64, 2, 4)]), prefetch=st.booleans(),
       tokens=st.sampled_from([4, 1, 2]), rows=st.sampled_from([4, 2]),
       pdl=st.sampled_from(["", "early", "late", "deep"]))
def test_gemv_matches_reference(seed, fmt, groups, n, ntok, bias, lanes, gated, layout, prefetch, tokens, rows, pdl):
    """Any width (more chunks than lanes, fewer, ragged), any row count (a partial last team of 4 rows, a
    partial block of teams), any token count (partial passes of 4, 2 or 1 tokens), 16-byte loads or
    Metal's 4-lane ones; SiLU-gated input read from a gate|up projection or plain; the layout the shape
    picks, or teams of 16 to 128 lanes with 1 to 4 chunks in flight; the next step group's loads issued
    ahead (an odd or even number of groups) or not; 4 or 2 rows per thread; with or without the wait for
    the previous kernel after the first weight loads (``pdl``: a no-op here, its place in the loops is
    what is tested; ``deep``: up to 3 groups loaded before it, at one token, in as many register slots)."""
    k = groups * (fmt.group_size if fmt else 8) + (0 if fmt else seed % 3)  # dense: odd widths too
    out, ref = _gemv_case(np.random.default_rng(seed), k, n, ntok, fmt, bias, lanes, gated, layout, prefetch,
                          tokens, rows, pdl)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.sqrt(k), rtol=1e-4)


def test_deep_pdl_loads_up_to_three_groups_before_the_wait():
    """FERRUM_PDL=deep's register slots (``gemv_slots``): Qwen3-4B's one-token INT4 GEMVs load every step
    group before their wait where there are at most 3 (q|k|v: 3, o: 2), 3 of gate|up's 5; a grid past one
    wave (float16 gate|up, the lm_head), passes of 4 tokens and the other modes keep 1, or 2 with
    prefetch."""
    def slots(k, n, fmt, tokens=1, pdl="deep", prefetch=False):
        chunks = k // ql.gemv_chunk(fmt, "float16", k)
        kt, _, _ = ql.gemv_layout(chunks, n)
        steps = -(-chunks // kt)
        return ql.gemv_slots(prefetch, steps, tokens, -(-n // ql.GEMV_ROWS) * kt // 32, pdl)

    int4 = ql.QuantFormat(4, 128, True)
    assert [slots(2560, 6144, int4), slots(4096, 2560, int4), slots(2560, 19456, int4), slots(9728, 2560, int4)] \
        == [3, 2, 3, 3]
    assert slots(2560, 19456, None) == 1 and slots(2560, 151936, None) == 1
    assert slots(2560, 6144, int4, tokens=4) == 1 and slots(2560, 6144, int4, pdl="early") == 1
    assert slots(4096, 2560, None, pdl="early", prefetch=True) == 2 and slots(4096, 2560, None, prefetch=True) == 3


@pytest.mark.parametrize("fmt", [None, ql.QuantFormat(4, 32, True), ql.QuantFormat(8, 16, False)])
@pytest.mark.parametrize("steps", [2, 3, 5, 7])
def test_deep_pdl_gemv_matches_reference(fmt, steps):
    """FERRUM_PDL=deep's one-token GEMV: 2, 3, 5 or 7 step groups per lane through its 2-3 register slots
    (every group loaded before the wait, or the slots reused round after round), three tokens."""
    unit = ql.gemv_chunk(fmt, "float32", 1 << 12)
    k = 16 * unit * steps - unit  # the last step one chunk short
    out, ref = _gemv_case(np.random.default_rng(steps), k, 9, 3, fmt, True, layout=(16, 1, 1), tokens=1, pdl="deep")
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.sqrt(k), rtol=1e-4)


@pytest.mark.parametrize("fmt", [ql.QuantFormat(4, 32, False), ql.QuantFormat(8, 32, False), ql.QuantFormat(8, 16, True),
                                 ql.QuantFormat(8, 32, True), ql.QuantFormat(8, 16, False)])
def test_gemv_gguf_formats(fmt):
    """The formats GGUF files arrive in (Q4_K/Q4_1; Q5_K/Q5_1; Q6_K/Q3_K; Q5_0/Q8_0; Q2_K): three
    super-blocks of 256 columns, a partial last team of rows, passes of one token and of four."""
    for tokens in (1, 4):
        out, ref = _gemv_case(np.random.default_rng(tokens), 768, 37, 5, fmt, False, tokens=tokens)
        np.testing.assert_allclose(out, ref, atol=1e-4 * np.sqrt(768), rtol=1e-4)


@pytest.mark.parametrize("fmt", [None, ql.QuantFormat(4, 32, True), ql.QuantFormat(4, 64, False)])
@pytest.mark.parametrize("gated,tokens", [(False, 1), (True, 4)])
def test_gemv_eight_rows_per_thread(fmt, gated, tokens):
    """``rows_per_thread=8`` (bench/gpu_kernels.py's variant: half the activation loads per weight): a
    partial last team, two passes of 4 tokens or five of one, loads a step ahead and the late wait."""
    k = 32 * 24
    out, ref = _gemv_case(np.random.default_rng(1), k, 37, 5, fmt, True, gated=gated, tokens=tokens, rows=8,
                          layout=(32, 2, 2), prefetch=True, pdl="early")
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.sqrt(k), rtol=1e-4)


@pytest.mark.parametrize("fmt,half,ntok,tokens,layout,rows,normed", [
    (None, 37, 5, 4, None, 4, False),  # a partial last block of the gate half, two passes of 4 tokens
    (ql.QuantFormat(4, 32, True), 24, 3, 1, (16, 8, 2), 4, False),  # halves in separate teams
    (ql.QuantFormat(4, 64, False), 5, 2, 1, (128, 1, 1), 4, True),  # one team: a thread's rows 0-1 gate, 2-3 up
    (ql.QuantFormat(8, 16, False), 19, 6, 4, (32, 2, 1), 2, False),  # 2 rows a thread, mins
    (ql.QuantFormat(4, 128, True), 40, 1, 1, None, 4, True)])
def test_gemv_gate_out_matches_reference(fmt, half, ntok, tokens, layout, rows, normed):
    """``gate_out``: the gate|up GEMV writes ``silu(gate) * up`` (``[T, N/2]``) instead of the projection,
    each block's first half of rows gate rows and its second half the matching up rows: output widths that
    leave a block's gate half partial, the halves in separate teams or in one thread's rows, a bias on both
    halves (the up half's read ``N/2`` further), a deferred norm's ``rsqrt`` applied to both."""
    rng = np.random.default_rng(half)
    n = 2 * half
    k = 3 * (fmt.group_size if fmt else 8) + (0 if fmt else 3)
    x, tensors, b, y = _linear_case(rng, k, n, ntok, fmt, True, False)
    ss = rng.uniform(0.1, 10, (ntok, 3)).astype(np.float32)
    if normed:  # the deferred norm's partial sums of squares: y's dot products scaled by rsqrt(sum / K + eps)
        y = (y - b) / np.sqrt(ss.sum(axis=1, keepdims=True, dtype=np.float64) / k + 1e-5) + b
    ref = y[:, :half] / (1 + np.exp(-y[:, :half])) * y[:, half:]
    out = np.full((ntok, half), np.nan, np.float32)
    func = _kernel(("gemv-gate", k, n, fmt, ntok, tokens, layout, rows, normed), lambda: ql.make_gemv_gpu(
        k, n, fmt, "float32", "float32", "float32", "float32", scale_dtype="float32", layout=layout,
        tokens=tokens, rows_per_thread=rows, gate_out=True, norm_eps=1e-5 if normed else None,
        norm_parts=3 if normed else 0))
    gpu_emu.run(func, x, *([ss] if normed else []), *tensors, b, out)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.sqrt(k) * max(1, np.abs(ref).max() / 10), rtol=1e-4)


@pytest.mark.parametrize("fmt", [None, ql.QuantFormat(4, 128, True)])
def test_gemv_float16_build(fmt):
    """The float16 build (activations held as float16 for dense weights, float16 scales), emulated with
    half storage: 6 tokens are two passes; gated, with a bias."""
    k, n, ntok = 512, 37, 6
    xin, tensors, b, _ = _linear_case(np.random.default_rng(5), k, n, ntok, fmt, True, True)
    xin, b = xin.astype(np.float16), b.astype(np.float16)
    tensors[0 if fmt is None else 1] = tensors[0 if fmt is None else 1].astype(np.float16)
    g = xin[:, :k].astype(np.float64)
    x = (g / (1 + np.exp(-g)) * xin[:, k:]).astype(np.float16).astype(np.float64)
    w = tensors[0].astype(np.float64) if fmt is None else ql.dequantize_ref(
        fmt, tensors[0], tensors[1].astype(np.float32), None)
    ref = x @ w.T + b.astype(np.float64)
    out = np.full((ntok, n), np.nan, np.float16)
    func = _kernel(("gemv16", fmt), lambda: ql.make_gemv_gpu(k, n, fmt, "float16", "float16", "float16", "float16",
                                                             gated=True))
    gpu_emu.run(func, xin, *tensors, b, out)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=2e-3 * np.abs(ref).max(), rtol=2e-3)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31),
       fmt=st.sampled_from([None, ql.QuantFormat(4, 32, True), ql.QuantFormat(8, 16, False)]),
       groups=st.integers(1, 12), n=st.integers(1, 19), ntok=st.integers(1, 9), tokens=st.sampled_from([4, 1]),
       parts=st.integers(0, 40), begins=st.booleans(), residual=st.booleans(), bias=st.booleans(),
       layout=st.sampled_from([None, (32, 2, 1), (64, 4, 1)]))
@example(seed=1, fmt=ql.QuantFormat(4, 32, True), groups=3, n=9, ntok=5, tokens=4, parts=36, begins=False,
         residual=True, bias=True, layout=None)  # 16-byte loads of the partials, a lane's last one partial
@example(seed=2, fmt=None, groups=5, n=13, ntok=3, tokens=1, parts=7, begins=True, residual=True, bias=False,
         layout=(32, 2, 1))  # one partial a load
def test_gemv_deferred_norm_and_residual_epilogue(seed, fmt, groups, n, ntok, tokens, parts, begins, residual, bias,
                                                  layout):
    """``make_gemv_gpu``'s deferred RMSNorm and residual, against numpy: with ``norm_eps`` (``parts`` > 0)
    it reads ``xn`` and ``parts`` partial sums of squares (more or fewer than a team's lanes) and scales
    each dot product by ``rsqrt(sum / K + eps)`` before the bias; with ``residual`` it adds ``r``; with
    ``norm_next`` (``begins``) it also writes ``h * norm_w`` and, per token, each block's sum of ``h^2``
    over exactly that block's rows (any width, partial passes, rows past N, blocks of 1 to 4 teams)."""
    rng = np.random.default_rng(seed)
    k = groups * (fmt.group_size if fmt else 8)
    x, tensors, b, _ = _linear_case(rng, k, n, ntok, fmt, bias, False)
    ss = rng.uniform(0.1, 10, (ntok, max(parts, 1))).astype(np.float32)
    nw = rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((ntok, n)).astype(np.float32)
    lin_x = (lin.linear_ref(x, tensors[0], None) if fmt is None else
             ql.qlinear_ref(x, fmt, *tensors[:2], tensors[2] if len(tensors) > 2 else None, None))
    rstd = 1 / np.sqrt(ss.sum(axis=1, keepdims=True, dtype=np.float64) / k + 1e-5) if parts else 1
    h = lin_x * rstd + (b if bias else 0) + (r if residual else 0)
    _, rt, _ = layout or ql.gemv_norm_layout(k // ql.gemv_chunk(fmt, "float32", k), n, tokens if parts else 0)
    blocks = -(-n // (rt * ql.GEMV_ROWS))
    assert layout or blocks == ql.gemv_row_blocks(k, n, fmt, "float32", tokens if parts else 0)
    rows = np.arange(n) // (rt * ql.GEMV_ROWS)  # the block of each row
    outs = [np.full((ntok, n), np.nan, np.float32)] + (
        [np.full((ntok, n), np.nan, np.float32), np.full((ntok, blocks), np.nan, np.float32)] if begins else [])
    func = _kernel(("gemv-norm", k, n, fmt, bias, tokens, parts, begins, residual, layout), lambda: ql.make_gemv_gpu(
        k, n, fmt, "float32", "float32", "float32", "float32" if bias else None, scale_dtype="float32",
        layout=layout, tokens=tokens, norm_eps=1e-5 if parts else None, norm_parts=parts, residual=residual,
        norm_next="float32" if begins else None))
    gpu_emu.run(func, x, *([ss] if parts else []), *tensors, *([b] if bias else []), *([r] if residual else []),
                *([nw] if begins else []), *outs)
    tol = dict(atol=1e-4 * np.sqrt(k) * max(1, np.abs(h).max() / 10), rtol=1e-4)
    np.testing.assert_allclose(outs[0], h, **tol)
    if begins:
        np.testing.assert_allclose(outs[1], outs[0] * nw, rtol=1e-6, atol=1e-30)  # from h as stored
        want = np.stack([(outs[0][:, rows == i].astype(np.float64) ** 2).sum(axis=1) for i in range(blocks)], axis=1)
        np.testing.assert_allclose(outs[2], want, rtol=1e-5)


def test_half_pair_decodes_nibbles():
    """``half_math``'s decode (``quant_linear.half_pair``, built for the CPU, which has half arithmetic
    where the emulator has none): for 1000 random words, bytes (0, 2) and (1, 3), low and high nibbles,
    each lane is the nibble less the zero point of 8, exactly. The half_math GEMV itself is compiled for
    every CUDA arch in bench/gpu_kernels.py's sweep, which checks its output against the float32 GEMV's."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def pairs(w_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        w = T.match_buffer(w_h, (n,), "uint32")
        o = T.match_buffer(o_h, (n, 8), "float16")
        for i in T.serial(n):
            for run in T.unroll(2):
                for odd in T.unroll(2):
                    o[i, T.Ramp((run * 2 + odd) * 2, 1, 2)] = ql.half_pair(w[i], run, odd, T.uint32(0x64006400))

    lib = tvm.compile(tvm.IRModule({"main": pairs.with_attr("global_symbol", "main")}), target="llvm")
    w = np.random.default_rng(0).integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    got = tvm.runtime.tensor(np.zeros((1000, 8), np.float16))
    lib["main"](tvm.runtime.tensor(w), got)

    def nibble(b, run):
        return ((w >> (8 * b + 4 * run)) & 15).astype(np.float16) - 8

    want = np.stack([nibble(b, run) for run in (0, 1) for b in (0, 2, 1, 3)], axis=1)
    np.testing.assert_array_equal(got.numpy(), want)


def test_gemv_chunk_is_16_bytes():
    assert ql.gemv_chunk(ql.QuantFormat(4, 128, True), "", 4096) == 32
    assert ql.gemv_chunk(None, "float16", 2560) == 8 and ql.gemv_chunk(None, "float16", 2562) == 2
    assert ql.gemv_chunk(None, "float32", 7) == 1


@pytest.mark.parametrize("chunks,rows,layout", [  # the fastest of the H200 sweep (docs/bench/2026-11-26c-gpu-h200.md)
    (80, 19456, (16, 8, 1)),  # Qwen3-4B INT4 gate/up: 32 lanes would make 4864 warps of 3 steps
    (320, 19456, (64, 2, 1)),  # float16 gate/up: 9728 warps, but of 5 steps each
    (320, 151936, (64, 2, 1)),  # the float16 lm_head alike
    (80, 6144, (32, 2, 1)),  # INT4 q/k/v: 64 lanes would idle 3/8; fewer teams per block keep 768 blocks
    (128, 2560, (64, 1, 1)),  # INT4 o: 128 lanes would take one step
    (304, 2560, (128, 1, 1)),  # INT4 down: 3 steps, 21% idle on the last
    (320, 6144, (64, 2, 1)),  # float16 q/k/v: 128 lanes would make 6144 warps
    (512, 2560, (128, 1, 1)),  # float16 o
    (1216, 2560, (128, 1, 1)),  # float16 down: 10 steps, 5% idle on the last
    (3, 10, (16, 1, 1)),  # tiny: one step, the fewest idle lanes
])
def test_gemv_layout_keeps_lanes_busy(chunks, rows, layout):
    assert ql.gemv_layout(chunks, rows) == layout


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), fmt=FORMATS, groups=st.integers(1, 12), frags=st.integers(1, 9),
       ntok=st.integers(1, 75), bias=st.booleans(), gated=st.booleans(),
       layout=st.sampled_from([None, (4, 1), (2, 2), (1, 4)]))
def test_skinny_gemm_matches_reference(seed, fmt, groups, frags, ntok, bias, gated, layout):
    """decode_wide's tensor-core GEMM (wmma emulated), dense or dequantizing INT4/INT8 into shared memory:
    widths of any number of steps (256 columns, fewer when they do not divide it or the staged tiles
    would not fit), any number of 16-row fragments (a partial block), tokens past one pass of 32 (float32
    builds; 64 in 16-bit ones) with a partial last fragment, the warps split by rows or by columns; every
    output element written (NaN-filled before)."""
    unit = ql.gemv_chunk(fmt, "float32", 16) if fmt else 16  # columns of a packed chunk
    k, n = groups * max(fmt.group_size if fmt else 16, unit), 16 * frags
    if layout is not None and k % (4 // layout[0] * unit):
        layout = None  # this split does not divide the width into whole chunks
    xin, tensors, b, ref = _linear_case(np.random.default_rng(seed), k, n, ntok, fmt, bias, gated)
    out = np.full((ntok, n), np.nan, np.float32)
    func = _kernel(("skinny", k, n, fmt, bias, gated, layout), lambda: ql.make_skinny_gemm_gpu(
        k, n, "float32", "float32", "float32" if bias else None, gated=gated, layout=layout, fmt=fmt,
        scale_dtype="float32"))
    gpu_emu.run(func, xin, *tensors, *([b] if bias else []), out)
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.sqrt(k), rtol=1e-4)


@pytest.mark.parametrize("fmt", [None, ql.QuantFormat(4, 128, True), ql.QuantFormat(8, 32, False)])
def test_skinny_gemm_float16_build(fmt):
    """The float16 build itself (64 tokens per pass, steps sized for 2-byte tiles), emulated with half
    storage: 70 tokens are two passes, the second with one fragment's worth; gated, with a bias."""
    k, n, ntok = 256, 48, 70
    xin, tensors, b, _ = _linear_case(np.random.default_rng(7), k, n, ntok, fmt, True, True)
    xin, b = xin.astype(np.float16), b.astype(np.float16)
    tensors[0 if fmt is None else 1] = tensors[0 if fmt is None else 1].astype(np.float16)  # weight | scales
    # the reference on the float16 inputs, SiLU(gate) * up rounded to float16 as the kernel stages it
    g = xin[:, :k].astype(np.float64)
    x = (g / (1 + np.exp(-g)) * xin[:, k:]).astype(np.float16).astype(np.float64)
    w = tensors[0].astype(np.float64) if fmt is None else ql.dequantize_ref(
        fmt, tensors[0], tensors[1].astype(np.float32), tensors[2] if len(tensors) > 2 else None)
    ref = x @ w.T + b.astype(np.float64)
    out = np.full((ntok, n), np.nan, np.float16)
    func = _kernel(("skinny16", fmt), lambda: ql.make_skinny_gemm_gpu(k, n, "float16", "float16", "float16",
                                                                     gated=True, fmt=fmt))
    gpu_emu.run(func, xin, *tensors, b, out)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=2e-3 * np.abs(ref).max(), rtol=2e-3)


def test_skinny_layout_fills_the_gpu():
    assert ql.skinny_layout(2560, 19456) == (4, 1)  # gate|up: 1216 row fragments, 304 blocks
    assert ql.skinny_layout(2560, 6144) == (1, 4) and ql.skinny_layout(9728, 2560) == (1, 4)
    assert ql.skinny_layout(48, 160) == (4, 1)  # 48 columns split 4 ways would leave 12 each
    assert ql.skinny_layout(96, 160, 32) == (4, 1) and ql.skinny_layout(128, 160, 32) == (1, 4)  # INT4 blocks


# ---------------------------------------------------------------- many-token linears on mma.sync


MMA_FORMATS = st.sampled_from([None, None, ql.QuantFormat(4, 32, True), ql.QuantFormat(4, 64, False),
                               ql.QuantFormat(4, 128, True)])


def _int4_weights(rng, n: int, k: int, fmt) -> tuple[list, np.ndarray]:
    """Random INT4 weights ``[n, k]`` in ``fmt`` as the mma kernels take them (packed, float16 scales,
    float32 mins when asymmetric) and their dequantized float32 values."""
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scales = (rng.random((n, k // fmt.group_size)) * 0.1 + 0.01).astype(np.float16)
    mins = None if fmt.sym else (rng.standard_normal((n, k // fmt.group_size)) * 0.1).astype(np.float32)
    tensors = [ql.pack_int4(q), scales] + ([] if fmt.sym else [mins])
    return tensors, ql.dequantize_ref(fmt, tensors[0], scales.astype(np.float32), mins)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), dtype=st.sampled_from(["float16", "bfloat16"]), fmt=MMA_FORMATS,
       steps=st.integers(1, 9), frags=st.integers(1, 6), ntok=st.integers(1, 75), bias=st.booleans(),
       rf=st.sampled_from([1, 2]), ks=st.sampled_from([1, 2, 4]), n_frags=st.integers(1, 4), unroll=st.integers(1, 3))
@example(seed=1, dtype="float16", fmt=None, steps=8, frags=4, ntok=37, bias=True, rf=2, ks=2, n_frags=4, unroll=2)
@example(seed=2, dtype="bfloat16", fmt=None, steps=5, frags=3, ntok=16, bias=False, rf=1, ks=4, n_frags=2, unroll=3)
@example(seed=3, dtype="float16", fmt=ql.QuantFormat(4, 32, False), steps=5, frags=2, ntok=20, bias=True, rf=2,
         ks=4, n_frags=2, unroll=2)
@example(seed=4, dtype="float16", fmt=ql.QuantFormat(4, 128, True), steps=3, frags=3, ntok=9, bias=False, rf=1,
         ks=2, n_frags=4, unroll=1)
@example(seed=5, dtype="float16", fmt=ql.QuantFormat(4, 64, True), steps=5, frags=2, ntok=12, bias=False, rf=1,
         ks=2, n_frags=2, unroll=2)  # 3 steps a warp, loaded 2 at a time: the 4th is the next warp's
def test_mma_linear_matches_reference(seed, dtype, fmt, steps, frags, ntok, bias, rf, ks, n_frags, unroll):
    """The tensor-core linear for many-token decode steps (``mma.sync.m16n8k16`` emulated with the PTX ISA's
    fragment layouts): dense weights loaded 8 columns a lane into both of a step's mma's, INT4 ones 32
    columns a lane into 8 (nibble pairs decoded into float16 pairs, times the group's scale, plus its min
    when asymmetric; groups of 32-128), the activations' same columns; 1 or 2 row fragments a warp,
    1-4 warps splitting the steps, evenly or not (the last warps' past the end: zero weights), passes of
    8-32 tokens with a partial last one, 1-3 steps loaded at a time; every output written (NaN-filled
    before), each row's bias added once. Against float32 sums of the exact products (of the dequantized
    weights), rounded to the output dtype (float32 for float16 inputs, bfloat16 for bfloat16). The
    emulator computes in float what the GPU rounds to float16: the INT4 weights times their scales."""
    import ml_dtypes

    if dtype == "bfloat16":
        fmt = None  # INT4: float16 activations only
    rf = rf if frags % rf == 0 else 1
    k, n = ml.mma_step(fmt) * steps, 16 * frags
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    out_dtype = "float32" if dtype == "float16" else dtype
    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(shape).astype(np_dtype) for shape in ((ntok, k), (n, k), (n,)))
    tensors, dense = ([w], w) if fmt is None else _int4_weights(rng, n, k, fmt)
    func = _kernel(("mma", k, n, dtype, repr(fmt), bias, rf, ks, n_frags, unroll), lambda: ml.make_mma_linear_gpu(
        k, n, dtype, out_dtype, dtype if bias else None, layout=(rf, ks), n_frags=n_frags, unroll=unroll, fmt=fmt))
    out = np.full((ntok, n), np.nan, np.float32).astype(np_dtype if dtype == "bfloat16" else np.float32)
    gpu_emu.run(func, x, *tensors, *([b] if bias else []), out)
    ref = ml.mma_linear_ref(x, dense, b if bias else None)
    if dtype == "bfloat16":  # one rounding of the float32 sum: half a unit in the last place, and the sum's own
        np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2 ** -8, atol=1e-4 * np.sqrt(k))
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k) * np.abs(dense).max())


@pytest.mark.parametrize("ntok,k,n,dtype,bias,fmt", [
    (37, 64, 128, "float16", True, None), (130, 96, 256, "bfloat16", False, None),
    (37, 128, 128, "float16", True, ql.QuantFormat(4, 32, False)),  # a new group every step, with mins
    (130, 256, 256, "float16", False, ql.QuantFormat(4, 128, True))])  # 4 steps a group
def test_mma_gemm_matches_reference(ntok, k, n, dtype, bias, fmt):
    """``make_mma_gemm_gpu`` (prefill linears on mma.sync: FERRUM_MMA_GEMM): a partial token tile (37), two
    token tiles of which the second is partial (130), 2-8 steps of ``K`` through the double buffer, one or
    two output tiles, with and without a bias; dense weights or INT4 (decoded when staged, times the
    group's scale, plus its min when asymmetric); operands by ldmatrix, emulated with the mma's in the
    PTX fragment layouts, against float32 sums of the exact products (of the dequantized weights), within
    the output's rounding to 16 bits. NaN-filled outputs: every element written."""
    import ml_dtypes

    rng = np.random.default_rng(ntok)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    x, w = rng.standard_normal((ntok, k)).astype(np_dtype), rng.standard_normal((n, k)).astype(np_dtype)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    tensors = [w]
    if fmt is not None:
        tensors, w = _int4_weights(rng, n, k, fmt)
    gemm = _kernel(("mma_gemm", k, n, dtype, bias, repr(fmt)),
                   lambda: ml.make_mma_gemm_gpu(k, n, dtype, dtype, "float32" if bias else None, fmt=fmt))
    out = np.full((ntok, n), np.nan, np_dtype)
    gpu_emu.run(gemm, x, *tensors, *([b] if bias else []), out)
    ref = ml.mma_linear_ref(x, w, b)
    ulp = 2.0 ** -(10 if dtype == "float16" else 7)  # the output's rounding, relative
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=ulp * np.abs(ref).max(), rtol=0)


def test_mma_linear_layout_fills_the_gpu_within_shared_memory():
    """Qwen3-4B's linears: 2 row fragments a warp where the grid still has ``MMA_MIN_WARPS`` warps, the
    column split that reaches it (INT4 down: 76 steps over 16 warps, unevenly), the warps' partial sums
    within 48 KiB."""
    int4 = ql.QuantFormat(4, 128, True)
    for (k, n, fmt), layout in {(2560, 6144, None): (1, 8), (4096, 2560, None): (1, 16), (2560, 19456, None): (2, 4),
                                (9728, 2560, None): (1, 16), (2560, 151936, None): (2, 1), (64, 48, None): (1, 1),
                                (2560, 6144, int4): (1, 8), (9728, 2560, int4): (1, 16)}.items():
        assert ml.mma_linear_layout(k, n, fmt) == layout, (k, n, fmt)
        assert ml.mma_shared_bytes(*layout) <= ml.MMA_SHARED
    assert ml.mma_linear_fits(2560, 6144, "float16") and not ml.mma_linear_fits(2560, 6144, "float32")
    assert not ml.mma_linear_fits(2560, 50, "bfloat16") and not ml.mma_linear_fits(48, 64, "float16")
    assert ml.mma_linear_fits(2560, 6144, "float16", int4) and not ml.mma_linear_fits(2560, 6144, "bfloat16", int4)
    assert not ml.mma_linear_fits(2560, 6144, "float16", ql.QuantFormat(8, 32, True))
    assert not ml.mma_linear_fits(2592, 6144, "float16", int4)  # 128-column steps


# ---------------------------------------------------------------- greedy sampling on the device

@pytest.mark.parametrize("vocab", [1, 7, 256, 1000, 49152])
def test_argmax_matches_numpy_with_ties_to_the_lowest_id(vocab):
    import tvm

    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((6, vocab)).astype(np.float32)
    logits[0] = 1.0  # all tied: id 0
    logits[1, vocab // 2:] = 9.0  # tied across threads and strides: the first of them
    logits[2] = -3.0e38  # the most negative float32 still wins somewhere: id 0
    logits[3, -1] = 50.0  # the last column
    logits[5] = -np.inf  # nothing to prefer: id 0, as numpy
    ref = sm.argmax_ref(logits)
    out = np.full(6, -1, np.int32)
    gpu_emu.run(_kernel(("argmax", vocab), lambda: sm.make_argmax(vocab, "gpu")), logits, out)
    np.testing.assert_array_equal(out, ref)
    cpu = tvm.compile(tvm.IRModule({"main": sm.make_argmax(vocab, "cpu").with_attr("global_symbol", "main")}),
                      target="llvm")
    got = tvm.runtime.tensor(np.full(6, -1, np.int32))
    cpu(tvm.runtime.tensor(logits), got)
    np.testing.assert_array_equal(got.numpy(), ref)
    assert ref[0] == 0 and ref[1] == vocab // 2 and ref[3] == vocab - 1 and ref[5] == 0


# ---------------------------------------------------------------- residual add + RMSNorm

@pytest.mark.parametrize("hidden,ntok", [(5, 2), (64, 3), (576, 5), (1000, 1), (2560, 2)])
def test_add_rms_norm_matches_reference(hidden, ntok):
    """Fewer columns than threads, more (several per thread), a ragged last round; both outputs."""
    rng = np.random.default_rng(hidden)
    x, r = (rng.standard_normal((ntok, hidden)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal(hidden).astype(np.float32)
    h, y = np.full_like(x, np.nan), np.full_like(x, np.nan)
    gpu_emu.run(norm.make_add_rms_norm_gpu(hidden, "float32", "float32", 1e-6), x, r, w, h, y)
    h_ref, y_ref = norm.add_rms_norm_ref(x, r, w, 1e-6)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_allclose(y, y_ref, atol=2e-6, rtol=1e-5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), vocab=st.sampled_from([1000, 5003, 5004]))
def test_device_sampler_picks_the_reference_token(seed, vocab):
    """Greedy rows, plain temperature, top-k (1, small, >= V), top-p, min_p and their mixes, one draw each:
    the kernel picks the token of the float64 reference, unless the draw falls within float32 rounding
    of a boundary between two tokens' cumulative probabilities. A vocabulary smaller than the block, and
    two of several strided steps with a ragged last one, read 4 logits a load (5004) or 1 (5003). Half the
    rows are peaked (40 tokens 5-15 above the rest, as a trained model's are); with room for 1024
    candidates, the 1000-token rows always search the candidates in shared memory (multisection) and the
    larger ones do where few pass the floor, the row otherwise (a bisection; top-p's ends among the keys
    left between its ends, copied to shared memory)."""
    rng = np.random.default_rng(seed)
    rows = 12
    logits = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 4)).astype(np.float32)
    for r in np.flatnonzero(rng.random(rows) < 0.5):
        logits[r, rng.choice(vocab, 40, replace=False)] += rng.uniform(5, 15, 40).astype(np.float32)
    params = np.stack([np.where(rng.random(rows) < 0.2, 0.0, rng.uniform(0.3, 2.0, rows)),  # temperature
                       rng.choice([0, 0, 1, 5, 50, 999, 1000, 5000], rows),  # top_k
                       np.where(rng.random(rows) < 0.5, 1.0, rng.uniform(0.05, 0.99, rows)),  # top_p
                       np.where(rng.random(rows) < 0.7, 0.0, rng.uniform(0.0, 0.3, rows))], axis=1).astype(np.float32)
    uniform = rng.random(rows).astype(np.float32)
    out = np.full(rows, -1, np.int32)
    gpu_emu.run(_kernel(("sample", vocab, 1024), lambda v=vocab: sm.make_sample_gpu(v, 1024)), logits, params,
                uniform, out)
    ref = sm.sample_ref(logits, params, uniform)
    for r in np.flatnonzero(out != ref):  # only a draw at a boundary may differ
        cdf = np.cumsum(sm.kept_probs_ref(logits[r], *params[r]))
        assert abs(cdf[min(out[r], ref[r])] / cdf[-1] - uniform[r]) < 1e-5, (r, out[r], ref[r], params[r])
    assert (out >= 0).all() and (out < vocab).all()


def test_device_sampler_floor_keeps_the_nucleus():
    """A hand-made peaked row (32 tokens 12-14 over a bulk near 0, the top 4 tied), searched among the
    candidates in shared memory: top-p 0.5 (floor from the maximum), top-k 32 (the peak) and top-k 4 (the
    tied maxima, then top-p), min_p 0.5% above a peak token's probability, top-k 40 + top-p at T=2; and
    top-p 0.999, whose floor lets the whole row through (more than 1024 candidates: the row is searched).
    12 draws across [0, 1) each pick the reference's token, but for a draw at a boundary."""
    vocab = 5004
    rng = np.random.default_rng(7)
    base = (rng.standard_normal(vocab) * 0.5).astype(np.float32)
    hot = rng.choice(vocab, 32, replace=False)
    base[hot] = np.linspace(12, 14, 32, dtype=np.float32)
    base[hot[:4]] = 14  # ties at the top
    draws = np.linspace(0.01, 0.99, 12, dtype=np.float32)
    cases = [(1.0, 0, 0.999, 0.0), (1.0, 0, 0.5, 0.0), (0.7, 32, 1.0, 0.0), (0.7, 4, 0.9, 0.0),
             (1.0, 0, 1.0, float(np.exp(np.float32(12.5) - 14) * 1.005)), (2.0, 40, 0.95, 0.0)]
    logits = np.tile(base, (len(draws), 1))
    f = _kernel(("sample", vocab, 1024), lambda: sm.make_sample_gpu(vocab, 1024))
    for case in cases:
        params = np.tile(np.array(case, np.float32), (len(draws), 1))
        out = np.full(len(draws), -1, np.int32)
        gpu_emu.run(f, logits, params, draws, out)
        ref = sm.sample_ref(logits, params, draws)
        for r in np.flatnonzero(out != ref):
            cdf = np.cumsum(sm.kept_probs_ref(logits[r], *params[r]))
            assert abs(cdf[min(out[r], ref[r])] / cdf[-1] - draws[r]) < 1e-5, (case, r, out[r], ref[r])


def test_sample_ref_semantics():
    """The reference itself on hand-made rows: top-k 1 is the argmax, a tiny top-p keeps the argmax only,
    greedy rows ignore the draw, and a uniform draw walks the kept tokens in id order."""
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]] * 4, np.float32))
    params = np.array([[1, 1, 1, 0], [1, 0, 0.01, 0], [0, 0, 1, 0], [1, 0, 1, 0]], np.float32)
    assert list(sm.sample_ref(logits, params, np.array([0.99, 0.99, 0.99, 0.05], np.float32))) == [3, 3, 3, 0]
    assert sm.sample_ref(logits[3:], params[3:], np.array([0.35], np.float32))[0] == 2  # 0.1 + 0.2 <= 0.35 < 0.6
    two = np.array([[1, 2, 0.5, 0]], np.float32)  # top-2 = {2, 3}; top-p 0.5 of them keeps only 3 (4/7 > 0.5)
    assert sm.sample_ref(logits[:1], two, np.array([0.0], np.float32))[0] == 3


# ---------------------------------------------------------------- MoE experts: dispatch, grouped GEMV and GEMM

def _dispatch(ids: np.ndarray, num_experts: int):
    """The GPU counting sort, checked against ``dispatch_ref``; returns ``(offsets, tiles, order)``."""
    offsets, tiles = np.full(num_experts + 1, -1, np.int32), np.full(num_experts + 1, -1, np.int32)
    order = np.full(ids.size, -1, np.int32)
    gpu_emu.run(_kernel(("dispatch", num_experts), lambda: moe.make_moe_dispatch(num_experts, "gpu")), ids,
                offsets, tiles, order)
    ref_offsets, ref_order = moe.dispatch_ref(ids, num_experts)
    np.testing.assert_array_equal(offsets, ref_offsets)
    np.testing.assert_array_equal(order, ref_order)
    per_expert = -(-np.diff(ref_offsets) // moe.GEMM_TILE_M)
    np.testing.assert_array_equal(tiles, np.concatenate([[0], np.cumsum(per_expert)]))
    return offsets, tiles, order


def _experts(rng, fmt, num_experts: int, n: int, k: int):
    """Stacked expert weights (expert 0's rows NaN: it is never chosen, so never read) as kernel tensors,
    and the float64 matrix they decode to."""
    if fmt is None:
        w = rng.standard_normal((num_experts * n, k)).astype(np.float32)
        w[:n] = np.nan
        return [w], w.astype(np.float64)
    q = rng.integers(0, 16 if fmt.bits == 4 else 256, (num_experts * n, k))
    qweight = ql.pack_int4(q) if fmt.bits == 4 else (q - 128).astype(np.int8)
    scales = (rng.random((num_experts * n, k // fmt.group_size)) * 0.1).astype(np.float32)
    scales[:n] = np.nan
    mins = None if fmt.sym else (0.1 * rng.standard_normal(scales.shape)).astype(np.float32)
    return [qweight, scales] + ([] if mins is None else [mins]), ql.dequantize_ref(fmt, qweight, scales, mins)


EXPERT_FORMATS = [None, ql.QuantFormat(4, 32, True), ql.QuantFormat(8, 32, False)]


@pytest.mark.parametrize("fmt", EXPERT_FORMATS)
@pytest.mark.parametrize("ntok,x_div,gate_out", [(3, 2, False), (5, 1, False), (1, 2, False), (3, 2, True),
                                                 (1, 2, True)])
def test_grouped_gemv_after_gpu_dispatch(fmt, ntok, x_div, gate_out):
    """The GPU counting sort of the slots by expert, then the grouped GEMV: each slot gets its own expert's
    rows applied to its token (x_div 2: gate_up over tokens; 1: down over slots); ``gate_out``: the gate|up
    GEMV writing SiLU·mul of each expert's two halves."""
    num_experts, k, n, top_k = 8, 128, 20, 2
    rng = np.random.default_rng(ntok)
    slots = ntok * top_k
    ids = rng.integers(1, num_experts, slots).astype(np.int32)  # expert 0 is never chosen
    offsets, _, order = _dispatch(ids, num_experts)
    x = rng.standard_normal((ntok if x_div == top_k else slots, k)).astype(np.float32)
    tensors, dense = _experts(rng, fmt, num_experts, n, k)
    out = np.full((slots, n // 2 if gate_out else n), np.nan, np.float32)
    func = _kernel(("grouped", fmt, x_div, gate_out), lambda: ql.make_gemv_gpu(
        k, n, fmt, "float32", "float32", "float32", None, scale_dtype="float32", experts=num_experts, x_div=x_div,
        gate_out=gate_out))
    gpu_emu.run(func, x, *tensors, offsets, order, out)
    ref = np.stack([x[s // x_div].astype(np.float64) @ dense[ids[s] * n:(ids[s] + 1) * n].T for s in range(slots)])
    if gate_out:
        ref = ref[:, :n // 2] / (1 + np.exp(-ref[:, :n // 2])) * ref[:, n // 2:]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tc", [False, True], ids=["cuda-cores", "tensor-cores"])
@pytest.mark.parametrize("fmt", EXPERT_FORMATS)
@pytest.mark.parametrize("ntok,x_div,k,n", [(150, 2, 128, 70), (37, 1, 96, 64), (2, 2, 64, 130)])
def test_grouped_gemm_after_gpu_dispatch(fmt, ntok, x_div, k, n, tc):
    """The prefill form: tiles of up to 64 slots of one expert x 64 rows. Experts with several tiles, a
    partial last tile, columns past ``n`` and grid rows past the last tile (which must write nothing).
    ``tc``: the products through wmma (emulated)."""
    num_experts, top_k = 6, 2
    rng = np.random.default_rng(ntok + k)
    slots = ntok * top_k
    ids = rng.choice(np.arange(1, num_experts), slots, p=[0.5, 0.2, 0.2, 0.05, 0.05]).astype(np.int32)
    offsets, tiles, order = _dispatch(ids, num_experts)
    x = rng.standard_normal((ntok if x_div == top_k else slots, k)).astype(np.float32)
    tensors, dense = _experts(rng, fmt, num_experts, n, k)
    out = np.full((slots, n), np.nan, np.float32)
    func = _kernel(("grouped_gemm", fmt, x_div, k, n, tc), lambda: moe.make_grouped_gemm_gpu(
        num_experts, k, n, x_div, fmt, "float32", "float32", "float32", mma_dtype="float32" if tc else ""))
    gpu_emu.run(func, x, *tensors, offsets, tiles, order, out)
    ref = np.stack([x[s // x_div].astype(np.float64) @ dense[ids[s] * n:(ids[s] + 1) * n].T for s in range(slots)])
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tc", [False, True], ids=["cuda-cores", "tensor-cores"])
@pytest.mark.parametrize("fmt,ntok,k,n,bias", [(None, 70, 72, 130, True),
                                               (ql.QuantFormat(4, 32, True), 64, 128, 64, False),
                                               (ql.QuantFormat(8, 32, False), 5, 64, 70, True)])
def test_tiled_gemm_matches_reference(fmt, ntok, k, n, bias, tc):
    """The plain tiled GEMM (prefill linears where dlight has no tensor-core schedule: bfloat16): token
    tiles of 64 (a partial one), rows past ``n``, columns past a multiple of 32 (dense), the bias, dense
    and INT4/INT8 weights; ``tc``: wmma (emulated)."""
    rng = np.random.default_rng(ntok + k)
    x = rng.standard_normal((ntok, k)).astype(np.float32)
    tensors, dense = _experts(rng, fmt, 1, n, k)
    if fmt is None:
        tensors[0][:] = rng.standard_normal((n, k))  # _experts NaNs expert 0, the only one here
        dense = tensors[0].astype(np.float64)
    else:
        tensors[1][:] = rng.random(tensors[1].shape) * 0.1
        dense = ql.dequantize_ref(fmt, tensors[0], tensors[1], tensors[2] if len(tensors) > 2 else None)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    out = np.full((ntok, n), np.nan, np.float32)
    func = _kernel(("tiled_gemm", fmt, k, n, bias, tc), lambda: ql.make_tiled_gemm_gpu(
        k, n, fmt, "float32", "float32", "float32", "float32" if bias else None, "float32",
        mma_dtype="float32" if tc else ""))
    gpu_emu.run(func, x, *tensors, *([b] if bias else []), out)
    ref = x.astype(np.float64) @ dense.T + (b if bias else 0)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- heads out of the q/k/v projection + RoPE

@pytest.mark.parametrize("heads,kv_heads,head_dim,norm", [(4, 2, 8, True), (4, 2, 8, False), (16, 8, 128, True),
                                                          (6, 2, 80, False)])
def test_head_rope_matches_reference(heads, kv_heads, head_dim, norm):
    """q heads and k heads cut from the fused projection, q/k norm or not, a head size that is not a power
    of two (more threads than columns)."""
    rng = np.random.default_rng(head_dim)
    width = (heads + 2 * kv_heads) * head_dim
    src = rng.standard_normal((5, width)).astype(np.float32)
    angles = rng.random((5, head_dim // 2)) * 10
    table = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    w = rng.standard_normal(head_dim).astype(np.float32)
    for first, count in ((0, heads), (heads, kv_heads)):
        out = np.full((5, count, head_dim), np.nan, np.float32)
        func = rope.make_head_rope_gpu(width, first, count, head_dim, "float32", 1e-6 if norm else None)
        gpu_emu.run(func, src, *([w] if norm else []), table, out)
        ref = rope.head_rope_ref(src, first, count, head_dim, table, w if norm else None, 1e-6)
        np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    if not norm:  # the values: cut out only
        first = heads + kv_heads
        out = np.full((5, kv_heads, head_dim), np.nan, np.float32)
        gpu_emu.run(rope.make_head_rope_gpu(width, first, kv_heads, head_dim, "float32", None, rotate=False), src, out)
        np.testing.assert_array_equal(out, rope.head_rope_ref(src, first, kv_heads, head_dim, None))


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,norm", [(4, 2, 8, 4, True), (6, 2, 80, 16, False),
                                                                     (16, 8, 128, 16, True)])
def test_qkv_append_matches_reference(heads, kv_heads, head_dim, block_size, norm):
    """One launch from the projection to the attention's inputs: queries out, rotated keys and values into
    the paged cache at their slots (a padding slot -1 writes nothing; other slots keep their contents)."""
    rng = np.random.default_rng(head_dim + block_size)
    ntok, width = 6, (heads + 2 * kv_heads) * head_dim
    src = rng.standard_normal((ntok, width)).astype(np.float32)
    angles = rng.random((ntok, head_dim // 2)) * 10
    table = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    qw, kw = rng.standard_normal((2, head_dim)).astype(np.float32)
    slots = rng.permutation(4 * block_size)[:ntok].astype(np.int32)
    slots[2] = -1
    cache = rng.standard_normal((4, 2, kv_heads, block_size, head_dim)).astype(np.float32)
    q = np.full((ntok, heads, head_dim), np.nan, np.float32)
    eps = 1e-6 if norm else None
    func = rope.make_qkv_append_gpu(width, (0, heads, heads + kv_heads), heads, kv_heads, head_dim, block_size,
                                    "float32", "float32", eps)
    ref_cache = cache.copy()
    gpu_emu.run(func, cache, src, *([qw, kw] if norm else []), table, slots, q)
    np.testing.assert_allclose(q, rope.head_rope_ref(src, 0, heads, head_dim, table, qw if norm else None, 1e-6),
                               atol=2e-6, rtol=1e-5)
    k = rope.head_rope_ref(src, heads, kv_heads, head_dim, table, kw if norm else None, 1e-6)
    v = rope.head_rope_ref(src, heads + kv_heads, kv_heads, head_dim, None)
    pa.kv_append_ref(ref_cache, k, v, slots)
    np.testing.assert_allclose(cache, ref_cache, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("gated,tokens,ntok,layout", [(False, 1, 3, None), (True, 4, 5, (32, 2, 1)),
                                                      (False, 1, 1, (16, 2, 1))])
def test_gemv_dp4a_matches_reference(gated, tokens, ntok, layout):
    """bench/gpu_kernels.py's integer-dot INT4 GEMV (an experiment): ``make_quantize_dp4a_gpu``'s int8
    activations within one step of numpy's (``quantize_activations_ref``; halves round the other way), its
    scales equal and its sums those of its own values; then ``make_gemv_dp4a_gpu`` on them equal to
    ``gemv_dp4a_ref`` (integer dot products: only float32 rounding differs) and within the activations'
    rounding of the float reference (``activation_error_bound``); built to quantize the activations in its
    lanes (``x_dtype``), equal to the same reference. 37 rows: a partial last team; several passes of
    ``tokens``."""
    rng = np.random.default_rng(7)
    k, n, fmt = 768, 37, ql.QuantFormat(4, 128, True)
    xin, (qweight, scales), _, ref = _linear_case(rng, k, n, ntok, fmt, False, gated)
    x = xin[:, :k] / (1 + np.exp(-xin[:, :k])) * xin[:, k:] if gated else xin
    quant = _kernel(("dp4a-quantize", k, gated), lambda: ql.make_quantize_dp4a_gpu(k, "float32", gated))
    xq = np.zeros((ntok, k // 4), np.int32)
    xs = np.full((ntok, k // ql.DP4A_BLOCK), np.nan, np.float32)
    xsum = np.zeros((ntok, k // ql.DP4A_BLOCK), np.int32)
    gpu_emu.run(quant, xin, xq, xs, xsum)
    q = xq.view(np.int8).reshape(ntok, k).astype(np.int32)  # column 4j + b: byte b of word j
    q_ref, dx_ref = ql.quantize_activations_ref(x, ql.DP4A_BLOCK, 8)
    assert np.abs(q - q_ref).max() <= 1 and np.abs(q).max() == 127
    np.testing.assert_allclose(xs, dx_ref, rtol=1e-6)
    assert (xsum == q.reshape(ntok, -1, ql.DP4A_BLOCK).sum(axis=2)).all()
    out = np.full((ntok, n), np.nan, np.float32)
    gemv = _kernel(("dp4a", k, n, layout, tokens), lambda: ql.make_gemv_dp4a_gpu(
        k, n, fmt, "float32", scale_dtype="float32", layout=layout, tokens=tokens))
    gpu_emu.run(gemv, xq, xs, xsum, qweight, scales, out)
    exact = ql.gemv_dp4a_ref(q, xs, fmt, qweight, scales)
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    bound = ql.activation_error_bound(x, fmt, ql.dequantize_ref(fmt, qweight, scales, None), bits=8)
    assert (np.abs(out - ref) <= 1.01 * bound + 1e-4).all()
    # the lanes quantizing the activations themselves: the same integers, so the same reference
    own = _kernel(("dp4aq", k, n, layout, tokens, gated), lambda: ql.make_gemv_dp4a_gpu(
        k, n, fmt, "float32", scale_dtype="float32", layout=layout, tokens=tokens, x_dtype="float32", gated=gated))
    out = np.full((ntok, n), np.nan, np.float32)
    gpu_emu.run(own, xin, qweight, scales, out)
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())

"""Paged attention kernels (CPU build) vs the numpy reference, over random ragged batches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferrum.schedules import paged_attention as pa

pytestmark = pytest.mark.kernel

_kernels: dict = {}


def kernels(heads, kv_heads, head_dim, block_size, window, cache_dtype="float32"):
    import tvm

    key = (heads, kv_heads, head_dim, block_size, window, cache_dtype)
    if key not in _kernels:
        target = tvm.target.Target({"kind": "llvm"})
        build = lambda f: tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
        _kernels[key] = (build(pa.make_kv_append(kv_heads, head_dim, block_size, "float32", "cpu", cache_dtype)),
                         build(pa.make_attention(heads, kv_heads, head_dim, block_size, "float32", "cpu",
                                                 sliding_window=window, cache_dtype=cache_dtype)))
    return _kernels[key]


def run_case(rng, ctx_lens, q_lens, heads, kv_heads, head_dim, block_size, window=0, cache_dtype="float32"):
    """Sequence b has ctx_lens[b] cached tokens and q_lens[b] new ones; blocks are shuffled. A float16
    cache stores k/v rounded to float16 (the reference rounds the same way) and attends in float32."""
    import tvm

    append, attention = kernels(heads, kv_heads, head_dim, block_size, window, cache_dtype)
    per_seq = max(-(-(c + q) // block_size) for c, q in zip(ctx_lens, q_lens))
    num_blocks = per_seq * len(ctx_lens) + 3
    tables = rng.permutation(num_blocks)[: per_seq * len(ctx_lens)].reshape(len(ctx_lens), per_seq).astype(np.int32)
    cache = rng.standard_normal((num_blocks, 2, kv_heads, block_size, head_dim)).astype(cache_dtype)
    positions = np.concatenate([np.arange(c, c + q) for c, q in zip(ctx_lens, q_lens)]).astype(np.int32)
    seq_of = np.repeat(np.arange(len(q_lens)), q_lens)
    slots = (tables[seq_of, positions // block_size] * block_size + positions % block_size).astype(np.int32)
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    ntok = int(query_start[-1])
    q = rng.standard_normal((ntok, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((ntok, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((ntok, kv_heads, head_dim)).astype(np.float32)

    ref_cache = cache.copy()
    pa.kv_append_ref(ref_cache, k.astype(cache_dtype), v.astype(cache_dtype), slots)
    ref = pa.attention_ref(q, ref_cache, positions, query_start, tables, sliding_window=window)

    dev_cache = tvm.runtime.tensor(cache)
    append(dev_cache, tvm.runtime.tensor(k), tvm.runtime.tensor(v), tvm.runtime.tensor(slots))
    np.testing.assert_array_equal(dev_cache.numpy(), ref_cache)
    out = tvm.runtime.tensor(np.zeros_like(q))
    attention(tvm.runtime.tensor(q), dev_cache, tvm.runtime.tensor(positions), tvm.runtime.tensor(query_start),
              tvm.runtime.tensor(tables), out)
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=1e-4)


HEADS = st.sampled_from([(1, 1), (4, 4), (4, 2), (8, 2), (6, 1), (9, 3)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 5), heads=HEADS, head_dim=st.sampled_from([8, 16, 64]),
       block_size=st.sampled_from([1, 4, 16, 32]), cache_dtype=st.sampled_from(["float32", "float16"]),
       data=st.data())
def test_ragged_attention_matches_reference(seed, batch, heads, head_dim, block_size, cache_dtype, data):
    rng = np.random.default_rng(seed)
    ctx = data.draw(st.lists(st.integers(0, 200), min_size=batch, max_size=batch))
    qlen = data.draw(st.lists(st.integers(1, 100), min_size=batch, max_size=batch))
    run_case(rng, ctx, qlen, heads[0], heads[1], head_dim, block_size, cache_dtype=cache_dtype)


@pytest.mark.parametrize("ctx,qlen", [([0], [300]), ([299], [1]), ([0, 150, 37], [1, 150, 263])])
@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
def test_long_sequences(ctx, qlen, cache_dtype):
    run_case(np.random.default_rng(0), ctx, qlen, 4, 2, 16, 16, cache_dtype=cache_dtype)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window(window):
    run_case(np.random.default_rng(window), [0, 20, 3], [12, 1, 30], 4, 2, 16, 4, window=window)


def test_negative_slot_writes_nothing():
    import tvm

    append, _ = kernels(2, 2, 8, 4, 0)
    cache = np.zeros((2, 2, 2, 4, 8), np.float32)
    k = np.ones((2, 2, 8), np.float32)
    dev = tvm.runtime.tensor(cache)
    append(dev, tvm.runtime.tensor(k), tvm.runtime.tensor(k), tvm.runtime.tensor(np.array([-1, 5], np.int32)))
    got = dev.numpy()
    assert got[1, :, :, 1].sum() == 2 * 2 * 8 and got.sum() == 2 * 2 * 8


def test_gqa_head_count_must_divide():
    with pytest.raises(ValueError, match="multiple"):
        pa.make_attention(6, 4, 16, 16, "float32", "cpu")

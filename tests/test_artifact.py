"""Artifact contract: runtime-only loading, and the one-line refusals (ABI, TVM version, CPU
features, hashes, bad batches)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ferrum_runtime.artifact import ArtifactError
from ferrum_runtime.model import BatchError, CompiledModel, RaggedBatch

pytestmark = pytest.mark.e2e


@pytest.fixture
def artifact_copy(tiny_model_dir, compiled, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(compiled(tiny_model_dir("llama")), dst)
    return dst


def edit_manifest(path, fn):
    data = yaml.safe_load((path / "ferrum.yaml").read_text())
    fn(data)
    (path / "ferrum.yaml").write_text(yaml.safe_dump(data))


def test_runtime_needs_only_tvm_runtime_library(tiny_model_dir, compiled):
    art = compiled(tiny_model_dir("qwen3"))
    code = f"""
import os, sys, numpy as np
os.environ["TVM_USE_RUNTIME_LIB"] = "1"
from ferrum_runtime.model import CompiledModel, RaggedBatch
m = CompiledModel.load({str(art)!r}, num_blocks=4)
b = RaggedBatch(np.array([1, 2, 3], np.int32), np.arange(3, dtype=np.int32), np.array([0, 3], np.int32),
                np.array([[2, 0]], np.int32), np.array([32, 33, 34], np.int32), np.array([2], np.int32))
out = m.forward(b)
assert out.shape == (1, 256) and np.isfinite(out).all()
maps = open("/proc/self/maps").read()
assert "libtvm_runtime.so" in maps and "libtvm_compiler" not in maps, "compiler library loaded"
assert not any(k.startswith("ferrum_compiler") for k in sys.modules), "runtime imported the compiler"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("edit,fragment", [
    (lambda d: d.update(abi_version=99), "ABI version 99"),
    (lambda d: d["versions"].update(tvm="0.1.0"), "apache-tvm 0.1.0"),
    (lambda d: d["target"].update(cpu_features=["avx2", "not_a_real_cpu_flag"]), "not_a_real_cpu_flag"),
])
def test_incompatible_artifacts_are_refused(artifact_copy, edit, fragment):
    edit_manifest(artifact_copy, edit)
    with pytest.raises(ArtifactError, match=fragment) as e:
        CompiledModel.load(artifact_copy)
    assert "\n" not in str(e.value) and "ferrum compile" in str(e.value) or "--target" in str(e.value)


def test_tampered_file_is_refused(artifact_copy):
    shard = next((artifact_copy / "weights").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        CompiledModel.load(artifact_copy)


def test_verified_files_are_recorded_and_a_change_is_still_caught(artifact_copy, tmp_path, monkeypatch):
    """Files whose sha256 matched are recorded with their stat (the next load does not hash them again); a
    shard tampered afterwards, its size kept and its modification time set back, is refused all the same:
    the write moved its change time."""
    import json
    import os

    from ferrum_runtime.artifact import VerifiedFiles, check_compatible, read_manifest

    monkeypatch.setenv("FERRUM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(VerifiedFiles, "RACY_S", 0.0)  # the copy's files were written just now
    m = read_manifest(artifact_copy)
    check_compatible(m)
    recorded = json.loads((tmp_path / "cache" / VerifiedFiles.PATH).read_text())
    assert {str((artifact_copy / rel).resolve()): d for rel, d in m.data["files"].items()} == \
        {path: key[0] for path, key in recorded.items()}
    check_compatible(m)
    shard = next((artifact_copy / "weights").glob("*.safetensors"))
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ArtifactError, match="sha256"):
        check_compatible(m)


def test_missing_file_is_refused(artifact_copy):
    (artifact_copy / "model.so").unlink()
    with pytest.raises(ArtifactError, match="missing model.so"):
        CompiledModel.load(artifact_copy)


def test_out_of_range_batches_are_rejected(tiny_model_dir, compiled):
    m = CompiledModel.load(compiled(tiny_model_dir("llama")), num_blocks=4)
    ok = dict(token_ids=np.array([1, 2], np.int32), positions=np.array([0, 1], np.int32),
              query_start=np.array([0, 2], np.int32), block_tables=np.array([[1]], np.int32),
              slot_mapping=np.array([16, 17], np.int32), logits_index=np.array([1], np.int32))
    assert m.forward(RaggedBatch(**ok)).shape == (1, 256)
    for field, bad, msg in [("token_ids", [1, 256], "token ids"), ("block_tables", [[4]], "block ids"),
                            ("positions", [0, 16], "beyond"), ("logits_index", [2], "logits_index"),
                            ("query_start", [0, 1], "query_start")]:
        with pytest.raises(BatchError, match=msg):
            m.forward(RaggedBatch(**{**ok, field: np.array(bad, np.int32)}))


@pytest.mark.unit
def test_safetensors_round_trip_and_hash(tmp_path):
    import ml_dtypes
    import safetensors.numpy

    from ferrum_runtime.artifact import sha256_file
    from ferrum_runtime.safetensors_io import SafetensorsFile, write_safetensors

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
               "c": np.arange(6, dtype=np.int32).reshape(2, 3), "s": np.array(2.5, np.float16)}
    digest = write_safetensors(tmp_path / "t.safetensors", tensors)
    assert digest == sha256_file(tmp_path / "t.safetensors")
    back = SafetensorsFile(tmp_path / "t.safetensors")
    for name, arr in tensors.items():
        assert back.dtype(name) == arr.dtype.name and back.get(name).shape == arr.shape
        np.testing.assert_array_equal(back.get(name), arr)
    # the reference library reads what we write (bf16 aside: it has no numpy bfloat16)
    plain = {k: v for k, v in tensors.items() if k != "b"}
    write_safetensors(tmp_path / "p.safetensors", plain)
    ref = safetensors.numpy.load_file(str(tmp_path / "p.safetensors"))
    for name, arr in plain.items():
        np.testing.assert_array_equal(ref[name], arr)


def test_kv_cache_sized_to_the_device_when_no_budget_is_given(tiny_model_dir, compiled):
    """No budget: on a device that reports its free memory (CUDA), 90% of it less what is in use and
    1 GiB (vLLM's gpu_memory_utilization); elsewhere (this CPU: TVM reports no free memory) 512 MiB."""
    from ferrum_runtime.model import DEFAULT_KV_CACHE_BYTES, auto_kv_cache_bytes, kv_block_bytes, kv_blocks

    gib = 1 << 30
    # an 80 GiB GPU with 8 GiB of weights in: 72 - 8 - 1 = 63 GiB
    assert auto_kv_cache_bytes(80 * gib, 72 * gib) == 63 * gib
    assert auto_kv_cache_bytes(80 * gib, 2 * gib) == 64 << 20  # nearly full: the floor
    assert auto_kv_cache_bytes(80 * gib, None) == auto_kv_cache_bytes(None, None) == DEFAULT_KV_CACHE_BYTES
    m = CompiledModel.load(compiled(tiny_model_dir("qwen3")), kv_cache_bytes=None)
    assert m.num_blocks == DEFAULT_KV_CACHE_BYTES // m.kv_block_bytes
    assert m.kv_caches[0].shape[0] == m.num_blocks
    # however large the budget, one layer's cache stays under 2^31 elements (int32 index arithmetic):
    # Qwen3-0.6B's heads on an H200 (~124 GiB would fit) get 65,535 blocks
    qwen06 = {"kv_heads": 8, "block_size": 16, "head_dim": 128, "dtype": "float16", "num_layers": 28}
    assert kv_blocks(124 << 30, qwen06) == 65535 and 65535 * 2 * 8 * 16 * 128 < 2**31
    assert kv_blocks(8 << 30, qwen06) == (8 << 30) // kv_block_bytes(qwen06) and kv_blocks(1, qwen06) == 1


def test_float16_kv_cache_holds_twice_the_tokens_and_keeps_logits_close(tiny_model_dir, compiled):
    """The default KV cache is float16 (--kv-dtype float32 keeps it exact): the same cache budget holds
    twice the blocks, and logits move by the float16 rounding of K and V only."""
    src = tiny_model_dir("llama")
    half, full = compiled(src), compiled(src, kv_dtype="float32")
    assert yaml.safe_load((half / "ferrum.yaml").read_text())["kv_cache"]["dtype"] == "float16"
    assert yaml.safe_load((full / "ferrum.yaml").read_text())["kv_cache"]["dtype"] == "float32"
    models = [CompiledModel.load(a, kv_cache_bytes=1 << 20) for a in (half, full)]
    assert models[0].num_blocks == 2 * models[1].num_blocks
    ids = np.random.default_rng(0).integers(0, 256, 40).astype(np.int32)
    batch = RaggedBatch(ids, np.arange(40, dtype=np.int32), np.array([0, 40], np.int32),
                        np.arange(3, dtype=np.int32)[None], np.arange(40, dtype=np.int32), np.arange(40, dtype=np.int32))
    a, b = (m.forward(batch) for m in models)
    err = np.abs(a - b).max()
    assert 0 < err <= 2e-3 * np.abs(b).max(), err  # rounded (not exact), but only by float16's 2^-11


@pytest.mark.unit
def test_decode_entry_limit_and_its_override(monkeypatch):
    """GPU artifacts' ``decode`` entry takes batches up to its max_tokens; FERRUM_DECODE_MAX_TOKENS
    overrides it (0: off, to measure both paths) and a bad value is a one-line error."""
    from ferrum_runtime.model import decode_max_tokens

    monkeypatch.delenv("FERRUM_DECODE_MAX_TOKENS", raising=False)
    assert decode_max_tokens({"max_tokens": 8}) == 8 and decode_max_tokens(None) == 0
    monkeypatch.setenv("FERRUM_DECODE_MAX_TOKENS", "0")
    assert decode_max_tokens({"max_tokens": 8}) == 0 and decode_max_tokens(None) == 0
    monkeypatch.setenv("FERRUM_DECODE_MAX_TOKENS", "eight")
    with pytest.raises(ArtifactError, match="FERRUM_DECODE_MAX_TOKENS must be a token count"):
        decode_max_tokens({"max_tokens": 8})


def test_staged_step_inputs_give_the_direct_calls_logits(compiled, tiny_model_dir, monkeypatch):
    """How CUDA artifacts feed ``decode_graph`` (the capture itself needs a GPU), on a CPU artifact: step
    inputs copied into fixed tensors allocated once, block tables widened to a power of two of columns
    (3 -> 4 here). A prompt-chunk step too large for the graph takes the normal call. Logits must equal
    the normal call's at every step, prefill and decode. An input with the bytes its tensor got last time
    is not copied again: a decode step copies its token ids, positions and KV slots, and its query starts,
    logits rows and block table only when they changed."""
    from .ragged import chunked_prefill_then_decode

    monkeypatch.setenv("FERRUM_CUDA_GRAPH", "1")
    art = compiled(tiny_model_dir("qwen3"))
    plain, staged = (CompiledModel.load(art, kv_cache_bytes=1 << 20) for _ in range(2))
    assert staged._graph_fn is None  # CPU artifacts have no decode_graph
    widths, copies, per_call = [], [0], []
    copy = staged._copy_bytes

    def counted(*args):
        copies[0] += 1
        return copy(*args)

    def graph_fn(*args):
        widths.append(args[[n for _, n in staged._slots].index("block_tables")].shape[1])
        per_call.append(copies[0])
        copies[0] = 0
        return staged._fn(*args)

    staged._copy_bytes = counted

    staged._graph_fn, staged.graph_max_tokens, staged.graph_max_blocks = graph_fn, 8, 8
    staged.decode_max_tokens = 8
    prompts = [[int(t) for t in np.random.default_rng(n).integers(0, 256, n)] for n in (5, 9, 14)]
    runs = [chunked_prefill_then_decode(m, prompts, 40, np.random.default_rng(0), steps=8, chunk=3) for m in
            (plain, staged)]
    buffers = dict(staged._staging)
    for (tokens_a, a), (tokens_b, b) in zip(*runs):
        assert tokens_a == tokens_b
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert widths == [4] * 7  # all but the first step (3 x 3 = 9 tokens, past the graph's 8)
    assert staged._staging == buffers and len(buffers) == 6  # allocated once
    # the first staged step fills all six (after the six of the direct first step); then fewer, decode steps
    # of the same sequences 3
    assert per_call[0] == 12 and max(per_call[1:]) <= 5 and per_call[-1] == 3, per_call


def test_a_failed_graph_capture_falls_back_to_direct_calls(compiled, tiny_model_dir, caplog):
    """CUDA graphs are on by default: when the first call of a shape (its capture) fails, that step runs
    again without graphs (the direct call's logits), graphs stay off with one warning, and every later step
    runs directly. A graph that has run before and then fails is an error like any other (not hidden)."""
    import logging

    from .ragged import chunked_prefill_then_decode

    art = compiled(tiny_model_dir("qwen3"))
    plain, staged = (CompiledModel.load(art, kv_cache_bytes=1 << 20) for _ in range(2))
    calls = []

    def failing_capture(*args):
        calls.append(1)
        raise RuntimeError("CUDA: out of memory\nwhile capturing the graph")

    staged._graph_fn, staged.graph_max_tokens, staged.graph_max_blocks = failing_capture, 64, 8
    staged.decode_max_tokens = 64
    prompts = [[int(t) for t in np.random.default_rng(n).integers(0, 256, n)] for n in (5, 9)]
    with caplog.at_level(logging.WARNING, logger="ferrum"):
        runs = [chunked_prefill_then_decode(m, prompts, 40, np.random.default_rng(0), steps=6, chunk=3)
                for m in (plain, staged)]
    for (tokens_a, a), (tokens_b, b) in zip(*runs):
        assert tokens_a == tokens_b
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and not staged.cuda_graph  # tried once, then off
    warned = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert warned == ["ferrum: capturing a CUDA graph failed (CUDA: out of memory); decode steps run without "
                      "CUDA graphs from here on (FERRUM_CUDA_GRAPH=0 skips them)"]

    replays = []

    def breaks_on_replay(*args):  # captured and replayed once, then a failure
        replays.append(1)
        if len(replays) > 2:
            raise RuntimeError("an illegal memory access was encountered")
        return staged._fn(*args)

    staged._graph_fn, staged.decode_max_tokens = breaks_on_replay, 64
    batch = RaggedBatch(np.array([1, 2, 3], np.int32), np.arange(3, dtype=np.int32), np.array([0, 3], np.int32),
                        np.array([[0]], np.int32), np.arange(3, dtype=np.int32), np.array([2], np.int32))
    staged.forward(batch)
    staged.forward(batch)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        staged.forward(batch)
    assert staged.cuda_graph


@pytest.mark.parametrize("graphs", [False, True], ids=["direct", "cuda-graph"])
def test_steps_of_only_decode_tokens_take_decode_wide(compiled, tiny_model_dir, graphs):
    """CUDA artifacts with the tensor-core attention in ``forward`` also have ``decode_wide`` (forward with
    the split-KV attention): steps of one token per sequence, too many for ``decode``, take it (as CUDA
    graphs, ``decode_wide_graph``, on staged inputs, when graphs are on); steps with a prompt chunk take
    ``forward``. The routing, on a CPU artifact standing in the entry points with its ``forward`` (the
    GPU functions themselves are checked in tests/test_gpu_model.py)."""
    from .ragged import chunked_prefill_then_decode

    art = compiled(tiny_model_dir("qwen3"))
    plain, routed = (CompiledModel.load(art, kv_cache_bytes=1 << 20) for _ in range(2))
    assert not routed.decode_wide  # CPU artifacts have no decode_wide
    with pytest.raises(ArtifactError, match="no decode_wide entry point"):
        routed.decode_wide = True
    calls = []
    forward, slot = routed._fn, {n: i for i, n in routed._slots}

    def entry(name):
        def call(*args):
            calls.append((name, args[slot["token_ids"]].shape[0], args[slot["query_start"]].shape[0] - 1))
            return forward(*args)
        return call

    routed._fn, routed._wide_fn, routed._decode_fn, routed.decode_max_tokens = (
        entry("forward"), entry("decode_wide"), entry("decode"), 8)
    if graphs:
        routed._wide_graph_fn, routed.wide_graph_max_tokens, routed.graph_max_blocks = entry("decode_wide_graph"), 64, 8
    prompts = [[int(t) for t in np.random.default_rng(n).integers(0, 256, 4)] for n in range(10)]
    runs = [chunked_prefill_then_decode(m, prompts, 24, np.random.default_rng(0), steps=4, chunk=2) for m in
            (plain, routed)]
    for (tokens_a, a), (tokens_b, b) in zip(*runs):
        assert tokens_a == tokens_b
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # two steps of 2-token prompt chunks (20 tokens), then two of one decode token for each of 10 sequences
    wide = "decode_wide_graph" if graphs else "decode_wide"
    assert calls == [("forward", 20, 10)] * 2 + [(wide, 10, 10)] * 2
    if graphs:  # staged once, at the wide graph's 64 tokens
        assert routed._staging["token_ids"].shape == (64,) and routed._staging["block_tables"].shape == (64 * 8,)


def test_step_inputs_go_to_device_tensors_kept_between_steps(compiled, tiny_model_dir):
    """A step copies its inputs into device tensors the model keeps (allocated once, replaced by one twice
    as large only when a step needs more), and its logits equal those of a fresh model."""
    from .ragged import RaggedDriver

    art = compiled(tiny_model_dir("qwen3"))
    kept, fresh = (CompiledModel.load(art, kv_cache_bytes=1 << 20) for _ in range(2))
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, 100)]
    drivers = [RaggedDriver(m, 1, 120, np.random.default_rng(1)) for m in (kept, fresh)]
    sizes, tensors = [], []
    for chunk in (prompt[:30], prompt[30:40], prompt[40:]):  # 30, 10 then 60 tokens
        out = [d.step([chunk]) for d in drivers]
        np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
        sizes.append(kept._inputs["token_ids"].shape[0])
        tensors.append(kept._inputs["token_ids"])
        fresh._inputs.clear()  # the reference allocates anew every step
    assert sizes == [64, 64, 64] and tensors[0] is tensors[1] is tensors[2]
    long = [int(t) for t in np.random.default_rng(2).integers(0, 256, 100)]
    drivers = [RaggedDriver(m, 1, 120, np.random.default_rng(3)) for m in (kept, fresh)]  # a new sequence
    out = [d.step([long]) for d in drivers]  # 100 tokens: past 64
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
    assert kept._inputs["token_ids"].shape == (128,) and kept._inputs["positions"].shape == (128,)
    fresh._inputs.clear()
    out = [d.step([long[:10]]) for d in drivers]  # a shape the old tensors had views of: the new ones serve
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
    views = [view for key, (buf, view) in kept._views.items()
             if key[1] == "token_ids" and buf is kept._inputs["token_ids"]]
    assert sorted(v.shape for v in views) == [(10,), (100,)]

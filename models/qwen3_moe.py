"""Qwen3-MoE: Qwen3 attention (qk-norm) with a sparse mixture-of-experts FFN on every
``decoder_sparse_step``-th layer (all of them in released checkpoints): a router linear, softmax top-k
(renormalised when ``norm_topk_prob``), SiLU-gated experts. No shared expert."""

from ferrum_compiler.config import ModelConfig
from ferrum_compiler.ir import Graph, GraphBuilder

from .blocks import DecoderOptions, decoder, gated_mlp

HF_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
GGUF_ARCHITECTURES = ("qwen3moe",)


def sparse_mlp(b: GraphBuilder, cfg: ModelConfig, prefix: str, x: str, dtype: str, layer: int) -> str:
    if not cfg.is_moe_layer(layer):
        return gated_mlp(b, cfg, prefix, x, dtype)
    e, i, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    logits = b.linear(x, b.param(f"{prefix}.gate.weight", (e, d), dtype), out_dtype="float32")
    # experts stacked along rows, as the checkpoint's per-expert tensors concatenated
    gate_up = b.param(f"{prefix}.experts.gate_up_proj", (e * 2 * i, d), dtype,
                      sources=[f"{prefix}.experts.{j}.{n}_proj.weight" for j in range(e) for n in ("gate", "up")])
    down = b.param(f"{prefix}.experts.down_proj", (e * d, i), dtype,
                   sources=[f"{prefix}.experts.{j}.down_proj.weight" for j in range(e)])
    return b.moe(x, logits, gate_up, down, cfg.num_experts_per_tok, cfg.norm_topk_prob)


def build(cfg: ModelConfig, dtype: str, block_size: int) -> Graph:
    return decoder(cfg, DecoderOptions(qkv_bias=cfg.attention_bias, qk_norm=True), dtype, block_size, mlp=sparse_mlp)

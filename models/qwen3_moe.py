"""Qwen3-MoE: Qwen3 attention (qk-norm) with a sparse mixture-of-experts FFN on every
``decoder_sparse_step``-th layer (all of them in released checkpoints): a router linear, softmax top-k
(renormalised when ``norm_topk_prob``), SiLU-gated experts. No shared expert."""

from ferrum_compiler.config import ModelConfig
from ferrum_compiler.ir import Graph, GraphBuilder

from .blocks import DecoderOptions, decoder, gated_mlp, sparse_moe

HF_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
GGUF_ARCHITECTURES = ("qwen3moe",)


def sparse_mlp(b: GraphBuilder, cfg: ModelConfig, prefix: str, x: str, dtype: str, layer: int) -> str:
    if not cfg.is_moe_layer(layer):
        return gated_mlp(b, cfg, prefix, x, dtype)
    return sparse_moe(b, cfg, prefix, x, dtype, ("gate_proj", "up_proj", "down_proj"), cfg.norm_topk_prob)


def build(cfg: ModelConfig, dtype: str, block_size: int) -> Graph:
    return decoder(cfg, DecoderOptions(qkv_bias=cfg.attention_bias, qk_norm=True), dtype, block_size, mlp=sparse_mlp)

"""Qwen3 dense: per-head RMSNorm on q and k before RoPE (qk-norm), no q/k/v bias by default."""

from ferrum_compiler.config import ModelConfig
from ferrum_compiler.ir import Graph

from .blocks import DecoderOptions, decoder

HF_ARCHITECTURES = ("Qwen3ForCausalLM",)
GGUF_ARCHITECTURES = ("qwen3",)


def build(cfg: ModelConfig, dtype: str, block_size: int) -> Graph:
    return decoder(cfg, DecoderOptions(qkv_bias=cfg.attention_bias, qk_norm=True), dtype, block_size)

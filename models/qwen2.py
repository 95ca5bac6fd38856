"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q/k/v projections."""

from ferrum_compiler.config import ModelConfig
from ferrum_compiler.ir import Graph

from .blocks import DecoderOptions, decoder

HF_ARCHITECTURES = ("Qwen2ForCausalLM",)
GGUF_ARCHITECTURES = ("qwen2",)


def build(cfg: ModelConfig, dtype: str, block_size: int) -> Graph:
    return decoder(cfg, DecoderOptions(qkv_bias=True), dtype, block_size)

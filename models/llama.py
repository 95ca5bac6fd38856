"""Llama family: Llama 2/3.x (rope scaling), TinyLlama, Mistral (sliding window), SmolLM2."""

from ferrum_compiler.config import ModelConfig
from ferrum_compiler.ir import Graph

from .blocks import DecoderOptions, decoder

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GGUF_ARCHITECTURES = ("llama",)


def build(cfg: ModelConfig, dtype: str, block_size: int) -> Graph:
    return decoder(cfg, DecoderOptions(qkv_bias=cfg.attention_bias), dtype, block_size)

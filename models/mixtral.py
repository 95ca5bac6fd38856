"""Mixtral: Llama attention with a sparse mixture-of-experts FFN on every layer: a router linear, softmax
over the top-k router logits (the same as a softmax over all experts renormalised over the top k), and
SiLU-gated experts (``w1`` gate, ``w3`` up, ``w2`` down) under ``block_sparse_moe``."""

from ferrum_compiler.config import ModelConfig
from ferrum_compiler.ir import Graph, GraphBuilder

from .blocks import DecoderOptions, decoder, sparse_moe

HF_ARCHITECTURES = ("MixtralForCausalLM",)
GGUF_ARCHITECTURES = ()  # a Mixtral GGUF is a "llama" file with expert stacks: the GGUF frontend routes it here


def sparse_mlp(b: GraphBuilder, cfg: ModelConfig, prefix: str, x: str, dtype: str, layer: int) -> str:
    return sparse_moe(b, cfg, prefix.removesuffix(".mlp") + ".block_sparse_moe", x, dtype, ("w1", "w3", "w2"), True)


def build(cfg: ModelConfig, dtype: str, block_size: int) -> Graph:
    return decoder(cfg, DecoderOptions(qkv_bias=cfg.attention_bias), dtype, block_size, mlp=sparse_mlp)

"""Blocks shared by the decoder-only families: the ragged-batch inputs, attention, the gated MLP and
the layer stack. Parameter names follow Hugging Face checkpoints so the loader is a lookup table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ferrum_compiler.config import ModelConfig
from ferrum_compiler.ir import Graph, GraphBuilder


@dataclass(frozen=True)
class DecoderOptions:
    """What distinguishes one family from another inside the shared decoder."""

    qkv_bias: bool = False
    qk_norm: bool = False


def batch_inputs(b: GraphBuilder) -> dict[str, str]:
    """The flattened ragged batch of DESIGN §5."""
    return {
        "token_ids": b.input("token_ids", ("T",), "int32"),
        "positions": b.input("positions", ("T",), "int32"),
        "query_start": b.input("query_start", ("B+1",), "int32"),
        "block_tables": b.input("block_tables", ("B", "M"), "int32"),
        "slot_mapping": b.input("slot_mapping", ("T",), "int32"),
        "logits_index": b.input("logits_index", ("L",), "int32"),  # rows to return logits for
    }


def attention(b: GraphBuilder, cfg: ModelConfig, opts: DecoderOptions, prefix: str, x: str, cache: str,
              batch: dict[str, str], dtype: str) -> str:
    d, hd = cfg.hidden_size, cfg.head_dim
    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "v": cfg.num_kv_heads}
    proj = {}
    for n, h in heads.items():
        w = b.param(f"{prefix}.{n}_proj.weight", (h * hd, d), dtype)
        bias = b.param(f"{prefix}.{n}_proj.bias", (h * hd,), dtype) if opts.qkv_bias else None
        proj[n] = b.reshape(b.linear(x, w, bias), ("T", h, hd))
    q, k, v = proj["q"], proj["k"], proj["v"]
    if opts.qk_norm:
        q = b.rms_norm(q, b.param(f"{prefix}.q_norm.weight", (hd,), dtype), cfg.rms_norm_eps)
        k = b.rms_norm(k, b.param(f"{prefix}.k_norm.weight", (hd,), dtype), cfg.rms_norm_eps)
    q = b.rope(q, batch["positions"], cfg.rope_theta, cfg.rope_scaling_dict)
    k = b.rope(k, batch["positions"], cfg.rope_theta, cfg.rope_scaling_dict)
    o = b.paged_attention(q, k, v, cache, batch, scale=hd ** -0.5, sliding_window=cfg.sliding_window)
    o = b.reshape(o, ("T", cfg.num_heads * hd))
    return b.linear(o, b.param(f"{prefix}.o_proj.weight", (d, cfg.num_heads * hd), dtype))


def gated_mlp(b: GraphBuilder, cfg: ModelConfig, prefix: str, x: str, dtype: str) -> str:
    d, i = cfg.hidden_size, cfg.intermediate_size
    gate = b.linear(x, b.param(f"{prefix}.gate_proj.weight", (i, d), dtype))
    up = b.linear(x, b.param(f"{prefix}.up_proj.weight", (i, d), dtype))
    return b.linear(b.silu_mul(gate, up), b.param(f"{prefix}.down_proj.weight", (d, i), dtype))


def sparse_moe(b: GraphBuilder, cfg: ModelConfig, module: str, x: str, dtype: str, projections: tuple[str, str, str],
               norm_topk_prob: bool) -> str:
    """A router ``{module}.gate.weight`` and experts ``{module}.experts.{j}.{projection}.weight`` (the gate,
    up and down projections' names in ``projections``), stacked along rows as the checkpoint's per-expert
    tensors concatenated, into one ``moe`` op."""
    e, i, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate, up, down = projections
    logits = b.linear(x, b.param(f"{module}.gate.weight", (e, d), dtype), out_dtype="float32")
    gate_up = b.param(f"{module}.experts.gate_up_proj", (e * 2 * i, d), dtype,
                      sources=[f"{module}.experts.{j}.{n}.weight" for j in range(e) for n in (gate, up)])
    stacked_down = b.param(f"{module}.experts.down_proj", (e * d, i), dtype,
                           sources=[f"{module}.experts.{j}.{down}.weight" for j in range(e)])
    return b.moe(x, logits, gate_up, stacked_down, cfg.num_experts_per_tok, norm_topk_prob)


# (builder, config, weight prefix, input, dtype, layer index) -> output; the default is gated_mlp
MLP = Callable[[GraphBuilder, ModelConfig, str, str, str, int], str]


def decoder(cfg: ModelConfig, opts: DecoderOptions, dtype: str, block_size: int, mlp: MLP | None = None) -> Graph:
    """Embedding → N × (norm, attention, residual, norm, MLP, residual) → norm → lm_head on the rows
    named by ``logits_index``. Returns float32 logits ``[L, vocab]`` (L = B for generation, up to T
    for prompt scoring). ``mlp`` replaces the gated MLP per layer (MoE families)."""
    b = GraphBuilder()
    batch = batch_inputs(b)
    embed = b.param("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), dtype)
    h = b.embedding(embed, batch["token_ids"])
    for li in range(cfg.num_layers):
        p = f"model.layers.{li}"
        cache = b.input(f"kv_cache.{li}", ("NB", 2, cfg.num_kv_heads, block_size, cfg.head_dim), dtype)
        a = b.rms_norm(h, b.param(f"{p}.input_layernorm.weight", (cfg.hidden_size,), dtype), cfg.rms_norm_eps)
        h = b.add(h, attention(b, cfg, opts, f"{p}.self_attn", a, cache, batch, dtype))
        m = b.rms_norm(h, b.param(f"{p}.post_attention_layernorm.weight", (cfg.hidden_size,), dtype), cfg.rms_norm_eps)
        h = b.add(h, mlp(b, cfg, f"{p}.mlp", m, dtype, li) if mlp else gated_mlp(b, cfg, f"{p}.mlp", m, dtype))
    last = b.take_rows(h, batch["logits_index"])
    last = b.rms_norm(last, b.param("model.norm.weight", (cfg.hidden_size,), dtype), cfg.rms_norm_eps)
    head = embed if cfg.tie_word_embeddings else b.param("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), dtype)
    return b.output(b.linear(last, head, out_dtype="float32"))

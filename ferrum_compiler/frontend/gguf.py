"""GGUF files (llama.cpp's format), read with the ``gguf`` package.

Config comes from the ``{arch}.*`` metadata, the tokenizer and chat template from ``tokenizer.*``.
Tensors are renamed to Hugging Face names. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K, Q3_K, Q4_K,
Q5_K and Q6_K, the IQ types IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL and IQ4_XS, and
the ternary TQ1_0 and TQ2_0 are yielded as ``QuantTensor``s that keep their integers (packed for ferrum's
INT4/INT8 kernels, or dequantized with ``--quant none``; ``quant.from_gguf`` says how each maps); the other
types ``gguf`` can read (F32, F16, BF16, MXFP4, ...) are dequantized to float32.
llama.cpp's converter permutes the rows of Llama's q/k projections for its interleaved RoPE; we undo that so the weights
match the rotate-half convention of our ``rope`` op, as the ``transformers`` GGUF loader does. A MoE file
(``qwen3moe``, or ``llama`` with experts: Mixtral) stacks each layer's experts in one 3-D tensor per
projection (``ffn_{gate,up,down}_exps``); they are yielded expert by expert under the checkpoint names of
Hugging Face's Qwen3-MoE or Mixtral.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ferrum.models.registry import family_for

from ..config import ModelConfig
from ..quant import GGUF_FORMATS, QuantSpec, from_gguf
from . import Checkpoint, SourceError

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# a MoE family's checkpoint names: the module holding a layer's router (``ffn_gate_inp``) and experts, and
# the projection each expert's slice of a stack [experts, rows, columns] is
_MOE_NAMES = {"qwen3_moe": ("mlp", {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                                    "ffn_down_exps.weight": "down_proj"}),
              "mixtral": ("block_sparse_moe", {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3",
                                               "ffn_down_exps.weight": "w2"})}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str, family: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    if m and m.group(2) == "ffn_gate_inp.weight" and family in _MOE_NAMES:  # a MoE layer's router
        return f"model.layers.{m.group(1)}.{_MOE_NAMES[family][0]}.gate.weight"
    return None


def expert_names(gguf_name: str, experts: int, family: str) -> list[str] | None:
    """Hugging Face names of the experts stacked in ``gguf_name`` (None: not an expert stack)."""
    m = _BLOCK.match(gguf_name)
    if m is None or family not in _MOE_NAMES or m.group(2) not in _MOE_NAMES[family][1]:
        return None
    module, projections = _MOE_NAMES[family]
    return [f"model.layers.{m.group(1)}.{module}.experts.{e}.{projections[m.group(2)]}.weight" for e in range(experts)]


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, rows (pairs interleaved) → (halves)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Meta:
    def __init__(self, reader):
        self.reader = reader

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise SourceError(f"GGUF metadata has no {key!r}; the file is incomplete or not a decoder LLM")
        return value


def config_from_gguf(meta: _Meta, tensor_names: set[str]) -> ModelConfig:
    arch = meta.need("general.architecture")
    try:
        family = family_for(arch, "gguf")
    except ValueError as e:
        raise SourceError(str(e)) from None
    heads = int(meta.need(f"{arch}.attention.head_count"))
    hidden = int(meta.need(f"{arch}.embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.need("tokenizer.ggml.tokens"))
    scaling: tuple = ()
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = (("factor", float(meta.need(f"{arch}.rope.scaling.factor"))), ("rope_type", "linear"))
    moe: dict = {}
    experts = meta.get(f"{arch}.expert_count")
    if experts and family == "llama":  # Mixtral: a llama file with expert stacks
        family = "mixtral"
    elif experts and family != "qwen3_moe":
        raise SourceError(f"mixture-of-experts {arch!r} GGUF files are not supported; llama (Mixtral) and "
                          "qwen3moe ones are")
    if experts:
        # llama.cpp's MoE graphs renormalise the top-k router weights (Qwen3-MoE's norm_topk_prob; Mixtral's
        # softmax over the top k)
        moe = {"num_experts": int(experts),
               "num_experts_per_tok": int(meta.need(f"{arch}.expert_used_count")),
               "moe_intermediate_size": int(meta.need(f"{arch}.expert_feed_forward_length")),
               "norm_topk_prob": True}
    # a MoE file's dense FFN width (unused when every layer is sparse) may be missing
    ffn = meta.get(f"{arch}.feed_forward_length") or moe.get("moe_intermediate_size") \
        or meta.need(f"{arch}.feed_forward_length")
    return ModelConfig(
        arch=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(ffn),
        num_layers=int(meta.need(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(meta.need(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        max_position_embeddings=int(meta.get(f"{arch}.context_length") or 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=int(meta.get(f"{arch}.attention.sliding_window") or 0),
        rope_scaling=scaling,
        source_dtype="float32",
        **moe,
    )


def open_gguf(path: Path, name: str | None = None) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise SourceError(f"{path} is not a readable GGUF file ({e.__class__.__name__}: {e})") from None
    meta = _Meta(reader)
    names = {t.name for t in reader.tensors}
    config = config_from_gguf(meta, names)
    arch = meta.need("general.architecture")
    permuted = arch == "llama"  # only llama.cpp's Llama converter permutes q/k rows
    qtypes: dict[str, int] = {}
    for t in reader.tensors:
        qtypes[t.tensor_type.name] = qtypes.get(t.tensor_type.name, 0) + 1

    quant: dict[str, dict] = {}
    for t in reader.tensors:
        if t.tensor_type.name not in GGUF_FORMATS:
            continue
        spec = QuantSpec(GGUF_FORMATS[t.tensor_type.name]).to_dict()
        hf = hf_name(t.name, config.arch)
        if hf and len(t.shape) == 2:
            quant[hf] = spec
        stacked = expert_names(t.name, config.num_experts, config.arch) if len(t.shape) == 3 else None
        for expert in stacked or []:
            quant[expert] = spec

    def rope_heads(hf: str) -> int | None:
        """Heads of a q/k projection whose rows llama.cpp permuted (None: leave the rows alone)."""
        if permuted and hf.endswith("q_proj.weight"):
            return config.num_heads
        if permuted and hf.endswith("k_proj.weight"):
            return config.num_kv_heads
        return None

    def tensors() -> Iterator[tuple[str, object]]:
        for t in reader.tensors:
            experts = expert_names(t.name, config.num_experts, config.arch) if len(t.shape) == 3 else None
            if experts:
                yield from _experts(t, experts)
                continue
            hf = hf_name(t.name, config.arch)
            if hf is None:
                continue  # e.g. rope_freqs: recomputed from metadata
            heads = rope_heads(hf)
            if hf in quant:
                shape = (int(t.shape[1]), int(t.shape[0]))
                qt = from_gguf(t.tensor_type.name, t.data, shape)
                if heads:
                    qt = qt.take_rows(_unpermute_rope_rows(np.arange(shape[0]), heads))
                yield hf, qt
                continue
            w = np.asarray(_dequantize(t), dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
            if heads:
                w = _unpermute_rope_rows(w, heads)
            yield hf, w

    def _experts(t, names: list[str]) -> Iterator[tuple[str, object]]:
        """Expert ``e`` of a stack ``[experts, rows, columns]`` (GGUF shape ``(columns, rows, experts)``)."""
        cols, rows, count = (int(d) for d in t.shape)
        if count != len(names):
            raise SourceError(f"{path}: {t.name} stacks {count} experts, the metadata says {len(names)}")
        data = np.asarray(t.data).reshape(count, rows, -1)
        packed = names[0] in quant  # declared above for the types GGUF_FORMATS keeps packed
        for i, name in enumerate(names):  # one expert at a time: a whole stack in float32 can be GBs
            if packed:
                yield name, from_gguf(t.tensor_type.name, data[i], (rows, cols))
            else:
                yield name, np.asarray(_dequantize(t, data[i]), dtype=np.float32).reshape(rows, cols)

    def _dequantize(t, data=None) -> np.ndarray:
        """``t``'s data (or ``data``, a slice of it) in float32."""
        try:
            return gguf.quants.dequantize(t.data if data is None else data, t.tensor_type)
        except NotImplementedError:
            raise SourceError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantized; "
                              "use a Q2_K..Q6_K, IQ1..IQ4, TQ1_0/TQ2_0, Q8_0, Q5_0/Q5_1, Q4_0/Q4_1, F16 or F32 "
                              "file") from None

    def write_tokenizer(dest: Path) -> list[str]:
        from .gguf_tokenizer import build_tokenizer

        tok, tok_config = build_tokenizer(meta)
        tok.save(str(dest / "tokenizer.json"))
        (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        gen = {k: v for k, v in {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
                                 "eos_token_id": meta.get("tokenizer.ggml.eos_token_id")}.items() if v is not None}
        (dest / "generation_config.json").write_text(json.dumps(gen, indent=2))
        return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]

    return Checkpoint(name=name or str(path), kind="gguf", config=config, tensors=tensors,
                      write_tokenizer=write_tokenizer, quant=quant, quant_method="gguf" if quant else "none",
                      details={"file": str(path), "tensor_types": qtypes, "gguf_name": meta.get("general.name")})

"""Compile-time configuration: the model's shape (converted once from the checkpoint's config) and the
compile options. Both are frozen and baked into the artifact manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # key of the model registry: "llama" | "qwen2" | "qwen3" | "qwen3_moe" | "mixtral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int = 0  # 0: full attention
    rope_scaling: tuple[tuple[str, object], ...] = ()  # frozen items of the checkpoint's rope_scaling
    source_dtype: str = "float32"
    # mixture of experts (Qwen3-MoE, Mixtral); num_experts == 0 means a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 and i not in mlp_only_layers
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = tuple(sorted((d.get("rope_scaling") or {}).items()))
        d["mlp_only_layers"] = tuple(d.get("mlp_only_layers") or ())
        return cls(**d)


@dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"
    dtype: str = ""  # "" = the target's default (float32 on cpu, float16 on GPUs)
    block_size: int = 16
    quant: str = "auto"  # auto: keep the source's quantization | none: dequantize | q4 | q8: RTN the linears
    shard_bytes: int = 1 << 30
    weights: bool = True  # False: library, manifest, tokenizer and IR only (`ferrum pack-weights` adds them later)
    kv_dtype: str = ""  # "" = float16, or the model dtype where that is bfloat16
    act_bits: int = 16  # CPU INT4 integer-dot kernel: activations rounded to 16 or 8 (llama.cpp's Q8) bits per group
    extra: dict = field(default_factory=dict)

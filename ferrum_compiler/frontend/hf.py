"""Hugging Face checkpoints: a directory with ``config.json`` and ``*.safetensors`` (sharded or not).

The HF config dict is converted once, here, into a frozen ``ModelConfig``; nothing downstream sees it.
Tensors are memory-mapped and yielded one at a time, so a model is never held in memory twice.

GPTQ checkpoints (``quantization_config.quant_method == "gptq"``) are detected here: each linear's
``qweight``/``qzeros``/``scales``/``g_idx`` are gathered and yielded as one ``QuantTensor`` under the
linear's dense name (``….q_proj.weight``), so models and passes never see GPTQ's layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from ferrum.models.registry import family_for
from ferrum_runtime.safetensors_io import SafetensorsFile

from ..config import ModelConfig
from ..ir.rope import ROPE_SCALING_TYPES
from ..quant import GPTQConfig, from_gptq
from . import Checkpoint, SourceError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    archs = cfg.get("architectures") or []
    if not archs:
        raise SourceError(f"{where} has no 'architectures' entry; cannot tell which model this is")
    try:
        family = family_for(archs[0], "hf")
    except ValueError as e:
        raise SourceError(str(e)) from None
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        if method != "gptq":
            raise SourceError(f"{where}: {method} checkpoints are not supported; use a GPTQ or GGUF (Q4_0/Q4_1/Q8_0) "
                              "version, or the fp16/bf16 original (optionally with --quant q4)")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = tuple(sorted(rope.items())) if kind != "default" else ()
    if kind not in ROPE_SCALING_TYPES:
        raise SourceError(f"{where}: rope scaling {kind!r} is not supported yet; supported: {', '.join(ROPE_SCALING_TYPES)}")
    window = 0
    if family in ("llama", "mixtral") and cfg.get("sliding_window"):  # Mistral, Mixtral
        window = int(cfg["sliding_window"])
    moe: dict = {}
    if family == "qwen3_moe":
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # Hub configs / transformers 5
        missing = [k for k, v in (("num_experts", experts), ("num_experts_per_tok", cfg.get("num_experts_per_tok")),
                                  ("moe_intermediate_size", cfg.get("moe_intermediate_size"))) if v is None]
        if missing:
            raise SourceError(f"{where}: a Qwen3-MoE config needs {', '.join(missing)}")
        assert experts is not None
        moe = dict(num_experts=int(experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                   moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1)),
                   mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()))
    if family == "mixtral":  # every layer sparse, experts intermediate_size wide, top-k renormalised
        missing = [k for k in ("num_local_experts", "num_experts_per_tok") if cfg.get(k) is None]
        if missing:
            raise SourceError(f"{where}: a Mixtral config needs {', '.join(missing)}")
        moe = dict(num_experts=int(cfg["num_local_experts"]), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                   moe_intermediate_size=int(cfg["intermediate_size"]), norm_topk_prob=True)
    if family in ("qwen2", "qwen3", "qwen3_moe") and cfg.get("use_sliding_window"):
        raise SourceError(f"{where}: per-layer sliding windows (use_sliding_window) are not supported yet")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ModelConfig(
        arch=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=window,
        rope_scaling=scaling,
        source_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        **moe,
    )


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in model_dir.iterdir())[:8]) or "nothing"
        raise SourceError(f"{model_dir} has no *.safetensors weights (found: {found}); "
                          "convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True)")
    return files


def open_hf_dir(model_dir: Path, name: str | None = None, weights: bool = True) -> Checkpoint:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{model_dir} has no config.json; pass a Hugging Face model directory, a .gguf file, "
                          "a Hub repo id or an alias such as smollm2")
    raw = json.loads(cfg_path.read_text())
    config = config_from_hf(raw, str(cfg_path))
    files = weight_files(model_dir) if weights or _has_weights(model_dir) else []
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{model_dir} is missing weight shard(s) {', '.join(missing)} named in its index")
    gptq = GPTQConfig.from_hf(raw["quantization_config"], str(cfg_path)) if raw.get("quantization_config") else None
    quant: dict[str, dict] = {}
    parts_of: dict[str, set[str]] = {}  # GPTQ linear prefix -> the tensor kinds it has
    if gptq is not None:
        for f in files:
            st = SafetensorsFile(f)
            for name in st.keys():
                prefix, _, kind = name.rpartition(".")
                if kind in _GPTQ_PARTS:
                    parts_of.setdefault(prefix, set()).add(kind)
                if kind == "qweight":
                    quant[prefix + ".weight"] = gptq.spec(st.shape(name)[0] * 32 // gptq.bits).to_dict()
        incomplete = [p for p, kinds in parts_of.items() if not {"qweight", "qzeros", "scales"} <= kinds]
        if incomplete:
            raise SourceError(f"{model_dir}: GPTQ linear {incomplete[0]} lacks "
                              f"{', '.join(sorted({'qweight', 'qzeros', 'scales'} - parts_of[incomplete[0]]))}")

    def tensors() -> Iterator[tuple[str, object]]:
        pending: dict[str, dict[str, np.ndarray]] = {}
        for f in files:
            for name, arr in SafetensorsFile(f).items():
                prefix, _, kind = name.rpartition(".")
                if gptq is None or kind not in _GPTQ_PARTS or prefix not in parts_of:
                    yield name, arr
                    continue
                got = pending.setdefault(prefix, {})
                got[kind] = arr
                if len(got) == len(parts_of[prefix]):
                    del pending[prefix]
                    yield prefix + ".weight", from_gptq(gptq, prefix, got["qweight"], got["qzeros"], got["scales"],
                                                        got.get("g_idx"))

    def write_tokenizer(dest: Path) -> list[str]:
        written = []
        for fname in TOKENIZER_FILES:
            if (model_dir / fname).is_file():
                shutil.copyfile(model_dir / fname, dest / fname)
                written.append(fname)
        return written

    details: dict = {"shards": [f.name for f in files]}
    if gptq is not None:
        details["gptq"] = {"bits": gptq.bits, "group_size": gptq.group_size, "desc_act": gptq.desc_act,
                           "sym": gptq.sym, "format": "gptq" if gptq.v1_zeros else "gptq_v2"}
    default_quant = None
    if gptq is not None and not files:  # config only: every quantizable linear is GPTQ, as the config says
        def default_quant(k: int, gptq: GPTQConfig = gptq) -> dict:
            return gptq.spec(k).to_dict()
    return Checkpoint(name=name or str(model_dir), kind="hf", config=config, tensors=tensors,
                      write_tokenizer=write_tokenizer, details=details, quant=quant,
                      quant_method="gptq" if gptq is not None else "none", default_quant=default_quant)


def _has_weights(model_dir: Path) -> bool:
    return (model_dir / "model.safetensors.index.json").is_file() or any(model_dir.glob("*.safetensors"))


_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")

"""Lazy registry of model families: name → module path. A family module exposes ``HF_ARCHITECTURES``,
``GGUF_ARCHITECTURES`` and ``build(cfg, dtype, block_size) -> Graph``."""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {"llama": "ferrum.models.llama", "qwen2": "ferrum.models.qwen2", "qwen3": "ferrum.models.qwen3",
            "qwen3_moe": "ferrum.models.qwen3_moe", "mixtral": "ferrum.models.mixtral"}


def family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def family_for(architecture: str, source: str = "hf") -> str:
    """Family name for an HF ``architectures`` entry (source="hf") or a GGUF ``general.architecture``."""
    attr = "HF_ARCHITECTURES" if source == "hf" else "GGUF_ARCHITECTURES"
    supported = []
    for name in FAMILIES:
        archs = getattr(family(name), attr)
        if architecture in archs:
            return name
        supported.extend(archs)
    raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(supported)}")

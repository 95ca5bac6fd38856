"""Stream checkpoint tensors into the artifact's weight shards, in kernel layout.

Each *logical* weight is filled from the checkpoint tensors ``graph.param_sources`` names (concatenated
along axis 0 for fused linears). A dense weight is converted to the artifact dtype (a quantized source
tensor is dequantized first, ``--quant none``); a weight in ``graph.packing`` becomes its packed tensors
(a dense source is quantized round-to-nearest, ``--quant q4|q8``; a GGUF/GPTQ source keeps its integers).
The result is appended to the current shard, flushed once it passes ``shard_bytes``. Only the tensors of
one fused group wait in memory, so peak memory stays near one shard, never two copies of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ferrum_runtime.safetensors_io import np_dtype, write_safetensors

from .frontend import Checkpoint, SourceError
from .ir import Graph
from .quant import QuantSpec, QuantTensor, concat_rows, quantize_rtn

# checkpoint tensors that a model may carry and ferrum recomputes or does not need
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "lm_head.weight")

Tensor = np.ndarray | QuantTensor


def logical_weights(graph: Graph) -> dict[str, tuple[str, ...]]:
    """``{logical weight: checkpoint tensors}``: packed params are grouped under their dense name."""
    packed = {p for roles in graph.packing.values() for p in roles.values()}
    names = [p for p in graph.params if p not in packed] + list(graph.packing)
    return {p: graph.param_sources.get(p, (p,)) for p in names}


def _pack(graph: Graph, name: str, parts: list[Tensor], sources: tuple[str, ...]) -> dict[str, np.ndarray]:
    spec = QuantSpec.from_dict(graph.quant[name])
    dense = [p for p in parts if isinstance(p, np.ndarray)]
    if len(dense) == len(parts):
        qt = quantize_rtn(np.concatenate(dense, axis=0) if len(dense) > 1 else dense[0], spec.fmt)
    elif all(isinstance(p, QuantTensor) for p in parts):
        qparts = [p for p in parts if isinstance(p, QuantTensor)]
        qt = (concat_rows(qparts, sources) if len(qparts) > 1 else qparts[0]).as_format(spec.fmt, name)
    else:
        raise SourceError(f"cannot fuse {', '.join(sources)}: some are quantized and some are not; "
                          "compile with --quant none")
    if spec.act_order and qt.perm is None:
        qt.perm = np.arange(qt.shape[1], dtype=np.int32)
    packed = qt.pack(spec.layout)
    return {param: packed[role] for role, param in graph.packing[name].items()}


def _dense(parts: list[Tensor], target: np.dtype) -> np.ndarray:
    arrays = [(p.dequantize() if isinstance(p, QuantTensor) else p).astype(target) for p in parts]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def write_weights(graph: Graph, ckpt: Checkpoint, dtype: str, weights_dir: Path, shard_bytes: int,
                  progress: Callable[[str], None]) -> tuple[dict[str, str], dict[str, str]]:
    """Write all params of ``graph``; returns ``{param name: shard file}`` and ``{shard file: sha256}``."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    logical = logical_weights(graph)
    wanted: dict[str, list[str]] = {}  # checkpoint tensor -> logical weights that need it
    for w, sources in logical.items():
        for src in sources:
            wanted.setdefault(src, []).append(w)
    target = np_dtype(dtype)
    pending: dict[str, dict[str, Tensor]] = {}  # logical weight -> sources received so far
    shard: dict[str, np.ndarray] = {}
    shard_size = 0
    index: dict[str, str] = {}
    digests: dict[str, str] = {}
    ignored: list[str] = []
    total = len(graph.params)

    def flush() -> None:
        nonlocal shard, shard_size
        if not shard:
            return
        fname = f"params-{len(set(index.values())):05d}.safetensors"
        digests[fname] = write_safetensors(weights_dir / fname, shard)
        index.update({name: fname for name in shard})
        progress(f"wrote weights/{fname} ({shard_size / 2**20:.0f} MiB, {len(index)}/{total} tensors)")
        shard, shard_size = {}, 0

    for name, arr in ckpt.tensors():
        if name not in wanted:
            ignored.append(name)
            continue
        for w in wanted[name]:
            pending.setdefault(w, {})[name] = arr
            sources = logical[w]
            if len(pending[w]) < len(sources):
                continue
            parts = [pending[w][s] for s in sources]
            del pending[w]
            out = _pack(graph, w, parts, sources) if w in graph.packing else {w: _dense(parts, target)}
            for param, value in out.items():
                expected = graph.params[param].shape
                if tuple(value.shape) != tuple(expected):
                    raise SourceError(f"checkpoint tensor(s) {', '.join(sources)} give {param} shape "
                                      f"{tuple(value.shape)}, the model config implies {tuple(expected)}; "
                                      "config.json and weights disagree")
                shard[param] = value
                shard_size += value.nbytes
            if shard_size >= shard_bytes:
                flush()
    flush()
    missing = [w for w in logical if not all(p in index for p in graph.packing.get(w, {"dense": w}).values())]
    if missing:
        absent = sorted({s for w in missing for s in logical[w]} - set(ignored))
        raise SourceError(f"the checkpoint lacks {len(absent)} tensor(s) the model needs, e.g. {', '.join(absent[:3])}")
    unexpected = [n for n in ignored if not n.endswith(_IGNORABLE_SUFFIXES)]
    if unexpected:
        progress(f"note: ignored {len(unexpected)} checkpoint tensor(s) the model does not use, e.g. {unexpected[0]}")
    return index, digests

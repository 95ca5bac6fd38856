"""Stream checkpoint tensors into the artifact's weight shards, in kernel layout.

Each graph parameter is filled from the checkpoint tensors ``graph.param_sources`` names (concatenated
along axis 0 for fused linears), converted to the artifact dtype, and appended to the current shard;
a shard is flushed once it passes ``shard_bytes``. Only the tensors of one fused group wait in memory,
so peak memory stays near one shard, never two copies of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ferrum_runtime.safetensors_io import np_dtype, write_safetensors

from .frontend import Checkpoint, SourceError
from .ir import Graph

# checkpoint tensors that a model may carry and ferrum recomputes or does not need
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "lm_head.weight")


def write_weights(graph: Graph, ckpt: Checkpoint, dtype: str, weights_dir: Path, shard_bytes: int,
                  progress: Callable[[str], None]) -> tuple[dict[str, str], dict[str, str]]:
    """Write all params of ``graph``; returns ``{param name: shard file}`` and ``{shard file: sha256}``."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, list[str]] = {}  # checkpoint tensor -> params that need it
    for p in graph.params:
        for src in graph.param_sources.get(p, (p,)):
            wanted.setdefault(src, []).append(p)
    target = np_dtype(dtype)
    pending: dict[str, dict[str, np.ndarray]] = {}  # param -> sources received so far
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
        for param in wanted[name]:
            pending.setdefault(param, {})[name] = arr.astype(target)
            sources = graph.param_sources.get(param, (param,))
            if len(pending[param]) < len(sources):
                continue
            parts = pending.pop(param)
            value = parts[sources[0]] if len(sources) == 1 else np.concatenate([parts[s] for s in sources], axis=0)
            expected = graph.params[param].shape
            if tuple(value.shape) != tuple(expected):
                raise SourceError(f"checkpoint tensor(s) {', '.join(sources)} have shape {tuple(value.shape)}, "
                                  f"the model config implies {tuple(expected)}; config.json and weights disagree")
            shard[param] = value
            shard_size += value.nbytes
            if shard_size >= shard_bytes:
                flush()
    flush()
    missing = [p for p in graph.params if p not in index]
    if missing:
        absent = sorted({s for p in missing for s in graph.param_sources.get(p, (p,))} - set(ignored))
        raise SourceError(f"the checkpoint lacks {len(absent)} tensor(s) the model needs, e.g. {', '.join(absent[:3])}")
    unexpected = [n for n in ignored if not n.endswith(_IGNORABLE_SUFFIXES)]
    if unexpected:
        progress(f"note: ignored {len(unexpected)} checkpoint tensor(s) the model does not use, e.g. {unexpected[0]}")
    return index, digests

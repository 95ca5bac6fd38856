"""``ferrum pack-weights ARTIFACT MODEL``: write the weights of an artifact compiled with ``--no-weights``.

The library is built where the compiler is (a CI box with nvcc, no GPU); the weights are packed where
they are (the GPU machine), from the artifact's own IR (``ir.json``: parameters, quantization, kernel
layouts) and the model's checkpoint. Needs numpy and safetensors only: no TVM, no torch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import yaml

from ferrum_runtime.artifact import IR_JSON, MANIFEST, ArtifactError, read_manifest

from .frontend import open_source
from .ir import graph_from_json
from .weights import write_weights

WEIGHTS_DIR = "weights"


def pack_weights(artifact: str | Path, source: str, progress: Callable[[str], None] = print,
                 shard_bytes: int = 1 << 30) -> Path:
    """Read ``source`` and write the weights ``artifact`` declares; the manifest's index and hashes follow."""
    manifest = read_manifest(artifact)
    path = manifest.path
    ckpt = open_source(source, progress)
    have, want = ckpt.config.to_dict(), dict(manifest.model["config"])
    diff = sorted(k for k in set(have) | set(want) if k != "source_dtype" and have.get(k) != want.get(k))
    if diff:
        k = diff[0]
        raise ArtifactError(f"{source} does not match artifact {path}: {k} is {have.get(k)!r} there, "
                            f"{want.get(k)!r} in the artifact; pack the model it was compiled from")
    graph = graph_from_json((path / IR_JSON).read_text())
    dtype = manifest.data["weights"]["dtype"]
    work = path / f".{WEIGHTS_DIR}.partial"
    shutil.rmtree(work, ignore_errors=True)
    progress(f"packing {ckpt.name} into {path / WEIGHTS_DIR} as {dtype}")
    try:
        index, digests = write_weights(graph, ckpt, dtype, work, shard_bytes, lambda m: progress("  " + m))
        shutil.rmtree(path / WEIGHTS_DIR, ignore_errors=True)
        os.replace(work, path / WEIGHTS_DIR)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    record_weights(path, manifest.data, {"dtype": dtype, "index": index}, digests)
    size = sum((path / WEIGHTS_DIR / f).stat().st_size for f in digests)
    progress(f"done: {len(index)} tensors, {size / 2**20:.1f} MiB")
    return path


def record_weights(path: Path, data: dict, weights: dict, digests: dict[str, str]) -> None:
    """Rewrite the manifest (``data``) of the artifact at ``path`` with ``weights`` (its dtype and index)
    and the sha256 of each file in its weights folder (``digests``, by file name) in place of the weights
    it listed; atomically."""
    data["weights"] = weights
    files = {rel: d for rel, d in data["files"].items() if not rel.startswith(WEIGHTS_DIR + "/")}
    files.update({f"{WEIGHTS_DIR}/{name}": d for name, d in digests.items()})
    data["files"] = dict(sorted(files.items()))
    tmp = path / f".{MANIFEST}.partial"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=120))
    os.replace(tmp, path / MANIFEST)

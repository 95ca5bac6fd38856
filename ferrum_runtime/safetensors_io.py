"""A small safetensors reader/writer with bfloat16 support (the `safetensors` numpy API has none).

The format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``,
then the raw bytes. Reading memory-maps the file, so a tensor costs nothing until it is touched;
the compiler streams checkpoints through this and the runtime loads artifact weights with it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

_ST_TO_NP = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
             "BOOL": "bool"}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class SafetensorsFile:
    """Memory-mapped read access to one ``.safetensors`` file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._base = 8 + n
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> str:
        st = self.entries[name]["dtype"]
        if st not in _ST_TO_NP:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {st}, which ferrum cannot read")
        return _ST_TO_NP[st]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor (no copy)."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        raw = self._mm[self._base + begin:self._base + end]
        return raw.view(np_dtype(self.dtype(name))).reshape(e["shape"])

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.entries:
            yield name, self.get(name)


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` (any numpy dtype in the table, bfloat16 via ml_dtypes) to ``path``; returns the
    file's sha256, computed as it is written."""
    header: dict = {}
    offset = 0
    for name, arr in tensors.items():
        if arr.dtype.name not in _NP_TO_ST:
            raise ValueError(f"cannot store tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": _NP_TO_ST[arr.dtype.name], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        chunks: list[bytes | memoryview] = [struct.pack("<Q", len(blob)), blob]
        chunks += [np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in tensors.values()]
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()

"""Read which CUDA architectures a compiled library embeds, from its fatbin headers (no cuobjdump)."""

from __future__ import annotations

import struct
from pathlib import Path

_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little endian
_KINDS = {1: ("ptx", "compute_"), 2: ("cubin", "sm_")}  # entry kind -> (key, arch prefix)


def fatbins(library: str | Path) -> list[bytes]:
    """Every fatbin embedded in the file, whole (header and entries), in file order."""
    data = Path(library).read_bytes()
    out = []
    start = data.find(_MAGIC)
    while start >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        end = start + header_size + fat_size
        out.append(data[start:min(end, len(data))])
        start = data.find(_MAGIC, max(end, start + 4))
    return out


def embedded_cuda_code(library: str | Path) -> dict[str, list[str]]:
    """``{"cubin": ["sm_90"], "ptx": ["compute_90"]}`` over every fatbin in the file; empty lists if none."""
    found: dict[str, set[str]] = {"cubin": set(), "ptx": set()}
    for blob in fatbins(library):
        off = struct.unpack_from("<IHHQ", blob)[2]  # the header's size
        while off + 32 <= len(blob):
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", blob, off)
            arch = struct.unpack_from("<I", blob, off + 28)[0]
            if kind in _KINDS and entry_header:
                key, prefix = _KINDS[kind]
                found[key].add(f"{prefix}{arch}")
            if entry_header == 0:
                break
            off += entry_header + size
    return {k: sorted(v) for k, v in found.items()}

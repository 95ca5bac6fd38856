"""Read which CUDA architectures a compiled library embeds, from its fatbin headers (no cuobjdump)."""

from __future__ import annotations

import struct
from pathlib import Path

_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little endian
_KINDS = {1: ("ptx", "compute_"), 2: ("cubin", "sm_")}  # entry kind -> (key, arch prefix)


def embedded_cuda_code(library: str | Path) -> dict[str, list[str]]:
    """``{"cubin": ["sm_90"], "ptx": ["compute_90"]}`` over every fatbin in the file; empty lists if none."""
    data = Path(library).read_bytes()
    found: dict[str, set[str]] = {"cubin": set(), "ptx": set()}
    start = data.find(_MAGIC)
    while start >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        off, end = start + header_size, start + header_size + fat_size
        while off + 32 <= min(end, len(data)):
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, off)
            arch = struct.unpack_from("<I", data, off + 28)[0]
            if kind in _KINDS and entry_header:
                key, prefix = _KINDS[kind]
                found[key].add(f"{prefix}{arch}")
            if entry_header == 0:
                break
            off += entry_header + size
        start = data.find(_MAGIC, max(end, start + 4))
    return {k: sorted(v) for k, v in found.items()}

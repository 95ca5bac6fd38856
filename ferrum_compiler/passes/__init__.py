"""The compiler's graph passes, run in this order. Each pass is a pure function Graph -> Graph in a
file of its own, named for its effect."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..ir import Graph, print_graph
from .fuse_parallel_linears import fuse_parallel_linears
from .quantize_linears import quantize_linears

PIPELINE: list[tuple[str, Callable[[Graph], Graph]]] = [
    ("fuse_parallel_linears", fuse_parallel_linears),  # q/k/v and gate/up share one matmul each
    ("quantize_linears", quantize_linears),  # declared INT4/INT8 weights: packed params, fused dequant ops
]


def run_passes(graph: Graph, dump_dir: Path | None = None) -> Graph:
    """Apply PIPELINE; with ``dump_dir`` write the printed graph before and after every pass."""
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-model.txt").write_text(print_graph(graph))
    for i, (name, fn) in enumerate(PIPELINE, start=1):
        graph = fn(graph)
        if dump_dir is not None:
            (dump_dir / f"{i:02d}-{name}.txt").write_text(print_graph(graph))
    return graph

"""``ferrum compile``: called by the ``ferrum`` console script (ferrum_runtime.cli) for this one command."""

from __future__ import annotations

import argparse
import sys

from .compile import compile_model
from .config import CompileOptions


def run_compile(args: argparse.Namespace) -> int:
    output = args.output or f"artifacts/{_default_name(args.model)}"
    options = CompileOptions(target=args.target, dtype=args.dtype or "", block_size=args.block_size,
                             quant=args.quant, weights=not args.no_weights, act_bits=args.act_bits,
                             kv_dtype=args.kv_dtype or "")
    compile_model(args.model, output, options, progress=lambda m: print(m, file=sys.stderr, flush=True),
                  dump_ir=args.dump_ir)
    return 0


def _default_name(model: str) -> str:
    base = model.rstrip("/").split("/")[-1]
    if base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    return base.lower().replace(":", "-")

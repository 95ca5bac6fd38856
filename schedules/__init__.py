"""Hand-written kernels: one file per kernel family, each with its numpy reference beside it.

Schedules know shapes, dtypes and targets, never models. Installed as ``ferrum.schedules``.
"""

import numpy as np


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of ``dtype`` (TVM's names: bfloat16 and float8 types included)."""
    if dtype == "bfloat16":
        return 2
    if dtype.startswith("float8"):
        return 1
    return np.dtype(dtype).itemsize


def zero_const(dtype: str):
    """The TIR constant 0 of ``dtype``; bfloat16's as its bits (TVM's OpenCL bfloat16 code, which the test
    emulator runs, turns a bfloat16 cast or constant into invalid C)."""
    from tvm import tirx

    return tirx.reinterpret(dtype, tirx.const(0, "uint16")) if dtype == "bfloat16" else tirx.const(0, dtype)


def mma_operand_type(dtype: str) -> str:
    """PTX's name of a 16-bit ``mma.sync`` operand type: ``fp16`` or ``bf16``."""
    return {"float16": "fp16", "bfloat16": "bf16"}[dtype]

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

"""Vectorizable float32 math for CPU kernels, with numpy references.

LLVM lowers ``exp`` on a vector to one scalar ``expf`` call per lane; the softmax in attention and the
SiLU in every MLP then run one library call per element. ``exp_f32`` is the usual range reduction plus
polynomial, built from adds, multiplies and integer bit moves that stay in SIMD registers.
"""

from __future__ import annotations

import numpy as np

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 split so that n * _LN2_HI is exact in float32 for |n| < 2^9
_LN2_LO = 1.428606765330187e-06
_MIN_X, _MAX_X = -87.0, 88.0  # e^-87 is near the smallest normal float32; e^88 below its largest
# Taylor coefficients of e^r (1/k!) for |r| <= ln2/2: truncation error r^7/7! < 1.3e-7 relative
_COEFFS = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720)


def exp_f32(x):
    """``e**x`` as a scalar float32 TIR expression (inside ``T.vectorized`` loops it becomes vector code): 0
    below -87, relative error < 3e-7 elsewhere (``exp_f32_ref``). ``x = n ln2 + r``; ``e**r`` by its Taylor
    polynomial; ``2**n`` by writing ``n + 127`` into the exponent bits."""
    from tvm import tirx

    def c(v):
        return tirx.const(v, "float32")

    xc = tirx.max(tirx.min(x, c(_MAX_X)), c(_MIN_X))
    n = tirx.floor(xc * c(_LOG2E) + c(0.5))
    r = xc - n * c(_LN2_HI) - n * c(_LN2_LO)
    p = c(_COEFFS[-1])
    for k in reversed(_COEFFS[:-1]):
        p = p * r + c(k)
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"),
                                                        tirx.const(23, "int32")))
    return tirx.Select(x < c(_MIN_X), c(0.0), p * two_n)


def exp_f32_ref(x: np.ndarray) -> np.ndarray:
    """numpy model of ``exp_f32`` (same reduction and polynomial, float32)."""
    x = np.asarray(x, np.float32)
    xc = np.clip(x, np.float32(_MIN_X), np.float32(_MAX_X))
    n = np.floor(xc * np.float32(_LOG2E) + np.float32(0.5)).astype(np.float32)
    r = xc - n * np.float32(_LN2_HI) - n * np.float32(_LN2_LO)
    p = np.float32(_COEFFS[-1]) * np.ones_like(r)
    for k in reversed(_COEFFS[:-1]):
        p = p * r + np.float32(k)
    two_n = ((n.astype(np.int32) + 127) << 23).view(np.float32)
    return np.where(x < _MIN_X, np.float32(0), p * two_n).astype(np.float32)

"""GGUF K-quant (and IQ) tensors for tests. The ``gguf`` package reads (dequantizes) them but
cannot make them, so a tensor here is random bytes, which are valid blocks whatever they hold, with each
block's float16 scale (and min scale) set so that the weights come out around ``scale``: the integers (or
table indices) and 4/6/8-bit sub-block scales stay random. ``gguf.quants.dequantize`` is the reference."""

from __future__ import annotations

import numpy as np

# type: (weights per block, bytes per block, offset of the float16 d, standard deviation of d's integer
# product (sub-block scale x value) for uniform random bytes, offset of the min's integer over the scale's)
KQUANTS = {"Q4_K": (256, 144, 0, 218.0, 7.5), "Q5_K": (256, 176, 0, 443.0, 15.5), "Q6_K": (256, 210, 208, 1365.0, 0.0),
           "Q2_K": (256, 84, 80, 11.3, 1.5), "Q3_K": (256, 110, 108, 43.3, 0.0),
           "IQ4_XS": (256, 136, 0, 1246.2, 0.0), "IQ4_NL": (32, 18, 0, 67.2, 0.0),
           "IQ1_S": (256, 50, 0, 7.2, 0.0), "IQ1_M": (256, 56, 48, 7.2, 0.0), "IQ2_XXS": (256, 66, 0, 53.1, 0.0),
           "IQ2_XS": (256, 74, 0, 55.8, 0.0), "IQ2_S": (256, 82, 0, 56.3, 0.0), "IQ3_XXS": (256, 98, 0, 143.2, 0.0),
           "IQ3_S": (256, 110, 0, 140.6, 0.0), "TQ1_0": (256, 54, 52, 0.8, 0.0), "TQ2_0": (256, 66, 64, 1.1, 0.0)}


def random_kquant(rng: np.random.Generator, type_name: str, rows: int, cols: int, scale: float) -> np.ndarray:
    """``uint8 [rows, cols / weights * bytes]``: a ``[rows, cols]`` tensor of type ``type_name``."""
    per, size, at, spread, centre = KQUANTS[type_name]
    assert cols % per == 0, f"{type_name} comes in blocks of {per} weights along a row"
    blocks = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    d = (scale / spread * rng.uniform(0.5, 1.5, (rows, cols // per))).astype(np.float16)
    if type_name == "IQ1_M":  # d's four nibbles top the four 16-bit scale words at ``at``, lowest first
        words = blocks[..., at:at + 8].copy().view("<u2")
        bits = d.view(np.uint16)[..., None] >> np.array([0, 4, 8, 12], dtype=np.uint16) & 15
        blocks[..., at:at + 8] = ((words & 0x0FFF) | bits << 12).astype("<u2").view(np.uint8)
    else:
        blocks[..., at:at + 2] = d[..., None].view(np.uint8)
    if centre:  # Q2_K/Q4_K/Q5_K: weights are d * sc * q - dmin * m; a dmin (after d) that centres them near 0
        blocks[..., at + 2:at + 4] = (d * np.float16(centre))[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)

"""Numpy reference interpreter: runs a Graph op by op. Every lowering is tested against it.

Computes in float64 internally and casts each op's result to the value's dtype, so it is a
reference for float32 artifacts. KV caches passed in ``inputs`` are updated in place, as the compiled
model does.
"""

from __future__ import annotations

import numpy as np

from ferrum.schedules.linear import linear_ref
from ferrum.schedules.moe import moe_ref
from ferrum.schedules.quant_linear import QuantFormat, deinterleave_r16, dequantize_ref, qembedding_ref, qlinear_ref
from ferrum.schedules.paged_attention import attention_ref, kv_append_ref

from .graph import Graph
from .rope import rope_inv_freq


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def rope_ref(x: np.ndarray, positions: np.ndarray, theta: float, scaling: dict) -> np.ndarray:
    """Rotate-half RoPE on ``x[T, H, D]``."""
    half = x.shape[-1] // 2
    freqs = positions.astype(np.float64)[:, None] * rope_inv_freq(x.shape[-1], theta, scaling)[None, :]
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]
    x1, x2 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rms_norm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def silu_mul_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    return g / (1.0 + np.exp(-g)) * up


def run_graph(graph: Graph, inputs: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute ``graph``; returns its outputs by name."""
    env: dict[str, np.ndarray] = {**params, **inputs}
    missing = [n for n in list(graph.inputs) + list(graph.params) if n not in env]
    if missing:
        raise KeyError(f"missing inputs/params: {missing[:5]}")
    for op in graph.ops:
        a = [env[i] for i in op.inputs]
        k = op.kind
        if k == "embedding":
            r = a[0][a[1]]
        elif k == "rms_norm":
            r = rms_norm_ref(a[0], a[1], op.attrs["eps"])
        elif k == "linear":
            r = linear_ref(a[0], a[1], a[2] if op.attrs["bias"] else None, out_dtype="float64")
        elif k == "slice":
            r = a[0][..., op.attrs["begin"]:op.attrs["end"]]
        elif k == "reshape":
            r = a[0].reshape((a[0].shape[0], *op.attrs["shape"][1:]))
        elif k == "rope":
            r = rope_ref(a[0], a[1], op.attrs["theta"], op.attrs["scaling"])
        elif k == "paged_attention":
            q, kk, v, cache, positions, query_start, block_tables, slot_mapping = a
            kv_append_ref(cache, kk.astype(cache.dtype), v.astype(cache.dtype), slot_mapping)
            r = attention_ref(q, cache, positions, query_start, block_tables, op.attrs["sliding_window"], op.attrs["scale"])
        elif k == "silu_mul":
            r = silu_mul_ref(a[0], a[1])
        elif k == "add":
            r = a[0].astype(np.float64) + a[1]
        elif k == "take_rows":
            r = a[0][a[1]]
        elif k == "take_cols":
            r = a[0][:, a[1]]
        elif k == "qlinear":
            fmt = QuantFormat.from_dict(op.attrs)
            packed = {"qweight": a[1], "scales": a[2], **({} if fmt.sym else {"mins": a[3]})}
            if op.attrs.get("layout", "rows") == "r16":
                packed = deinterleave_r16(packed, op.attrs["out_features"], fmt.bits)
            bias = a[-1] if op.attrs["bias"] else None
            r = qlinear_ref(a[0], fmt, packed["qweight"], packed["scales"], packed.get("mins"), bias, out_dtype="float64")
        elif k == "qembedding":
            fmt = QuantFormat.from_dict(op.attrs)
            tables = a[:-1]
            if op.attrs.get("layout", "rows") == "r16":  # int8: every row of the padded blocks
                roles = ["qweight", "scales"] + ([] if fmt.sym else ["mins"])
                back = deinterleave_r16(dict(zip(roles, a)), a[0].shape[0] * 16, fmt.bits)
                tables = [back[role] for role in roles]
            r = qembedding_ref(fmt, tables[0], tables[1], None if fmt.sym else tables[2], a[-1])
        elif k == "moe":
            rest, stacks = list(a[2:]), []
            for key in ("gate_up_quant", "down_quant"):
                q = op.attrs[key]
                if q is None:
                    stacks.append(rest.pop(0))
                    continue
                fmt = QuantFormat.from_dict(q)
                n = 2 if fmt.sym else 3
                t, rest = rest[:n], rest[n:]
                if q.get("layout") == "r16":  # the stack's rows: whole 16-row blocks
                    roles = ["qweight", "scales"] + ([] if fmt.sym else ["mins"])
                    back = deinterleave_r16(dict(zip(roles, t)), t[0].shape[0] * 16, fmt.bits)
                    t = [back[role] for role in roles]
                stacks.append(dequantize_ref(fmt, t[0], t[1], None if fmt.sym else t[2]))
            r = moe_ref(a[0], a[1], stacks[0], stacks[1], op.attrs["top_k"], op.attrs["norm_topk_prob"])
        else:
            raise NotImplementedError(f"interpreter has no rule for op {k!r}")
        env[op.output] = np.asarray(r).astype(_np_dtype(graph.values[op.output].dtype))
    return {name: env[name] for name in graph.outputs}

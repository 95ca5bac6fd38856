"""The small IR: a typed SSA graph of LLM-sized ops over values with symbolic shapes.

A ``Graph`` has runtime inputs (the ragged batch of DESIGN §5 and the per-layer KV caches), parameters
(weights, named after the checkpoint that fills them) and an ordered list of ops, each producing one
value. Shapes mix ints and symbol names: ``"T"`` (tokens in the step), ``"B"`` (sequences), ``"M"``
(max blocks per sequence), ``"NB"`` (KV blocks), ``"L"`` (rows to return logits for). Ops are checked when they are added, so a model that
builds is well typed.

Ops (attrs in brackets):
- ``embedding(table[V,D], ids[T]) -> [T,D]``
- ``rms_norm(x[...,D], w[D]) [eps] -> x``  (normalises the last axis; also per-head qk-norm)
- ``linear(x[T,K], w[N,K], bias[N]?) [out_dtype] -> [T,N]``
- ``slice(x[...,N]) [begin, end] -> [...,end-begin]``  (last axis)
- ``reshape(x) [shape] -> shape``
- ``rope(x[T,H,D], positions[T]) [theta, scaling, rotary_dim] -> x``  (rotate-half convention)
- ``paged_attention(q[T,H,D], k[T,KVH,D], v[T,KVH,D], cache, positions, query_start, block_tables,
  slot_mapping) [scale, sliding_window] -> [T,H,D]``; appends k/v to ``cache`` in place first
- ``silu_mul(gate[T,I], up[T,I]) -> [T,I]``
- ``add(a, b) -> a``
- ``take_rows(x[T,D], index[B]) -> [B,D]``
- ``take_cols(x[T,K], perm[K]) -> [T,K]``  (act-order GPTQ: inputs in the kernel's column order)
- ``qlinear(x[T,K], qweight, scales, mins?, bias[N]?) [bits, group_size, sym, in_features, out_features,
  out_dtype] -> [T,N]``  (group-affine INT4/INT8 weights in the layout of ``schedules/quant_linear.py``)
- ``qembedding(qweight, scales, mins?, ids[T]) [bits, group_size, sym] -> [T,D]``
- ``moe(x[T,D], router_logits[T,E], gate_up[E*2I,D], down[E*D,I]) [num_experts, top_k, norm_topk_prob,
  intermediate, gate_up_quant, down_quant] -> [T,D]``  (softmax top-k routing, SiLU-gated experts; each
  expert's gate rows then up rows are stacked in ``gate_up``; after ``quantize_linears`` a quantized
  expert stack is passed as its packed tensors and described by ``*_quant``)

Quantization is declared per dense weight in ``Graph.quant`` (set by the compiler from the checkpoint or
``--quant``) and applied by the ``quantize_linears`` pass, which replaces each such weight by its packed
tensors and records them in ``Graph.packing``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

Dim = int | str
Shape = tuple[Dim, ...]

OP_KINDS = (
    "embedding",
    "rms_norm",
    "linear",
    "slice",
    "reshape",
    "rope",
    "paged_attention",
    "silu_mul",
    "add",
    "take_rows",
    "take_cols",
    "qlinear",
    "qembedding",
    "moe",
)


@dataclass(frozen=True)
class Value:
    name: str
    shape: Shape
    dtype: str


@dataclass(frozen=True)
class Op:
    kind: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """Inputs, params and values are keyed by name; ``ops`` are in execution order."""

    inputs: dict[str, Value] = field(default_factory=dict)
    params: dict[str, Value] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    outputs: tuple[str, ...] = ()
    # artifact param -> checkpoint tensors concatenated along axis 0 (absent: the param itself)
    param_sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # dense weight -> declared quantization (QuantSpec.to_dict()); read by the quantize_linears pass
    quant: dict[str, dict] = field(default_factory=dict)
    # quantized weight (a name in param_sources' sense) -> {"qweight"|"scales"|"mins"|"perm": param name}
    packing: dict[str, dict[str, str]] = field(default_factory=dict)

    def value(self, name: str) -> Value:
        for table in (self.inputs, self.params, self.values):
            if name in table:
                return table[name]
        raise KeyError(f"no value named {name!r} in the graph")

    def consumers(self, name: str) -> list[Op]:
        return [op for op in self.ops if name in op.inputs]


class IRError(ValueError):
    """An op was built with operands that do not fit together."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise IRError(msg)


def static(d: Dim) -> int:
    """A dimension that must be known at compile time (features, heads), not a symbol."""
    if not isinstance(d, int):
        raise IRError(f"dimension {d!r} must be static here")
    return d


class GraphBuilder:
    """Builds a ``Graph`` op by op; each method checks its operands and returns the output name."""

    def __init__(self) -> None:
        self.graph = Graph()
        self._counter = 0

    # -- declarations
    def input(self, name: str, shape: Shape, dtype: str) -> str:
        self.graph.inputs[name] = Value(name, tuple(shape), dtype)
        return name

    def param(self, name: str, shape: Shape, dtype: str, sources: Sequence[str] = ()) -> str:
        """``sources``: checkpoint tensors stacked along axis 0 to fill it (default: the tensor ``name``)."""
        _require(name not in self.graph.params, f"parameter {name!r} declared twice")
        self.graph.params[name] = Value(name, tuple(shape), dtype)
        if sources:
            self.graph.param_sources[name] = tuple(sources)
        return name

    def output(self, *names: str) -> Graph:
        self.graph.outputs = tuple(names)
        return self.graph

    # -- ops
    def _emit(self, kind: str, inputs: Sequence[str | None], shape: Shape, dtype: str, attrs: dict | None = None, hint: str = "") -> str:
        self._counter += 1
        name = f"%{self._counter}" + (f".{hint}" if hint else "")
        value = Value(name, tuple(shape), dtype)
        self.graph.values[name] = value
        self.graph.ops.append(Op(kind, tuple(i for i in inputs if i is not None), name, dict(attrs or {})))
        return name

    def _v(self, name: str) -> Value:
        return self.graph.value(name)

    def embedding(self, table: str, ids: str) -> str:
        t, i = self._v(table), self._v(ids)
        _require(len(t.shape) == 2 and len(i.shape) == 1, f"embedding wants table[V,D], ids[T]; got {t.shape}, {i.shape}")
        return self._emit("embedding", [table, ids], (i.shape[0], t.shape[1]), t.dtype, hint="embed")

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        xv, wv = self._v(x), self._v(weight)
        _require(wv.shape == (xv.shape[-1],), f"rms_norm weight {wv.shape} does not match last axis of {xv.shape}")
        return self._emit("rms_norm", [x, weight], xv.shape, xv.dtype, {"eps": float(eps)}, hint="norm")

    def linear(self, x: str, weight: str, bias: str | None = None, out_dtype: str | None = None) -> str:
        xv, wv = self._v(x), self._v(weight)
        _require(len(xv.shape) == 2 and len(wv.shape) == 2 and wv.shape[1] == xv.shape[1],
                 f"linear wants x[T,K], w[N,K]; got {xv.shape}, {wv.shape}")
        if bias is not None:
            _require(self._v(bias).shape == (wv.shape[0],), f"bias {self._v(bias).shape} does not match {wv.shape}")
        out_dtype = out_dtype or xv.dtype
        return self._emit("linear", [x, weight, bias], (xv.shape[0], wv.shape[0]), out_dtype,
                          {"out_dtype": out_dtype, "bias": bias is not None}, hint="linear")

    def slice(self, x: str, begin: int, end: int) -> str:
        xv = self._v(x)
        _require(0 <= begin < end <= static(xv.shape[-1]), f"slice [{begin}:{end}] outside last axis {xv.shape[-1]}")
        return self._emit("slice", [x], (*xv.shape[:-1], end - begin), xv.dtype, {"begin": begin, "end": end})

    def reshape(self, x: str, shape: Shape) -> str:
        xv = self._v(x)
        _require(xv.shape[0] == shape[0] and _numel(xv.shape[1:]) == _numel(shape[1:]),
                 f"reshape {xv.shape} -> {shape} changes the element count")
        return self._emit("reshape", [x], shape, xv.dtype, {"shape": list(shape)})

    def rope(self, x: str, positions: str, theta: float, scaling: dict | None = None) -> str:
        xv = self._v(x)
        _require(len(xv.shape) == 3 and static(xv.shape[-1]) % 2 == 0, f"rope wants x[T,H,D] with even D; got {xv.shape}")
        attrs = {"theta": float(theta), "scaling": dict(scaling or {})}
        return self._emit("rope", [x, positions], xv.shape, xv.dtype, attrs, hint="rope")

    def paged_attention(self, q: str, k: str, v: str, cache: str, batch: dict[str, str], scale: float, sliding_window: int = 0) -> str:
        qv, kv, cv = self._v(q), self._v(k), self._v(cache)
        _require(kv.shape == self._v(v).shape and kv.shape[-1] == qv.shape[-1], f"q/k/v shapes {qv.shape} {kv.shape}")
        _require(static(qv.shape[1]) % static(kv.shape[1]) == 0, f"query heads {qv.shape[1]} not a multiple of kv heads {kv.shape[1]}")
        _require(cv.shape[2] == kv.shape[1] and cv.shape[4] == kv.shape[2], f"cache {cv.shape} does not fit k {kv.shape}")
        ins = [q, k, v, cache, batch["positions"], batch["query_start"], batch["block_tables"], batch["slot_mapping"]]
        attrs = {"scale": float(scale), "sliding_window": int(sliding_window)}
        return self._emit("paged_attention", ins, qv.shape, qv.dtype, attrs, hint="attn")

    def silu_mul(self, gate: str, up: str) -> str:
        gv = self._v(gate)
        _require(gv.shape == self._v(up).shape, f"silu_mul shapes differ: {gv.shape} vs {self._v(up).shape}")
        return self._emit("silu_mul", [gate, up], gv.shape, gv.dtype, hint="act")

    def add(self, a: str, b: str) -> str:
        av, bv = self._v(a), self._v(b)
        _require(av.shape == bv.shape, f"add shapes differ: {av.shape} vs {bv.shape}")
        return self._emit("add", [a, b], av.shape, av.dtype, hint="res")

    def moe(self, x: str, router_logits: str, gate_up: str, down: str, top_k: int, norm_topk_prob: bool) -> str:
        xv, lv, gv, dv = (self._v(n) for n in (x, router_logits, gate_up, down))
        experts, d = static(lv.shape[1]), static(xv.shape[1])
        _require(len(gv.shape) == 2 and gv.shape[1] == d and static(gv.shape[0]) % (2 * experts) == 0,
                 f"moe gate_up {gv.shape} is not [E*2I, {d}] for E={experts}")
        inter = static(gv.shape[0]) // (2 * experts)
        _require(dv.shape == (experts * d, inter), f"moe down {dv.shape} is not [{experts * d}, {inter}]")
        _require(0 < top_k <= experts, f"moe top_k {top_k} outside 1..{experts}")
        attrs = {"num_experts": experts, "top_k": int(top_k), "norm_topk_prob": bool(norm_topk_prob),
                 "intermediate": inter, "gate_up_quant": None, "down_quant": None}
        return self._emit("moe", [x, router_logits, gate_up, down], xv.shape, xv.dtype, attrs, hint="moe")

    def take_rows(self, x: str, index: str) -> str:
        xv, iv = self._v(x), self._v(index)
        return self._emit("take_rows", [x, index], (iv.shape[0], *xv.shape[1:]), xv.dtype)


def _numel(shape: Shape) -> int | str:
    n = 1
    for d in shape:
        if isinstance(d, str):
            return "?"
        n *= d
    return n

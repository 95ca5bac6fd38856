"""Printing and (de)serialising graphs. The JSON form is stored in every artifact."""

from __future__ import annotations

import json

from .graph import Graph, Op, Value


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def print_graph(graph: Graph, max_ops: int | None = None) -> str:
    """Human-readable listing: inputs, a parameter count, then one line per op."""
    lines = ["graph("]
    for v in graph.inputs.values():
        lines.append(f"  {v.name}: {v.dtype}{_shape(v.shape)}")
    n_params = sum(_numel(v.shape) for v in graph.params.values())
    lines.append(f") params: {len(graph.params)} tensors, {n_params:,} elements {{")
    ops = graph.ops if max_ops is None else graph.ops[:max_ops]
    for op in ops:
        out = graph.values[op.output]
        attrs = ", ".join(f"{k}={v}" for k, v in op.attrs.items())
        lines.append(f"  {op.output}: {out.dtype}{_shape(out.shape)} = {op.kind}({', '.join(op.inputs)})"
                     + (f" {{{attrs}}}" if attrs else ""))
    if max_ops is not None and len(graph.ops) > max_ops:
        lines.append(f"  ... {len(graph.ops) - max_ops} more ops")
    lines.append(f"  return {', '.join(graph.outputs)}")
    lines.append("}")
    return "\n".join(lines)


def op_histogram(graph: Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in graph.ops:
        counts[op.kind] = counts.get(op.kind, 0) + 1
    return counts


def graph_to_json(graph: Graph) -> str:
    def val(v: Value) -> dict:
        return {"name": v.name, "shape": list(v.shape), "dtype": v.dtype}

    return json.dumps({
        "inputs": [val(v) for v in graph.inputs.values()],
        "params": [val(v) for v in graph.params.values()],
        "values": [val(v) for v in graph.values.values()],
        "ops": [{"kind": op.kind, "inputs": list(op.inputs), "output": op.output, "attrs": op.attrs} for op in graph.ops],
        "outputs": list(graph.outputs),
        "param_sources": {k: list(v) for k, v in graph.param_sources.items()},
        "quant": graph.quant,
        "packing": graph.packing,
    })


def graph_from_json(text: str) -> Graph:
    data = json.loads(text)

    def val(d: dict) -> Value:
        return Value(d["name"], tuple(d["shape"]), d["dtype"])

    return Graph(
        inputs={d["name"]: val(d) for d in data["inputs"]},
        params={d["name"]: val(d) for d in data["params"]},
        values={d["name"]: val(d) for d in data["values"]},
        ops=[Op(o["kind"], tuple(o["inputs"]), o["output"], o["attrs"]) for o in data["ops"]],
        outputs=tuple(data["outputs"]),
        param_sources={k: tuple(v) for k, v in data.get("param_sources", {}).items()},
        quant=data.get("quant", {}),
        packing=data.get("packing", {}),
    )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else 1
    return n

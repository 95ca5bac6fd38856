"""Replace every weight declared in ``Graph.quant`` by its packed tensors and its ops by quantized ones.

Before: ``y = linear(x, W[N,K])`` with ``graph.quant[W] = {bits: 4, group_size: 128, sym, act_order, layout?}``
(``layout``: the packed tensors' kernel layout, ``"rows"`` unless the compiler chose ``"r16"`` for the target).
After:  ``y = qlinear(take_cols(x, W.perm)?, W.qweight, W.scales, W.mins?)``; an ``embedding`` over a
quantized table becomes ``qembedding``, so a tied lm_head and the embedding share one packed table.
``graph.packing[W]`` names the packed params; ``graph.param_sources[W]`` still names the checkpoint
tensors, which the weight writer quantizes (or converts) and packs.
"""

from __future__ import annotations

import copy

from ferrum.schedules.quant_linear import QuantFormat

from ..ir import Graph, IRError, Op, Value, static


def quantize_linears(graph: Graph) -> Graph:
    g = copy.deepcopy(graph)
    params: dict[str, Value] = {}
    for name, value in g.params.items():
        if name not in g.quant:
            params[name] = value
            continue
        spec = g.quant[name]
        fmt = QuantFormat.from_dict(spec)
        n, k = static(value.shape[0]), static(value.shape[1])
        why = fmt.check(k)
        if why:
            raise IRError(f"{name}: {why}")
        shapes = fmt.packed_shapes(n, k, spec.get("layout", "rows"))
        if spec.get("act_order"):
            shapes["perm"] = ((k,), "int32")
        g.packing[name] = {role: f"{name}.{role}" for role in shapes}
        for role, (shape, dtype) in shapes.items():
            params[f"{name}.{role}"] = Value(f"{name}.{role}", shape, dtype)
    g.params = params
    ops: list[Op] = []
    for op in g.ops:
        if op.kind == "moe":
            ops.append(_quantize_moe(g, op))
            continue
        w = op.inputs[1] if op.kind == "linear" else op.inputs[0] if op.kind == "embedding" else None
        if w not in g.packing:
            ops.append(op)
            continue
        spec, packed = g.quant[w], g.packing[w]
        fmt_attrs = QuantFormat.from_dict(spec).to_dict()
        layout = spec.get("layout", "rows")
        tensors = [packed["qweight"], packed["scales"]] + ([packed["mins"]] if "mins" in packed else [])
        if op.kind == "embedding":
            if "perm" in packed or (layout != "rows" and spec["bits"] != 8):
                raise IRError(f"{w}: an embedding table needs the row layout (or r16 for 8 bits), without "
                              "act-order columns")
            ops.append(Op("qembedding", (*tensors, op.inputs[1]), op.output,
                          {**fmt_attrs, **({"layout": layout} if layout != "rows" else {})}))
            continue
        x = op.inputs[0]
        if "perm" in packed:
            cols = op.output + ".cols"
            g.values[cols] = Value(cols, g.value(x).shape, g.value(x).dtype)
            ops.append(Op("take_cols", (x, packed["perm"]), cols))
            x = cols
        if layout == "r16":
            fmt_attrs["act_bits"] = spec.get("act_bits", 16)
        attrs = {**fmt_attrs, "layout": layout, "in_features": g.value(op.inputs[0]).shape[1],
                 "out_features": g.value(op.output).shape[1], **op.attrs}
        ops.append(Op("qlinear", (x, *tensors, *op.inputs[2:]), op.output, attrs))
    g.ops = ops
    return g


def _quantize_moe(g: Graph, op: Op) -> Op:
    """Expert stacks in ``graph.packing`` are passed as their packed tensors."""
    inputs, attrs = list(op.inputs[:2]), dict(op.attrs)
    for w, key in ((op.inputs[2], "gate_up_quant"), (op.inputs[3], "down_quant")):
        if w not in g.packing:
            inputs.append(w)
            continue
        packed = g.packing[w]
        if "perm" in packed:
            raise IRError(f"{w}: MoE experts cannot take act-order (desc_act) columns")
        inputs += [packed[r] for r in ("qweight", "scales", "mins") if r in packed]
        spec = g.quant[w]
        layout = {"layout": "r16", "act_bits": spec.get("act_bits", 16)} if spec.get("layout") == "r16" else {}
        attrs[key] = {**QuantFormat.from_dict(spec).to_dict(), **layout}
    return Op("moe", tuple(inputs), op.output, attrs)

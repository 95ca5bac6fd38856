"""Fuse linears that read the same input (q/k/v, gate/up) into one wider linear plus slices.

Before: ``q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)``.
After:  ``qkv = linear(x, Wq‖Wk‖Wv); q = slice(qkv, 0, Nq); k = slice(...); v = slice(...)``.
The fused weight (and bias) is recorded in ``graph.param_sources`` as the concatenation of the
checkpoint tensors along axis 0, which the weight writer applies while streaming. One matmul instead
of three reads the activations once and launches one kernel.
"""

from __future__ import annotations

import copy

from ..ir import Graph, Op, Value, static


def _fused_name(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > tail and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middle = "+".join(".".join(p[head:len(p) - tail]) for p in parts)
    return ".".join(parts[0][:head] + [middle] + (parts[0][len(parts[0]) - tail:] if tail else []))


def fuse_parallel_linears(graph: Graph) -> Graph:
    g = copy.deepcopy(graph)
    groups: dict[tuple, list[Op]] = {}
    for op in g.ops:
        if op.kind == "linear" and op.inputs[1] in g.params and len(g.consumers(op.inputs[1])) == 1:
            quant = g.quant.get(op.inputs[1])
            if quant and quant.get("act_order"):
                continue  # each act-order weight has its own column permutation
            key = (op.inputs[0], op.attrs["out_dtype"], op.attrs["bias"], repr(quant))
            groups.setdefault(key, []).append(op)
    replace: dict[str, list[Op]] = {}  # output of the group's first op -> ops that take the group's place
    drop: set[str] = set()
    for (x, out_dtype, has_bias, _), ops in groups.items():
        if len(ops) < 2:
            continue
        weights = [op.inputs[1] for op in ops]
        w_name = _fused_name(weights)
        widths = [static(g.params[w].shape[0]) for w in weights]
        k = g.params[weights[0]].shape[1]
        g.params[w_name] = Value(w_name, (sum(widths), k), g.params[weights[0]].dtype)
        g.param_sources[w_name] = tuple(s for w in weights for s in g.param_sources.get(w, (w,)))
        if weights[0] in g.quant:
            g.quant[w_name] = g.quant[weights[0]]
        inputs = [x, w_name]
        if has_bias:
            biases = [op.inputs[2] for op in ops]
            b_name = _fused_name(biases)
            g.params[b_name] = Value(b_name, (sum(widths),), g.params[biases[0]].dtype)
            g.param_sources[b_name] = tuple(s for b in biases for s in g.param_sources.get(b, (b,)))
            inputs.append(b_name)
            weights += biases
        for w in weights:
            del g.params[w]
            g.param_sources.pop(w, None)
            g.quant.pop(w, None)
        fused_out = ops[0].output + ".fused"
        g.values[fused_out] = Value(fused_out, (g.value(x).shape[0], sum(widths)), out_dtype)
        new_ops = [Op("linear", tuple(inputs), fused_out, dict(ops[0].attrs))]
        begin = 0
        for op, width in zip(ops, widths):
            new_ops.append(Op("slice", (fused_out,), op.output, {"begin": begin, "end": begin + width}))
            begin += width
        replace[ops[0].output] = new_ops
        drop.update(op.output for op in ops[1:])
    new_list: list[Op] = []
    for op in g.ops:
        if op.output in replace:
            new_list.extend(replace[op.output])
        elif op.output not in drop:
            new_list.append(op)
    g.ops = new_list
    return g

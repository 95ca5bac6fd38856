"""The CPU build pipeline leaves no legalized op serial: norms, residual adds, RoPE, SiLU·mul and
gathers get a parallel loop, and (without q/k norms in between) the q/k column slices of the fused q/k/v
linear are read in place by RoPE instead of being copied first. Numerics are covered by the model parity tests."""

from __future__ import annotations

import pytest

from ferrum.models.registry import family
from ferrum_compiler import lowering
from ferrum_compiler.compile import declared_quantization, kernel_layouts
from ferrum_compiler.cpu_schedule import cpu_pipeline
from ferrum_compiler.frontend import open_source
from ferrum_compiler.passes import run_passes
from ferrum_compiler.targets import resolve


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3-moe"])
def test_every_legalized_cpu_function_runs_in_parallel(name, tiny_model_dir):
    import tvm

    spec = resolve("cpu")
    ckpt = open_source(str(tiny_model_dir(name)), weights=False)
    graph = family(ckpt.config.arch).build(ckpt.config, "float32", 16)
    graph.quant = kernel_layouts(graph, declared_quantization(graph, ckpt, "q4"), spec.int_dot_isa)
    mod = lowering.lower(run_passes(graph), spec.kernel_kind, spec.int_dot_isa)
    target = tvm.target.Target(spec.tvm_target)
    with target:
        built = cpu_pipeline(target)(mod)
    funcs = {gv.name_hint: f for gv, f in built.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    ours = {n for n, f in funcs.items() if f.attrs and "tirx.is_scheduled" in f.attrs
            and any(n.startswith(k) for k in ("qlinear", "attention", "kv_append", "moe", "grouped", "linear"))}
    serial = [n for n, f in funcs.items() if n not in ours and not n.startswith("shape_func")
              and "T.parallel" not in f.script()]
    assert serial == []
    ropes = [n for n in funcs if "rope" in n and n != "rope_table"]
    if name == "llama":  # no q/k norm between the slice and RoPE: RoPE reads its slice in place
        assert ropes and all("strided_slice" in n for n in ropes), ropes
    assert "rope_table" in funcs  # cos/sin once per step for every layer's q and k
    for kind in ("rms_norm", "silu_mul", "add"):
        assert any(kind in n for n in funcs), (kind, sorted(funcs))


@pytest.mark.parametrize("isa", [None, "avx2", "avx512_vnni"])
@pytest.mark.parametrize("table", [True, False], ids=["iq4_xs", "q2_k"])
def test_int_dot_only_formats_reach_the_integer_dot_kernel_only(isa, table, tiny_model_dir):
    """4-bit codes of a value table (GGUF's IQ types) and 4-bit groups of 16 (Q2_K, Q3_K) stay so only where
    the CPU has integer dot products: on linears and MoE expert stacks (the r16 layout, whose 16-row blocks
    are each one expert's here); embedding tables and every weight of a target without them (GPUs) get the
    same integers (a table's values) in 8 bits, which their kernels read."""
    from ferrum.schedules.quant_linear import QuantFormat
    from ferrum_compiler.quant import VALUE_TABLES

    ckpt = open_source(str(tiny_model_dir("qwen3-moe")), weights=False)
    graph = family(ckpt.config.arch).build(ckpt.config, "float32", 16)
    coded = QuantFormat(4, 32, True, VALUE_TABLES["IQ4_XS"]) if table else QuantFormat(4, 16, False)
    declared = {w: coded.to_dict() for w in graph.params if len(graph.params[w].shape) == 2}
    experts = {w for op in graph.ops if op.kind == "moe" for w in op.inputs[2:4]}
    assert all(graph.params[w].shape[0] // ckpt.config.num_experts % 16 == 0 for w in experts)
    declared.update({w: coded.to_dict() for w in experts})
    embedding = {op.inputs[0] for op in graph.ops if op.kind == "embedding"}
    laid = kernel_layouts(graph, declared, isa)
    for w, q in laid.items():
        if isa and w not in embedding:
            assert QuantFormat.from_dict(q) == coded and q["layout"] == "r16", w
        else:
            assert QuantFormat.from_dict(q) == coded.widened(), w
            assert q.get("layout") == ("r16" if isa and w in embedding else None), w
    assert experts and embedding and any(QuantFormat.from_dict(q) == coded for q in laid.values()) == bool(isa)

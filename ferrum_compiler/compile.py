"""``ferrum compile``: source → IR → passes → Relax/TIR → tvm.compile → artifact directory.

Phases print progress. The artifact is assembled in a temporary sibling directory and moved into place
only when complete, so a failed or interrupted compile never leaves (or clobbers) a half artifact.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from ferrum.models.registry import family
from ferrum.schedules.quant_linear import ACT_BITS, QuantFormat, r16_supports
from ferrum_runtime import env
from ferrum_runtime.errors import FerrumError
from ferrum_runtime.fatbin import embedded_cuda_code
from ferrum_runtime.artifact import ABI_VERSION, IR_JSON, IR_TEXT, LIBRARY, MANIFEST, package_version, sha256_file

from . import lowering
from .cpu_schedule import cpu_pipeline
from .config import DTYPES, CompileOptions
from .frontend import Checkpoint, open_source
from .gpu_build import supports_programmatic_launch, usage_summary
from .ir import IRError, Value, graph_to_json, op_histogram, print_graph
from .passes import PIPELINE, run_passes
from .quant import QUANT_MODES, rtn_spec
from .targets import TargetSpec, resolve
from .weights import write_weights


class CompileError(FerrumError):
    """A compile that cannot proceed; one line naming the fix."""


def compile_model(source: str, output: str | Path, options: CompileOptions = CompileOptions(),
                  progress: Callable[[str], None] = print, dump_ir: bool = False) -> Path:
    output = Path(output)
    if output.exists() and not (output / MANIFEST).is_file() and any(output.iterdir()):
        raise CompileError(f"{output} exists and is not a ferrum artifact; choose another -o or remove it")
    spec = resolve(options.target)
    dtype = options.dtype or spec.default_dtype
    if dtype not in DTYPES:
        raise CompileError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if options.quant not in QUANT_MODES:
        raise CompileError(f"unknown --quant {options.quant!r}; choose one of {', '.join(QUANT_MODES)}")
    kv_dtype = options.kv_dtype or ("bfloat16" if dtype == "bfloat16" else "float16")
    if kv_dtype not in DTYPES:
        raise CompileError(f"unknown --kv-dtype {kv_dtype!r}; choose one of {', '.join(DTYPES)}")
    if options.act_bits not in ACT_BITS:
        raise CompileError(f"--act-bits {options.act_bits} is not supported; use 8 or 16")
    if options.block_size not in (8, 16, 32, 64):
        raise CompileError(f"--block-size {options.block_size} is not supported; use 8, 16, 32 or 64")
    # the experiments' flags, read once: what the library is built with is what the manifest records
    pdl = env.pdl()
    if pdl and pdl not in env.PDL_MODES:
        raise CompileError(f"FERRUM_PDL={os.environ['FERRUM_PDL']} is not a mode; use 1, late, first or deep, "
                           "or unset it")
    if pdl and not supports_programmatic_launch(spec.tvm_target):
        raise CompileError(f"FERRUM_PDL needs --target cuda-sm90 (programmatic dependent launch is sm_90's), "
                           f"not {spec.name}; unset FERRUM_PDL")
    dp4a = env.gemv_dp4a()
    if dp4a and dp4a not in env.DP4A_MODES:
        raise CompileError(f"FERRUM_GEMV_DP4A={os.environ['FERRUM_GEMV_DP4A']} is not a mode; use 1 (lanes) or "
                           "kernel, or unset it")
    mma = env.mma_linear()
    if mma and mma not in env.MMA_LINEAR_MODES:
        raise CompileError(f"FERRUM_MMA_LINEAR={os.environ['FERRUM_MMA_LINEAR']} is not a mode; use 1 (wide) or "
                           "decode, or unset it")
    cuda = spec.tvm_target["kind"] == "cuda"
    if mma == "decode" and env.gemv_norms() and cuda:
        raise CompileError("FERRUM_MMA_LINEAR=decode and FERRUM_GEMV_NORMS=1 do not combine; unset one of them")
    experiments: dict = {flag: value for flag, value in (
        ("gemv_norms", env.gemv_norms() and spec.kernel_kind == "gpu"), ("pdl", pdl),
        ("gemv_dp4a", dp4a if cuda else ""), ("mma_linear", mma if cuda else ""),
        ("flash_attention", env.flash_attention() and cuda), ("mma_gemm", env.mma_gemm() and cuda),
        ("merged_attention", env.merged_attention() and cuda)) if value}
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def phase(i: int, msg: str) -> float:
        progress(f"[{i}/6] {msg}")
        return time.perf_counter()

    t = phase(1, f"reading {source}")
    ckpt = open_source(source, progress, weights=options.weights)
    cfg = ckpt.config
    progress(f"      {cfg.arch}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
             f"vocab {cfg.vocab_size}")
    timings["source"] = time.perf_counter() - t

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    debug = work / "debug" if dump_ir else None
    try:
        t = phase(2, "building the IR and running passes: " + ", ".join(n for n, _ in PIPELINE))
        graph = with_kv_dtype(family(cfg.arch).build(cfg, dtype, options.block_size), kv_dtype)
        graph.quant = kernel_layouts(graph, declared_quantization(graph, ckpt, options.quant), spec.int_dot_isa,
                                     options.act_bits)
        try:
            graph = run_passes(graph, dump_dir=debug)
        except IRError as e:
            raise CompileError(f"{e}; compile with --quant none to dequantize") from None
        if graph.packing:
            bits = sorted({graph.quant[w]["bits"] for w in graph.packing})
            progress(f"      {len(graph.packing)} weights stay {'/'.join(map(str, bits))}-bit "
                     f"({_quant_method(ckpt, options.quant)})")
        timings["ir"] = time.perf_counter() - t

        t = phase(3, f"lowering and compiling for {spec.name} ({json.dumps(spec.tvm_target)})")
        gpu_check, usage = _build_library(graph, spec, work / LIBRARY, debug, graph_max_blocks(spec, cfg, options),
                                          experiments)
        kernels = None if usage is None else usage_summary(usage)
        local = kernels["local_memory"] if kernels else {}
        if local:  # slower on the GPU (a memory trip per access), not wrong
            progress(f"      note: {len(local)} CUDA kernels use local memory (ptxas: register spills or arrays "
                     "indexed at run time): " + ", ".join(f"{k} {v} B" for k, v in list(local.items())[:4]))
        timings["tvm"] = time.perf_counter() - t

        if options.weights:
            t = phase(4, f"writing weights as {dtype}")
            index, digests = write_weights(graph, ckpt, dtype, work / "weights", options.shard_bytes,
                                           lambda m: progress("      " + m))
            timings["weights"] = time.perf_counter() - t
        else:
            phase(4, "weights: not written (--no-weights); add them with `ferrum pack-weights ARTIFACT MODEL`")
            index, digests = {}, {}

        t = phase(5, "writing tokenizer and IR")
        tok_files = ckpt.write_tokenizer(work)
        if "tokenizer.json" not in tok_files:
            progress("      note: no tokenizer.json in the source; the artifact can run token ids only")
        (work / IR_JSON).write_text(graph_to_json(graph))
        (work / IR_TEXT).write_text(print_graph(graph))
        timings["tokenizer"] = time.perf_counter() - t

        phase(6, "writing manifest")
        manifest = _manifest(ckpt, spec, dtype, options, graph, index, tok_files, timings,
                             time.perf_counter() - t_start, experiments)
        if gpu_check is not None:
            manifest["target"]["gpu_code_verified"] = gpu_check
        if kernels is not None:
            manifest["target"]["cuda_kernels"] = kernels
        if spec.tvm_target["kind"] == "cuda":
            manifest["target"]["cuda_code"] = embedded_cuda_code(work / LIBRARY)
            if not manifest["target"]["cuda_code"]["cubin"]:
                raise CompileError("the CUDA library holds no compiled cubin (TVM fell back to source); "
                                   "check that nvcc works: `nvcc --version`")
        digests = {f"weights/{name}": d for name, d in digests.items()}  # hashed while written
        manifest["files"] = {rel: digests.get(rel) or sha256_file(work / rel)
                             for rel in sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())}
        (work / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False, width=120))
        if output.exists():
            shutil.rmtree(output)
        os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    progress(f"done: {output} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t_start:.1f} s")
    return output


def declared_quantization(graph, ckpt: Checkpoint, mode: str) -> dict[str, dict]:
    """Which dense weights of ``graph`` become quantized, and how (before the passes run)."""
    if mode == "none":
        return {}
    declared = {}
    if ckpt.default_quant is not None and not ckpt.quant:  # a config-only GPTQ source: its linears as declared
        declared = {w: ckpt.default_quant(graph.params[w].shape[1]) for w in _quantizable_linears(graph)}
    for p in graph.params:  # quantized when every checkpoint tensor it is stacked from is, alike
        specs = [ckpt.quant.get(s) for s in graph.param_sources.get(p, (p,))]
        if specs[0] is not None and all(s == specs[0] for s in specs):
            declared[p] = specs[0]
    if mode in ("q4", "q8"):
        for w in _quantizable_linears(graph):
            if w not in declared:
                spec = rtn_spec(mode, graph.params[w].shape[1])
                if spec is not None:
                    declared[w] = spec.to_dict()
    return declared


def with_kv_dtype(graph, kv_dtype: str):
    """The KV cache inputs (``kv_cache.<layer>``) hold ``kv_dtype``; attention casts on write and read."""
    for name, v in graph.inputs.items():
        if name.startswith("kv_cache."):
            graph.inputs[name] = Value(name, v.shape, kv_dtype)
    return graph


def _quantizable_linears(graph) -> list[str]:
    """Linear and MoE expert weights that --quant q4/q8 quantizes and GPTQ checkpoints hold quantized; the
    embedding tables, the lm_head and MoE routers (they pick the experts) stay dense."""
    keep = {op.inputs[0] for op in graph.ops if op.kind == "embedding"}
    keep |= {op.inputs[1] for op in graph.ops if op.kind == "linear" and op.output in graph.outputs}
    routers = {op.inputs[1] for op in graph.ops if op.kind == "moe"}
    keep |= {op.inputs[1] for op in graph.ops if op.kind == "linear" and op.output in routers}
    weights = [op.inputs[1] for op in graph.ops if op.kind == "linear"]
    weights += [w for op in graph.ops if op.kind == "moe" for w in op.inputs[2:4]]
    return [w for w in weights if w in graph.params and w not in keep]


def kernel_layouts(graph, declared: dict[str, dict], int_dot_isa: str | None, act_bits: int = 16) -> dict[str, dict]:
    """With integer dot products on the CPU, INT4 linear weights take the "r16" row-interleaved layout of
    ``make_qlinear_r16_cpu`` (activations rounded to ``act_bits``), and so do INT8 weights and 4-bit codes of
    a value table where the kernel takes them (``r16_supports``), embedding tables included for 8 bits: the
    gather reads that layout too, so a tied lm_head (SmolLM2's Q8_0 table) gets the integer-dot kernel. INT4
    embedding tables keep the row layout their gather reads. MoE expert stacks take r16 where each expert's
    rows are whole 16-row blocks (the kernel's grouped form), else the row layout of the float expert kernel.
    Value tables and 4-bit groups of 16 (``int_dot_only``) are read on such CPUs only, by the r16 kernel and
    by the float expert kernel's loader: embedding tables, and every weight of other targets, in such a
    format take the same integers (a table's values) in 8 bits instead."""
    tables = {op.inputs[0] for op in graph.ops if op.kind == "embedding"}
    # MoE expert stacks -> rows per expert: r16 when every 16-row block is one expert's
    experts = {w: graph.params[w].shape[0] // op.attrs["num_experts"] for op in graph.ops if op.kind == "moe"
               for w in op.inputs[2:4]}

    def r16(w: str, fmt: QuantFormat) -> bool:
        if int_dot_isa is None or not r16_supports(fmt, act_bits, int_dot_isa):
            return False
        if w in experts:
            return experts[w] % 16 == 0
        return fmt.bits == 8 or w not in tables

    def layout(w: str, q: dict) -> dict:
        fmt = QuantFormat.from_dict(q)
        if fmt.int_dot_only and not r16(w, fmt) and not (int_dot_isa and w in experts):
            fmt = fmt.widened()
            q = {**{k: v for k, v in q.items() if k != "table"}, **fmt.to_dict()}
        return {**q, "layout": "r16", "act_bits": act_bits} if r16(w, fmt) else q

    return {w: layout(w, q) for w, q in declared.items()}


def graph_max_blocks(spec: TargetSpec, cfg, options: CompileOptions) -> int:
    """Block-table columns ``decode_graph`` is planned for (CUDA; 0 elsewhere): a sequence of the model's
    full length."""
    if spec.tvm_target["kind"] != "cuda":
        return 0
    return -(-int(cfg.max_position_embeddings) // options.block_size)


def tensor_core_dtypes(spec: TargetSpec) -> tuple[str, ...]:
    """Activation dtypes whose prefill attention, MoE experts and (where dlight has no tensor-core schedule)
    prefill linears run on our tensor-core kernels: CUDA's 16-bit floats (sm_80+ has wmma for both)."""
    return ("float16", "bfloat16") if spec.tvm_target["kind"] == "cuda" else ()


def _entry_points(graph, spec: TargetSpec, vocab_size: int, max_blocks: int = 0) -> dict:
    entry = {"args": lowering.argument_specs(graph),
             "returns": {"name": "logits", "shape": ["L", vocab_size], "dtype": "float32"}}
    out: dict[str, dict] = {lowering.ENTRY: entry}
    if spec.kernel_kind == "gpu":  # same arguments and result, for batches of at most max_tokens tokens
        out[lowering.DECODE_ENTRY] = {**entry, "max_tokens": lowering.DECODE_MAX_TOKENS}
        out[lowering.DECODE_ONE_ENTRY] = {**entry, "max_tokens": 1}  # ... and of one token
    if spec.kernel_kind == "gpu" and lowering.uses_tc_attention(graph, tensor_core_dtypes(spec)):
        out[lowering.DECODE_WIDE_ENTRY] = {**entry, "decode_only": True}  # steps of one token per sequence
        if max_blocks:  # ... and as CUDA graphs, for up to max_tokens of them
            out[lowering.DECODE_WIDE_GRAPH_ENTRY] = {**entry, "decode_only": True,
                                                     "max_tokens": lowering.WIDE_GRAPH_MAX_TOKENS,
                                                     "max_blocks": max_blocks}
    if max_blocks:  # the same again as CUDA graphs, for block tables of at most max_blocks columns
        out[lowering.DECODE_GRAPH_ENTRY] = {**entry, "max_tokens": lowering.DECODE_MAX_TOKENS,
                                            "max_blocks": max_blocks}
        out[lowering.DECODE_ONE_GRAPH_ENTRY] = {**entry, "max_tokens": 1, "max_blocks": max_blocks}
    logits = {"name": "logits", "shape": ["L", vocab_size], "dtype": "float32"}
    ids = {"name": "token_ids", "shape": ["L"], "dtype": "int32"}
    out[lowering.ARGMAX_ENTRY] = {"args": [logits], "returns": ids}
    if spec.kernel_kind == "gpu":
        out[lowering.SAMPLE_ENTRY] = {"args": [logits, {"name": "params", "shape": ["L", 4], "dtype": "float32"},
                                               {"name": "uniform", "shape": ["L"], "dtype": "float32"}],
                                      "returns": ids}
    return out


def _quant_method(ckpt: Checkpoint, mode: str) -> str:
    if mode == "none":
        return "none"
    if mode in ("q4", "q8"):
        return f"rtn-{mode}" + (f"+{ckpt.quant_method}" if ckpt.quant_method != "none" else "")
    return ckpt.quant_method


def _build_library(graph, spec: TargetSpec, path: Path, debug: Path | None, max_blocks: int = 0,
                   experiments: dict | None = None) -> tuple[dict | None, list[dict] | None]:
    """Compile and export the library; returns, for GPU targets, the GPU code verifier's report and, for
    CUDA, ptxas's usage of every kernel (``gpu_build.ptxas_usage``; else None for either).
    ``experiments``: ``{"gemv_norms": True}``, ``{"pdl": mode}``, ``{"gemv_dp4a": mode}``, ``{"mma_linear":
    mode}``, ``{"flash_attention": True}``, ``{"mma_gemm": True}``, ``{"merged_attention": True}``
    (FERRUM_GEMV_NORMS, FERRUM_PDL's ``env.PDL_MODES``, FERRUM_GEMV_DP4A's ``env.DP4A_MODES``,
    FERRUM_MMA_LINEAR's ``env.MMA_LINEAR_MODES``, FERRUM_FLASH_ATTENTION, FERRUM_MMA_GEMM,
    FERRUM_MERGED_ATTENTION)."""
    import tvm

    from .gpu_build import (GpuCodeVerifier, kernel_usage, prepare_cuda_build, preload_tensor_intrinsics,
                            register_programmatic_launch_pipeline)

    flags = experiments or {}
    cuda = spec.tvm_target["kind"] == "cuda"
    metal = spec.tvm_target["kind"] == "metal"
    pdl = str(flags.get("pdl") or "") if cuda else ""
    # the schedules' early loads and where they let the next kernel launch; "first": none, the pass's
    # wait-then-launch in every kernel
    early = "" if pdl == "first" else pdl
    mod = lowering.lower(graph, spec.kernel_kind, spec.int_dot_isa, max_lanes=4 if metal else 16,
                         graph_max_blocks=max_blocks, tensor_core_dtypes=tensor_core_dtypes(spec),
                         shared_bytes=24 * 1024 if metal else 40 * 1024, gemv_norms=bool(flags.get("gemv_norms")),
                         pdl=early, gemv_dp4a=str(flags.get("gemv_dp4a") or "") if cuda else "",
                         mma_linear=str(flags.get("mma_linear") or "") if cuda else "",
                         flash_attention=bool(flags.get("flash_attention")) and cuda,
                         mma_gemm=bool(flags.get("mma_gemm")) and cuda,
                         merged_attention=bool(flags.get("merged_attention")) and cuda)
    if debug is not None:
        (debug / "relax.py").write_text(mod.script())
    target = tvm.target.Target(spec.tvm_target)
    if spec.kernel_kind == "gpu":
        preload_tensor_intrinsics()
    if cuda:
        prepare_cuda_build()
    verifier = GpuCodeVerifier(spec.tvm_target["kind"], spec.tvm_target.get("arch")) if spec.kernel_kind == "gpu" else None
    instruments = [verifier.instrument] if verifier else []
    ctx = tvm.transform.PassContext.current()
    # RewriteCUDAGraph (in the CUDA pipeline) acts on decode_graph only: the other functions declare their
    # step inputs as inputs, and without shape bounds their memory is not statically planned
    config = {**dict(ctx.config), **({"relax.backend.use_cuda_graph": True} if max_blocks else {})}
    # the target is current because TVM's nvcc callback reads the arch from it
    with target, tvm.transform.PassContext(opt_level=ctx.opt_level, config=config, instruments=instruments), \
            kernel_usage() as usage:
        ex = tvm.compile(mod, target=target,
                         relax_pipeline=cpu_pipeline(target) if spec.kernel_kind == "cpu" else "default",
                         tir_pipeline=register_programmatic_launch_pipeline() if pdl else "default")
    ex.export_library(str(path))
    if verifier is None:
        return None, None
    report = verifier.report()
    if report["failed"] or not report["kernels"]:
        raise CompileError(f"{len(report['failed'])} of {report['kernels']} GPU kernels exceed {spec.name}'s limits "
                           f"({', '.join(report['failed'][:5])}): a ferrum bug, please report it")
    return report, usage if cuda else None


def _manifest(ckpt: Checkpoint, spec: TargetSpec, dtype: str, options: CompileOptions, graph, index: dict,
              tok_files: list[str], timings: dict, total: float, experiments: dict | None = None) -> dict:
    cfg = ckpt.config
    kv_dtype = graph.inputs["kv_cache.0"].dtype
    from ferrum_compiler import __version__

    return {
        "abi_version": ABI_VERSION,
        "versions": {"ferrum": __version__, "tvm": package_version("apache-tvm"),
                     "tvm_ffi": package_version("apache-tvm-ffi")},
        "source": {"name": ckpt.name, "kind": ckpt.kind, **ckpt.details},
        "target": {"name": spec.name, "tvm_target": spec.tvm_target, "kernel_kind": spec.kernel_kind,
                   "device": spec.device, "cpu_features": list(spec.cpu_features)},
        "model": {"family": cfg.arch, "config": cfg.to_dict(), "max_model_len": cfg.max_position_embeddings},
        "dtype": dtype,
        "quantization": {"method": _quant_method(ckpt, options.quant) if graph.packing else "none",
                         "mode": options.quant,
                         "note": "quantized source tensors dequantized at compile time"
                         if ckpt.quant and not graph.packing else "",
                         "weights": {w: graph.quant[w] for w in graph.packing},
                         "dense_weights": sorted(p for p in graph.params
                                                 if p not in {q for r in graph.packing.values() for q in r.values()}
                                                 and len(graph.params[p].shape) == 2)},
        "kv_cache": {"layout": "[num_blocks, 2, kv_heads, block_size, head_dim] per layer",
                     "num_layers": cfg.num_layers, "block_size": options.block_size, "kv_heads": cfg.num_kv_heads,
                     "head_dim": cfg.head_dim, "dtype": kv_dtype},
        "entry_points": _entry_points(graph, spec, cfg.vocab_size, graph_max_blocks(spec, cfg, options)),
        "weights": {"dtype": dtype, "index": index, **({} if options.weights else {"pending": True})},
        "tokenizer": {"files": tok_files},
        "ir": {"ops": op_histogram(graph), "passes": [n for n, _ in PIPELINE]},
        "compile_options": {"target": options.target, "dtype": dtype, "block_size": options.block_size,
                            "quant": options.quant, "kv_dtype": kv_dtype,
                            "act_bits": options.act_bits,
                            **(experiments or {})},
        "build": {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "host": platform.node(), "seconds": round(total, 2),
                  "phase_seconds": {k: round(v, 2) for k, v in timings.items()}},
    }

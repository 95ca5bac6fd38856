"""Lowering: IR Graph → Relax IRModule with one entry point, ``forward``.

``forward(token_ids, positions, query_start, block_tables, slot_mapping, logits_index,
kv_cache.0 … kv_cache.{layers-1}, *params) -> logits[L, vocab]`` (float32). The argument order is the
graph's input order then its parameter order; the manifest records both. KV caches are written in
place (``call_tir_inplace``), so the runtime keeps ownership of them across calls.

Ops with a hand-written schedule (paged attention; linear on CPU) become ``call_tir`` to our PrimFuncs;
the rest become Relax ops that TVM legalizes (and dlight schedules on GPUs).
"""

from __future__ import annotations

from ferrum.schedules import linear as linear_sched
from ferrum.schedules import mma_linear as mma_sched
from ferrum.schedules import moe as moe_sched
from ferrum.schedules import norm as norm_sched
from ferrum.schedules import paged_attention as attn_sched
from ferrum.schedules import quant_linear as quant_sched
from ferrum.schedules import rope as rope_sched
from ferrum.schedules import sampling as sampling_sched
from ferrum.schedules.fast_math import exp_f32

from .ir import Graph, static
from .ir.rope import rope_inv_freq
from .tvmscript import quick_frames

ENTRY = "forward"
DECODE_ENTRY = "decode"  # GPU only: the same model for batches of at most DECODE_MAX_TOKENS tokens
# 16: on an H200 Qwen3-4B decoded 16 sequences through decode's GEMVs (4 passes of 4 tokens, no CUDA graph)
# at 1,199 tok/s float16 and 1,121 INT4 against 1,075 and 855 through decode_wide's dlight matmuls (graphed);
# 32 sequences were 38% and 27% slower through the GEMVs (docs/bench/2026-11-26d-gpu-h200.md)
DECODE_MAX_TOKENS = 16
ARGMAX_ENTRY = "argmax"  # logits [L, vocab] float32 -> int32 [L]: greedy tokens computed where the logits are
SAMPLE_ENTRY = "sample"  # GPU only: (logits, params [L, 4], uniform [L]) -> int32 [L], sampled on the device
# CUDA only: ``decode`` again, run as CUDA graphs (captured once per shape, then replayed: one launch per
# step instead of one per kernel). Every argument is declared fixed, so the runtime must pass the same
# buffers for the same shapes (it stages the step's inputs in device tensors allocated once).
DECODE_GRAPH_ENTRY = "decode_graph"
# CUDA, when ``forward``'s attention is the tensor-core kernel: ``forward`` with the split-KV attention, for
# steps of only decode tokens (one per sequence) too many for ``decode``: the tensor-core kernel would give
# each token a 16-token tile of its own and read its keys twice
DECODE_WIDE_ENTRY = "decode_wide"
DLIGHT_TC_DTYPES = ("float16",)  # activation dtypes dlight's matmul schedule runs on tensor cores
# CUDA, beside decode_wide: ``decode_wide`` again as CUDA graphs, for steps of up to WIDE_GRAPH_MAX_TOKENS
# decode tokens (``decode_graph``'s contract: fixed argument buffers)
DECODE_WIDE_GRAPH_ENTRY = "decode_wide_graph"
WIDE_GRAPH_MAX_TOKENS = 64
# GPU: ``decode`` (and, with graphs, ``decode_graph``) again for steps of one token, their GEMVs in passes
# of one token (``make_gemv_gpu(tokens=1)``): a quarter of the accumulators and activations in registers, so
# more blocks per SM. On an H200 Qwen3-4B's GEMVs at one token took 54 us per layer (float16) and 34 (INT4)
# against 59 and 46 in passes of four (bench/gpu_kernels.py, docs/bench/2026-11-26d-gpu-h200.md)
DECODE_ONE_ENTRY = "decode_one"
DECODE_ONE_GRAPH_ENTRY = "decode_one_graph"


def lower(graph: Graph, kernel_kind: str, int_dot_isa: str | None = None, max_lanes: int = 16,
          graph_max_blocks: int = 0, tensor_core_dtypes: tuple[str, ...] = (), shared_bytes: int = 40 * 1024,
          skinny_gemm: bool = False, gemv_norms: bool = False, pdl: str = "", gemv_dp4a: str = "",
          mma_linear: str = "", flash_attention: bool = False, mma_gemm: bool = False,
          merged_attention: bool = False):
    """Build the Relax module for ``graph``; ``kernel_kind`` picks the CPU or GPU kernel variants,
    ``int_dot_isa`` the integer dot-product instructions of the CPU INT4 kernel ("r16" weights),
    ``max_lanes`` the widest vector a GPU kernel may load (Metal: 4) and ``shared_bytes`` the shared
    memory a split-attention block may stage keys in (Metal has 32 KiB in all). ``graph_max_blocks`` > 0
    (CUDA) adds the ``decode_graph`` entry point for block tables of up to that many columns.
    ``tensor_core_dtypes`` (CUDA: float16 and bfloat16; the test emulator uses float32): activation dtypes
    whose ``forward`` attention (``make_prefill_attention_tc``; then ``decode_wide`` and, with graphs,
    ``decode_wide_graph`` are added), MoE expert GEMMs and, where dlight has no tensor-core schedule,
    prefill linears (``make_tiled_gemm_gpu``) run on our tensor-core kernels. ``skinny_gemm`` puts
    ``decode_wide``'s linears on ``make_skinny_gemm_gpu`` instead of dlight's matmuls: off, because on an
    H200 (Qwen3-4B float16) it read weights at 0.1-1.0 TB/s and 16/32 sequences decoded at 849/1427 tok/s
    against 1045/2005 on dlight's (docs/bench/2026-11-26c-gpu-h200.md). ``pdl`` (CUDA sm_90, with
    ``gpu_build.register_programmatic_launch_pipeline``; FERRUM_PDL's ``early`` or ``late``, "" for none):
    the GEMVs wait for the kernel before them after their first weight loads (``make_gemv_gpu(pdl=...)``),
    the split attention after reading the step's inputs (``make_attention_gpu(pdl=...)``); ``late``: each
    lets the next kernel launch only after that wait. ``gemv_dp4a`` (CUDA; FERRUM_GEMV_DP4A's mode, "" for
    none): the decode entries' symmetric INT4 GEMVs without bias or a folded norm or residual on integer
    dot products (``make_gemv_dp4a_gpu``) over activations rounded to int8 per 32 columns: by its lanes
    (``lanes``) or by a ``make_quantize_dp4a_gpu`` kernel before it (``kernel``). ``mma_linear`` (CUDA;
    FERRUM_MMA_LINEAR's mode, "" for none): the dense float16/bfloat16 and INT4 (float16 activations)
    linears of ``decode_wide`` (``wide``), or of ``decode_wide`` and ``decode`` (``decode``), on
    ``mma_linear.make_mma_linear_gpu`` (tensor-core mma's streaming each weight once per pass of 16 or 32
    tokens) instead of dlight's matmuls or the GEMVs' passes of 4. ``flash_attention`` (CUDA;
    FERRUM_FLASH_ATTENTION): ``forward``'s attention on ``make_prefill_attention_mma`` (one pass, online
    softmax in registers) where the head fits it, instead of ``make_prefill_attention_tc``. ``mma_gemm``
    (CUDA; FERRUM_MMA_GEMM): ``forward``'s dense linears of a tensor-core dtype and INT4 ones (float16
    activations), but the lm_head, on ``mma_linear.make_mma_gemm_gpu`` where the shape fits it
    (``_gemm_fits``), instead of dlight's matmuls (dequantizing ones for INT4) or, for bfloat16,
    ``make_tiled_gemm_gpu``. ``merged_attention`` (CUDA): the decode entries' split attention merges its
    splits itself (``make_attention_gpu(merged=True)``: the last split block of a token and KV head, counted
    on a zeroed ``[T, KV heads]`` int32 tensor made once per step and passed from layer to layer in place),
    so no merge kernel runs."""
    import tvm
    from tvm import relax, tirx
    from tvm import te

    sym = {s: tirx.Var(s, "int64") for s in ("T", "B", "M", "NB", "L")}

    def shape_of(shape):
        out = []
        for d in shape:
            if isinstance(d, int):
                out.append(d)
            elif d == "B+1":
                out.append(sym["B"] + 1)
            else:
                out.append(sym[d])
        return out

    bb = relax.BlockBuilder()
    kernels: dict[tuple, object] = {}

    def kernel(key: tuple, make):
        if key not in kernels:  # hand-scheduled: the CPU pipeline's generic schedules leave it alone
            with quick_frames():  # the TVMScript parse, without its source lookups
                func = make()
            kernels[key] = bb.add_func(func.with_attr("tirx.is_scheduled", True),
                                       _identifier("_".join(str(k) for k in key)))
        return kernels[key]

    producer = {op.output: op for op in graph.ops}
    consumers: dict[str, list] = {}
    for op in graph.ops:
        for i in op.inputs:
            consumers.setdefault(i, []).append(op)
    # GPU targets get a second entry point for batches of few tokens (decode): its linears are our GEMV
    # kernels, which stream each weight once; larger batches take dlight's tiled (tensor-core) matmuls
    # (entry, tokens per GEMV pass: 0 for no GEMVs)
    gpu, graphs = kernel_kind == "gpu", kernel_kind == "gpu" and graph_max_blocks > 0
    entries = [(ENTRY, 0)] + ([(DECODE_ENTRY, quant_sched.GEMV_TOKENS), (DECODE_ONE_ENTRY, 1)] if gpu else [])
    entries += [(DECODE_GRAPH_ENTRY, quant_sched.GEMV_TOKENS), (DECODE_ONE_GRAPH_ENTRY, 1)] if graphs else []
    wide = kernel_kind == "gpu" and uses_tc_attention(graph, tensor_core_dtypes)
    entries += [(DECODE_WIDE_ENTRY, 0)] if wide else []
    entries += [(DECODE_WIDE_GRAPH_ENTRY, 0)] if wide and graph_max_blocks > 0 else []
    graph_tokens = {DECODE_GRAPH_ENTRY: DECODE_MAX_TOKENS, DECODE_WIDE_GRAPH_ENTRY: WIDE_GRAPH_MAX_TOKENS,
                    DECODE_ONE_GRAPH_ENTRY: 1}
    # FERRUM_MMA_LINEAR: the entries whose (q)linears run on make_mma_linear_gpu where they fit (not beside
    # deferred norms in decode: a norm the GEMV before began would have to be finished by an mma linear)
    assert not (mma_linear == "decode" and gemv_norms), "FERRUM_MMA_LINEAR=decode with FERRUM_GEMV_NORMS"
    mma_entries = {"wide": (DECODE_WIDE_ENTRY, DECODE_WIDE_GRAPH_ENTRY),
                   "decode": (DECODE_WIDE_ENTRY, DECODE_WIDE_GRAPH_ENTRY, DECODE_ENTRY, DECODE_GRAPH_ENTRY)
                   }.get(mma_linear, ()) if gpu else ()
    for entry, gemv in entries:
        tc_attention = entry == ENTRY  # the tensor-core attention: forward only
        # decode_wide's linears: the tensor-core GEMM for few tokens (weights read once per 64)
        wide_entry = entry in (DECODE_WIDE_ENTRY, DECODE_WIDE_GRAPH_ENTRY)
        sym.update({s: tirx.Var(s, "int64") for s in sym})  # each function binds its own shape variables
        fn_args = []
        for v in list(graph.inputs.values()) + list(graph.params.values()):
            fn_args.append(relax.Var(_identifier(v.name), relax.TensorType(shape_of(v.shape), v.dtype)))
        env = {v: a for v, a in zip(list(graph.inputs) + list(graph.params), fn_args)}
        slices: dict[str, tuple] = {}  # output of a last-axis slice of a 2-D value -> (its input, begin, end)
        rope_tables: dict[tuple, object] = {}  # (positions, head_dim, theta, scaling) -> [T, 2, head_dim / 2] cos|sin
        adds: dict[str, tuple] = {}  # output of a 2-D residual add -> its two operands (GPU: fused into the norm)
        # gemv_norms: a norm's output -> (xn, partial sums of squares, eps, their count) that the GEMV before
        # it wrote, for the GEMVs that read it to finish the norm themselves; a residual add's output -> the
        # GEMV that added it in its epilogue
        norms: dict[str, tuple] = {}
        fused_adds: dict[str, object] = {}
        # values a gate|up GEMV with gate_out made unnecessary (its slices and SiLU·mul) -> its output
        gate_outs: dict[str, object] = {}
        counters: list = []  # merged_attention: the step's split counters, as the last attention left them

        attrs = _graph_attrs(graph_tokens[entry], graph_max_blocks) if entry in graph_tokens else None
        with bb.function(entry, fn_args, attrs=attrs):
            with bb.dataflow():
                for op in graph.ops:
                    if op.output in gate_outs:
                        env[op.output] = gate_outs[op.output]
                        continue
                    out = graph.values[op.output]
                    a = [env[i] for i in op.inputs]
                    k = op.kind
                    if k in ("embedding", "take_rows"):
                        r = relax.op.take(a[0], a[1], axis=0, mode="clip")  # ids are validated by the runtime
                    elif k == "rms_norm" and kernel_kind == "gpu" and op.inputs[0] in adds:
                        # the residual add and this norm in one kernel; later readers of the sum take the
                        # fused kernel's copy, so the add itself becomes dead code
                        x, res = adds[op.inputs[0]]
                        d, dt, wdt = out.shape[-1], out.dtype, graph.value(op.inputs[1]).dtype
                        fused = kernel(("add_rms_norm", d, dt, wdt, op.attrs["eps"]),
                                       lambda: norm_sched.make_add_rms_norm_gpu(d, dt, wdt, op.attrs["eps"]))
                        both = bb.emit(relax.call_tir(fused, [x, res, a[1]], [x.ty, x.ty]))
                        env[op.inputs[0]] = bb.emit(relax.TupleGetItem(both, 0))
                        r = relax.TupleGetItem(both, 1)
                    elif k == "rms_norm":
                        # deferred into the GEMVs around it (gemv_norms), this one is never read, and the
                        # module's dead-code elimination drops it
                        r = relax.op.nn.rms_norm(a[0], a[1], axes=[-1], epsilon=op.attrs["eps"])
                    elif k in ("linear", "qlinear"):
                        skinny = skinny_gemm and wide_entry and _skinny_fits(graph, op, tensor_core_dtypes)
                        mma_op = entry in mma_entries and _mma_fits(graph, op)
                        gated = _gated_source(graph, producer, op.inputs[0]) if (gemv or skinny) and not mma_op \
                            and op.inputs[0] not in gate_outs else None
                        if gated is not None:  # the GEMV applies SiLU·mul to the gate|up projection it reads
                            a = [env[gated]] + a[1:]
                        norm = norms.get(op.inputs[0]) if gated is None else None
                        if norm is not None:  # ... or finishes the norm the GEMV before it began
                            a = [norm[0]] + a[1:]
                        res_add = _residual_add(graph, consumers, op, env) if gemv and gemv_norms else None
                        nxt = _deferred_norm(graph, consumers, res_add[0]) if res_add else None
                        # a gate|up GEMV writes SiLU·mul's output itself (make_gemv_gpu's gate_out)
                        gate = _silu_of(graph, producer, consumers, op) if gemv and not (
                            mma_op or skinny or res_add or _dp4a_takes(op, gemv, gemv_dp4a, norm)) else None
                        if gate is not None:
                            out = graph.values[gate.output]
                        x_dtype = graph.value(op.inputs[0]).dtype
                        # our tiled tensor-core GEMM where dlight's matmul schedule has none (bfloat16)
                        mma = x_dtype if x_dtype in tensor_core_dtypes and x_dtype not in DLIGHT_TC_DTYPES else ""
                        if entry == ENTRY and mma_gemm and _gemm_fits(graph, op, tensor_core_dtypes):
                            r = _mma_gemm(relax, kernel, graph, op, a, out)
                        elif mma_op:
                            # passes of 16 tokens in decode's steps (at most 16) and INT4, of 32 dense in wider
                            r = _mma_linear(relax, kernel, graph, op, a, out, 2 if gemv or k == "qlinear" else 4)
                        elif skinny:
                            r = _skinny(relax, kernel, graph, op, a, out, gated is not None)
                        else:
                            fuse = {"norm": norm and norm[1:], "residual": env[res_add[1]] if res_add else None,
                                    "norm_next": (env[nxt.inputs[1]], graph.value(nxt.inputs[1]).dtype)
                                    if nxt else None}
                            if k == "linear":
                                r = _linear(bb, relax, kernel, kernel_kind, graph, op, a, out, gemv, max_lanes,
                                            gated is not None, mma, **fuse, pdl=pdl, gate_out=gate is not None)
                            else:
                                r = _qlinear(bb, relax, kernel, kernel_kind, int_dot_isa, graph, op, a, out, gemv,
                                             max_lanes, gated is not None, mma, **fuse, pdl=pdl, dp4a=gemv_dp4a,
                                             gate_out=gate is not None)
                            if gate is not None:  # the slices and SiLU·mul are this GEMV's output
                                r = bb.emit(r)
                                gate_outs.update({v: r for v in (*gate.inputs, gate.output)})
                            if nxt:  # (h, h * the next norm's weight, partial sums of h^2)
                                both = bb.emit(r)
                                r = relax.TupleGetItem(both, 0)
                                parts = int(both.ty.fields[2].shape[1])
                                norms[nxt.output] = (bb.emit(relax.TupleGetItem(both, 1)),
                                                     bb.emit(relax.TupleGetItem(both, 2)), nxt.attrs["eps"], parts)
                            if res_add:  # the add itself is this GEMV's output
                                r = bb.emit(r)
                                fused_adds[res_add[0].output] = r
                    elif k == "qembedding":
                        fmt = _quant_format(op.attrs)
                        make = quant_sched.qembedding_r16_te if op.attrs.get("layout") == "r16" else quant_sched.qembedding_te
                        r = bb.emit_te(make(fmt, out.dtype), *a, primfunc_name_hint="qembedding")
                    elif k == "moe":
                        r = _moe(bb, relax, kernel, kernel_kind, int_dot_isa, graph, op, a, out, gemv, max_lanes,
                                 mma_dtype=out.dtype if out.dtype in tensor_core_dtypes else "")
                    elif k == "take_cols":
                        r = relax.op.take(a[0], a[1], axis=1, mode="clip")
                    elif k == "slice":
                        axis = len(out.shape) - 1
                        r = relax.op.strided_slice(a[0], axes=[axis], begin=[op.attrs["begin"]], end=[op.attrs["end"]])
                        if axis == 1:
                            slices[op.output] = (a[0], op.attrs["begin"], op.attrs["end"])
                    elif k == "reshape":
                        cut = _head_source(graph, producer, op.output) if kernel_kind == "gpu" else None
                        if cut is not None and cut[3] is None:  # heads cut out of a projection: one copy
                            r = _head_kernel(relax, kernel, graph, env, cut, out, None)
                        else:
                            r = _reshape(bb, relax, shape_of, slices.get(op.inputs[0]), a[0], op.attrs["shape"])
                    elif k == "rope":
                        key = (op.inputs[1], static(out.shape[-1]), op.attrs["theta"], repr(op.attrs["scaling"]))
                        if key not in rope_tables:  # once per step, shared by every layer's q and k
                            inv = rope_inv_freq(key[1], op.attrs["theta"], op.attrs["scaling"]).astype("float32")
                            rope_tables[key] = bb.emit_te(_rope_table_te(te, tirx), a[1], relax.const(inv),
                                                          primfunc_name_hint="rope_table")
                        cut = _head_source(graph, producer, op.inputs[0]) if kernel_kind == "gpu" else None
                        if cut is not None:  # slice, reshape, [q/k norm,] RoPE: one kernel from the projection
                            r = _head_kernel(relax, kernel, graph, env, cut, out, rope_tables[key])
                        else:
                            r = bb.emit_te(_rope_te(te, tirx), a[0], rope_tables[key], primfunc_name_hint="rope")
                    elif k == "paged_attention":
                        qkv = _qkv_source(graph, producer, op) if kernel_kind == "gpu" else None
                        if qkv is not None:  # q/k/v heads, norms, RoPE and the KV append in one kernel
                            rope_op = qkv[3]
                            key = (rope_op.inputs[1], static(out.shape[-1]), rope_op.attrs["theta"],
                                   repr(rope_op.attrs["scaling"]))
                            a = _qkv_append(bb, relax, kernel, graph, env, op, a, qkv, rope_tables[key])
                        r = _paged_attention(bb, relax, kernel, kernel_kind, graph, op, a, out,
                                             appended=qkv is not None,
                                             tensor_cores=tc_attention and out.dtype in tensor_core_dtypes,
                                             decode=entry != ENTRY, max_lanes=max_lanes, shared_bytes=shared_bytes,
                                             pdl=pdl, flash=flash_attention,
                                             counters=counters if merged_attention and entry != ENTRY else None)
                    elif k == "silu_mul":
                        r = bb.emit_te(_silu_mul_te(te, tirx, kernel_kind), a[0], a[1], primfunc_name_hint="silu_mul")
                    elif k == "add" and op.output in fused_adds:
                        r = fused_adds[op.output]
                    elif k == "add":
                        r = relax.op.add(a[0], a[1])
                        if len(out.shape) == 2 and graph.value(op.inputs[0]).shape == graph.value(op.inputs[1]).shape:
                            adds[op.output] = (a[0], a[1])
                    else:
                        raise NotImplementedError(f"no lowering for op {k!r}")
                    env[op.output] = bb.emit(r) if not isinstance(r, relax.Var) else r
                result = bb.emit_output(env[graph.outputs[0]])
            bb.emit_func_output(result)

    # greedy sampling on the device: a step of plain greedy rows copies back L ids instead of [L, vocab] logits
    vocab = static(graph.values[graph.outputs[0]].shape[1])
    pick = kernel(("argmax", vocab, kernel_kind), lambda: sampling_sched.make_argmax(vocab, kernel_kind))
    logits = relax.Var("logits", relax.TensorType([tirx.Var("L", "int64"), vocab], "float32"))
    with bb.function(ARGMAX_ENTRY, [logits]):
        bb.emit_func_output(bb.emit(relax.call_tir(pick, [logits], relax.TensorType([logits.ty.shape[0]], "int32"))))
    picks = [ARGMAX_ENTRY]
    if kernel_kind == "gpu":  # temperature, top-k, top-p and min_p sampling too (schedules/sampling.py)
        cands = sampling_sched.sample_candidates(shared_bytes)
        draw = kernel(("sample", vocab, cands), lambda: sampling_sched.make_sample_gpu(vocab, cands))
        rows = tirx.Var("L", "int64")
        args = [relax.Var("logits", relax.TensorType([rows, vocab], "float32")),
                relax.Var("params", relax.TensorType([rows, 4], "float32")),
                relax.Var("uniform", relax.TensorType([rows], "float32"))]
        with bb.function(SAMPLE_ENTRY, args):
            bb.emit_func_output(bb.emit(relax.call_tir(draw, args, relax.TensorType([rows], "int32"))))
        picks.append(SAMPLE_ENTRY)
    mod = tvm.relax.transform.DeadCodeElimination([e for e, _ in entries] + picks)(bb.get())
    if kernel_kind == "gpu":  # matmul(x, permute_dims(w)) -> one kernel reading w[N, K] in place
        mod = tvm.relax.transform.FuseTransposeMatmul()(mod)
    return mod


def _deferred_norm(graph: Graph, consumers: dict, add):
    """The RMSNorm of residual add ``add`` (folded into a GEMV's epilogue) that the GEMVs around it can
    take over (``gemv_norms``): the add's only norm, 2-D, over the last axis, read only by linears
    (not CPU row-interleaved weights) as their input; else None."""
    norms = [c for c in consumers.get(add.output, []) if c.kind == "rms_norm"]
    if len(norms) != 1 or norms[0].inputs[0] != add.output:
        return None
    op = norms[0]
    readers = consumers.get(op.output, [])
    ok = (len(graph.value(op.output).shape) == 2 and bool(readers)
          and all(c.kind in ("linear", "qlinear") and c.inputs[0] == op.output
                  and c.attrs.get("layout", "rows") != "r16" for c in readers))
    return op if ok else None


def _residual_add(graph: Graph, consumers: dict, op, env: dict):
    """``(add op, name of its other operand)`` when a (q)linear's only reader is a 2-D residual add of
    the same shape and dtype whose other operand is already computed: the GEMV adds it in its epilogue."""
    readers = consumers.get(op.output, [])
    if len(readers) != 1 or readers[0].kind != "add":
        return None
    add = readers[0]
    other = add.inputs[1] if add.inputs[0] == op.output else add.inputs[0]
    mine, theirs = graph.value(op.output), graph.value(other)
    if other == op.output or other not in env or mine.shape != theirs.shape or len(mine.shape) != 2 \
            or mine.dtype != theirs.dtype or graph.value(add.output).dtype != mine.dtype:
        return None
    return add, other


def _gemv_fusion(norm: tuple | None, residual, pdl: str = "", norm_next: tuple | None = None) -> dict:
    """``make_gemv_gpu``'s keyword arguments for a deferred norm it finishes (``(partial sums, eps, their
    count)``) or begins (``norm_next``: ``(weight, weight dtype)``), an epilogue residual and a wait after
    the first weight loads (``pdl``: its mode)."""
    out: dict = {}
    if norm:
        out.update(norm_eps=float(norm[1]), norm_parts=int(norm[2]))
    if residual is not None:
        out["residual"] = True
    if norm_next:
        out["norm_next"] = str(norm_next[1])
    if pdl:
        out["pdl"] = pdl
    return out


def _named(kwargs: dict) -> list[str]:
    """Keyword arguments as parts of a kernel's key and name."""
    return [f"{k}-{v}" for k, v in kwargs.items()]


def _gemv_args(a: list, norm: tuple | None, residual, norm_next: tuple | None) -> list:
    """A GEMV's call arguments: the input, a deferred norm's partial sums, the op's weights (and bias), the
    residual, the next norm's weight."""
    return ([a[0]] + ([norm[0]] if norm else []) + list(a[1:]) + ([residual] if residual is not None else [])
            + ([norm_next[0]] if norm_next else []))


def _gemv_outputs(relax, rows, n: int, dtype: str, norm_next: tuple | None, parts: int):
    """A GEMV's output type: ``[rows, n]``, and with ``norm_next`` the next norm's input less its 1 / rms
    and the ``parts`` partial sums of squares per token (float32)."""
    out = relax.TensorType([rows, n], dtype)
    if not norm_next:
        return out
    return [out, relax.TensorType([rows, n], "float32"), relax.TensorType([rows, parts], "float32")]


def _graph_attrs(max_tokens: int, max_blocks: int) -> dict:
    """A CUDA-graph entry's function attributes for TVM's ``RewriteCUDAGraph``: no argument is a per-call
    input (``num_input`` 0: weights, KV caches and the step's input buffers are all the same objects call
    after call), so every kernel whose operands are arguments or statically planned memory is captured,
    keyed by the symbolic shapes; and upper bounds on those shapes, so memory planning makes every
    intermediate a fixed allocation."""
    bounds = {"T": max_tokens, "B": max_tokens, "L": max_tokens, "M": max_blocks}
    return {"num_input": 0,
            "tir_var_upper_bound": bounds, "tir_non_negative_var": ["T", "B", "L", "M", "NB"]}


def _head_source(graph: Graph, producer: dict, name: str):
    """``(projection, first head, heads, norm op or None)`` when value ``name`` is attention heads cut from
    a 2-D projection (``reshape(slice(projection))`` on head boundaries), optionally through a per-head
    RMSNorm (Qwen3's q/k norm); else None."""
    op, norm = producer.get(name), None
    if op is not None and op.kind == "rms_norm" and len(graph.value(op.output).shape) == 3:
        norm, op = op, producer.get(op.inputs[0])
    if op is None or op.kind != "reshape" or len(graph.value(op.output).shape) != 3:
        return None
    cut = producer.get(op.inputs[0])
    if cut is None or cut.kind != "slice" or len(graph.value(cut.inputs[0]).shape) != 2:
        return None
    d = graph.value(op.output).shape[2]
    begin, end = cut.attrs["begin"], cut.attrs["end"]
    if not isinstance(d, int) or begin % d or end % d:
        return None
    return cut.inputs[0], begin // d, (end - begin) // d, norm


def _head_kernel(relax, kernel, graph: Graph, env: dict, cut: tuple, out, table):
    """``make_head_rope_gpu`` on heads ``_head_source`` found: rotated with ``table`` (after the norm the
    cut passes through, if any), or only cut out when ``table`` is None."""
    src, first, heads, norm = cut
    d, width, dt = out.shape[-1], graph.value(src).shape[1], out.dtype
    eps = norm.attrs["eps"] if norm is not None else None
    wdt = graph.value(norm.inputs[1]).dtype if norm is not None else "float32"
    rotate = table is not None
    gv = kernel(("head_rope", width, first, heads, d, dt, eps, wdt, rotate),
                lambda: rope_sched.make_head_rope_gpu(width, first, heads, d, dt, eps, wdt, rotate))
    ins = [env[src]] + ([env[norm.inputs[1]]] if norm is not None else []) + ([table] if rotate else [])
    return relax.call_tir(gv, ins, relax.TensorType([env[src].ty.shape[0], heads, d], dt))


def _reshape(bb, relax, shape_of, sliced, x, shape):
    """``reshape(slice(src, b, e), (T, h, d))`` of a fused q/k/v output becomes ``slice(reshape(src,
    (T, N/d, d)), heads b/d..e/d)``: the reshape is a view and the slice can then fuse into its consumer
    (RoPE) instead of copying columns into a new tensor."""
    from tvm import tirx

    if sliced is not None and len(shape) == 3 and isinstance(shape[2], int):
        src, begin, end = sliced
        d = shape[2]
        width = src.ty.shape[1]
        if isinstance(width, tirx.IntImm) and int(width) % d == 0 and begin % d == 0 and end % d == 0:
            heads = bb.emit(relax.op.reshape(src, [src.ty.shape[0], int(width) // d, d]))
            return relax.op.strided_slice(heads, axes=[1], begin=[begin // d], end=[end // d])
    return relax.op.reshape(x, shape_of(shape))


def _identifier(name: str) -> str:
    """Param names become C identifiers in generated device code."""
    return "".join(c if c.isalnum() else "_" for c in name)


def _gated_source(graph: Graph, producer: dict, name: str) -> str | None:
    """The gate|up projection when value ``name`` is ``silu_mul(slice(p, 0, I), slice(p, I, 2I))`` of a 2-D
    ``p`` with ``2I`` columns (the MLP after ``fuse_parallel_linears``); else None."""
    op = producer.get(name)
    if op is None or op.kind != "silu_mul":
        return None
    g, u = producer.get(op.inputs[0]), producer.get(op.inputs[1])
    if g is None or u is None or g.kind != "slice" or u.kind != "slice" or g.inputs[0] != u.inputs[0]:
        return None
    src = graph.value(g.inputs[0])
    i = g.attrs["end"]
    if len(src.shape) != 2 or g.attrs["begin"] != 0 or u.attrs["begin"] != i or u.attrs["end"] != 2 * i \
            or src.shape[1] != 2 * i:
        return None
    return g.inputs[0]


def _silu_of(graph: Graph, producer: dict, consumers: dict, op):
    """The ``silu_mul`` op when linear ``op`` is a gate|up projection read only by it, through its two
    slices (``_gated_source``) and nothing else: then the GEMV can write SiLU·mul's output itself."""
    readers = consumers.get(op.output, [])
    if len(readers) != 2 or any(r.kind != "slice" or len(consumers.get(r.output, [])) != 1 for r in readers):
        return None
    silu = consumers[readers[0].output][0]
    if consumers[readers[1].output][0] is not silu or _gated_source(graph, producer, silu.output) != op.output:
        return None
    return silu


def _dp4a_takes(op, gemv: int, dp4a: str, norm=None, residual=None, norm_next=None) -> bool:
    """Whether qlinear ``op`` runs on FERRUM_GEMV_DP4A's integer-dot GEMV (``dp4a`` its mode): a decode
    entry's symmetric INT4 linear without bias or a folded norm or residual."""
    if op.kind != "qlinear" or not (gemv and dp4a):
        return False
    fmt = _quant_format(op.attrs)
    return (fmt.bits == 4 and fmt.sym and fmt.group_size % quant_sched.DP4A_BLOCK == 0 and not op.attrs["bias"]
            and norm is None and residual is None and norm_next is None)


def _skinny_fits(graph: Graph, op, tensor_core_dtypes: tuple[str, ...]) -> bool:
    """Whether linear ``op`` can run on ``make_skinny_gemm_gpu``: activations of a tensor-core dtype, a
    dense weight of the same dtype or a quantized one in the row layout, both dimensions multiples of 16."""
    x = graph.value(op.inputs[0])
    if x.dtype not in tensor_core_dtypes:
        return False
    if op.kind == "qlinear":
        at = op.attrs
        return at.get("layout", "rows") == "rows" and at["out_features"] % 16 == 0 and at["in_features"] % 32 == 0
    w = graph.value(op.inputs[1])
    n, k = w.shape
    return w.dtype == x.dtype and n % 16 == 0 and k % 16 == 0


def _quant_format(attrs: dict):
    """The QuantFormat of a quantized op's (or MoE stack's) attributes: bits, group size, symmetry, value
    table (``int_dot_only`` formats: ``compile.kernel_layouts`` widens them to 8 bits for the other kernels)."""
    return quant_sched.QuantFormat.from_dict(attrs)


def _mma_format(op):
    """The QuantFormat of a qlinear op (None for a dense linear), for ``make_mma_linear_gpu``."""
    return _quant_format(op.attrs) if op.kind == "qlinear" else None


def _mma_fits(graph: Graph, op, fits=mma_sched.mma_linear_fits) -> bool:
    """Whether (q)linear ``op`` can run on ``make_mma_linear_gpu`` (``fits``: ``mma_gemm_fits`` for
    ``make_mma_gemm_gpu``): a dense weight of its activations' dtype (float16 or bfloat16) or INT4 in the
    row layout (float16 activations), of a shape ``fits`` takes."""
    x = graph.value(op.inputs[0])
    if op.kind == "qlinear":
        at = op.attrs
        return at.get("layout", "rows") == "rows" and fits(
            at["in_features"], at["out_features"], x.dtype, _mma_format(op))
    w = graph.value(op.inputs[1])
    n, k = w.shape
    return w.dtype == x.dtype and fits(k, n, x.dtype)


def _gemm_fits(graph: Graph, op, tensor_core_dtypes: tuple[str, ...]) -> bool:
    """Whether (q)linear ``op`` can run on ``mma_linear.make_mma_gemm_gpu`` in ``forward``: activations of
    a tensor-core dtype, a dense weight of that dtype or INT4 in the row layout (float16 activations),
    ``mma_gemm_fits``' shape, and not the lm_head (the graph's output: a step's few logits rows, which a
    128-token tile would mostly waste)."""
    if op.kind not in ("linear", "qlinear") or op.output in graph.outputs:
        return False
    return graph.value(op.inputs[0]).dtype in tensor_core_dtypes and _mma_fits(graph, op, mma_sched.mma_gemm_fits)


def _mma_operands(graph: Graph, op) -> tuple:
    """``(K, N, fmt, activation dtype, bias dtype or None, scale dtype)`` of a (q)linear, for the mma
    kernels (``fmt`` None for a dense weight)."""
    x_dtype = graph.value(op.inputs[0]).dtype
    b_dtype = graph.value(op.inputs[-1]).dtype if op.attrs["bias"] else None
    fmt = _mma_format(op)
    if fmt is not None:
        return op.attrs["in_features"], op.attrs["out_features"], fmt, x_dtype, b_dtype, graph.value(op.inputs[2]).dtype
    n, k = graph.value(op.inputs[1]).shape
    return k, n, None, x_dtype, b_dtype, "float16"


def _mma_gemm(relax, kernel, graph, op, a, out):
    """A (q)linear on ``mma_linear.make_mma_gemm_gpu``: its arguments are the op's."""
    k, n, fmt, x_dtype, b_dtype, s_dtype = _mma_operands(graph, op)
    gv = kernel(("mma_gemm", k, n, repr(fmt), x_dtype, out.dtype, b_dtype, s_dtype),
                lambda: mma_sched.make_mma_gemm_gpu(k, n, x_dtype, out.dtype, b_dtype, fmt=fmt, scale_dtype=s_dtype))
    return relax.call_tir(gv, a, relax.TensorType([a[0].ty.shape[0], n], out.dtype))


def _mma_linear(relax, kernel, graph, op, a, out, n_frags: int):
    """A (q)linear on ``mma_linear.make_mma_linear_gpu``, ``n_frags`` 8-token fragments a pass: its arguments
    are the op's."""
    k, n, fmt, x_dtype, b_dtype, s_dtype = _mma_operands(graph, op)
    gv = kernel(("mma_linear", k, n, repr(fmt), x_dtype, out.dtype, b_dtype, s_dtype, n_frags),
                lambda: mma_sched.make_mma_linear_gpu(k, n, x_dtype, out.dtype, b_dtype, n_frags=n_frags, fmt=fmt,
                                                      scale_dtype=s_dtype))
    return relax.call_tir(gv, a, relax.TensorType([a[0].ty.shape[0], n], out.dtype))


def _skinny(relax, kernel, graph, op, a, out, gated: bool):
    """A (q)linear of ``decode_wide`` on ``quant_linear.make_skinny_gemm_gpu``: its arguments are the op's."""
    x_dtype = graph.value(op.inputs[0]).dtype
    b_dtype = graph.value(op.inputs[-1]).dtype if op.attrs["bias"] else None
    if op.kind == "qlinear":
        at = op.attrs
        fmt = _quant_format(at)
        k, n, s_dtype = at["in_features"], at["out_features"], graph.value(op.inputs[2]).dtype
    else:
        fmt, s_dtype = None, "float16"
        n, k = graph.value(op.inputs[1]).shape
    gv = kernel(("skinny", k, n, repr(fmt), x_dtype, out.dtype, b_dtype, s_dtype, gated),
                lambda: quant_sched.make_skinny_gemm_gpu(k, n, x_dtype, out.dtype, b_dtype, gated=gated, fmt=fmt,
                                                         scale_dtype=s_dtype))
    return relax.call_tir(gv, a, relax.TensorType([a[0].ty.shape[0], n], out.dtype))


def _linear(bb, relax, kernel, kernel_kind, graph, op, a, out, gemv: int, max_lanes: int, gated: bool = False,
            mma_dtype: str = "", norm: tuple | None = None, residual=None, pdl: str = "",
            norm_next: tuple | None = None, gate_out: bool = False):
    """A dense linear: our GEMV (``gemv`` > 0: in passes of that many tokens; ``gate_out``: a gate|up
    projection writing SiLU·mul's output, ``out``), the CPU kernel, our tiled GEMM on tensor cores
    (``mma_dtype``) or a float32-accumulated matmul that dlight schedules."""
    w = graph.value(op.inputs[1])
    n, k = w.shape
    has_bias = op.attrs["bias"]
    assert gemv or (norm is None and residual is None and norm_next is None), "norms, residuals: GEMVs only"
    if gemv:
        x_dtype = "float32" if norm else graph.value(op.inputs[0]).dtype  # a deferred norm's xn
        b_dtype = graph.value(op.inputs[2]).dtype if has_bias else None
        fused = _gemv_fusion(norm, residual, pdl, norm_next)
        gv = kernel(("gemv", k, n, w.dtype, x_dtype, out.dtype, b_dtype, gated, gemv, *_named(fused), gate_out),
                    lambda: quant_sched.make_gemv_gpu(k, n, None, w.dtype, x_dtype, out.dtype, b_dtype,
                                                      max_lanes=max_lanes, gated=gated, tokens=gemv,
                                                      gate_out=gate_out, **fused))
        # the partial sums it writes: one per block of its grid (laid out as a norm reader's when it is one)
        parts = quant_sched.gemv_row_blocks(k, n, None, w.dtype, gemv if norm else 0) if norm_next else 0
        return relax.call_tir(gv, _gemv_args(a, norm, residual, norm_next),
                              _gemv_outputs(relax, a[0].ty.shape[0], n // 2 if gate_out else n, out.dtype,
                                            norm_next, parts))
    if kernel_kind == "cpu":
        gv = kernel(("linear", k, n, w.dtype, out.dtype, has_bias),
                    lambda: linear_sched.make_linear_cpu(k, n, w.dtype, out.dtype, has_bias))
        return relax.call_tir(gv, a, relax.TensorType([a[0].ty.shape[0], n], out.dtype))
    if mma_dtype:
        return _tiled_gemm(relax, kernel, graph, op, a, out, None, w.dtype, mma_dtype)
    # accumulated in float32 (as the GEMVs and torch do), cast in the matmul kernel's epilogue
    r = bb.emit(relax.op.matmul(a[0], relax.op.permute_dims(a[1]), out_dtype="float32"))
    if has_bias:
        r = bb.emit(relax.op.add(r, relax.op.astype(a[2], "float32")))
    return r if out.dtype == "float32" else relax.op.astype(r, out.dtype)


def _tiled_gemm(relax, kernel, graph, op, a, out, fmt, w_dtype: str, mma_dtype: str):
    """``quant_linear.make_tiled_gemm_gpu`` for a (q)linear: its arguments are the op's, in order."""
    n, k = graph.value(op.output).shape[1], graph.value(op.inputs[0]).shape[1]
    x_dtype = graph.value(op.inputs[0]).dtype
    b_dtype = graph.value(op.inputs[-1]).dtype if op.attrs["bias"] else None
    s_dtype = graph.value(op.inputs[2]).dtype if fmt is not None else "float16"
    gv = kernel(("tiled_gemm", k, n, repr(fmt), x_dtype, w_dtype, out.dtype, b_dtype, s_dtype, mma_dtype),
                lambda: quant_sched.make_tiled_gemm_gpu(k, n, fmt, x_dtype, w_dtype, out.dtype, b_dtype, s_dtype,
                                                        mma_dtype=mma_dtype))
    return relax.call_tir(gv, a, relax.TensorType([a[0].ty.shape[0], n], out.dtype))


def _qlinear(bb, relax, kernel, kernel_kind, int_dot_isa, graph, op, a, out, gemv: int, max_lanes: int,
             gated: bool = False, mma_dtype: str = "", norm: tuple | None = None, residual=None, pdl: str = "",
             dp4a: str = "", norm_next: tuple | None = None, gate_out: bool = False):
    at = op.attrs
    fmt = _quant_format(at)
    assert not fmt.int_dot_only or at.get("layout") == "r16", f"{fmt}: the r16 kernel only"
    k, n = at["in_features"], at["out_features"]
    x_dtype = "float32" if norm else graph.value(op.inputs[0]).dtype  # a deferred norm's xn
    bias_dtype = graph.value(op.inputs[-1]).dtype if at["bias"] else None
    assert gemv or (norm is None and residual is None and norm_next is None), "norms, residuals: GEMVs only"
    if at.get("layout", "rows") == "r16":
        if kernel_kind != "cpu" or int_dot_isa is None:
            raise ValueError("r16 weights need the CPU kernel with integer dot products")
        bits = at.get("act_bits", 16)
        gv = kernel(("qlinear_r16", k, n, fmt.bits, fmt.group_size, fmt.sym, fmt.tag, x_dtype, out.dtype, bias_dtype,
                     int_dot_isa, bits),
                    lambda: quant_sched.make_qlinear_r16_cpu(k, n, fmt, x_dtype, out.dtype, bias_dtype, int_dot_isa,
                                                             bits))
        return relax.call_tir(gv, a, relax.TensorType([a[0].ty.shape[0], n], out.dtype))
    if _dp4a_takes(op, gemv, dp4a, norm, residual, norm_next):  # FERRUM_GEMV_DP4A
        assert not gate_out, "gate_out: not on dp4a"
        s_dtype = graph.value(op.inputs[2]).dtype
        rows = a[0].ty.shape[0]
        if dp4a == "lanes":
            gv = kernel(("qgemv_dp4a", k, n, fmt.group_size, x_dtype, out.dtype, s_dtype, gated, gemv),
                        lambda: quant_sched.make_gemv_dp4a_gpu(k, n, fmt, out.dtype, s_dtype, tokens=gemv,
                                                               x_dtype=x_dtype, gated=gated))
            return relax.call_tir(gv, a[:3], relax.TensorType([rows, n], out.dtype))
        qv = kernel(("quantize_dp4a", k, x_dtype, gated), lambda: quant_sched.make_quantize_dp4a_gpu(k, x_dtype, gated))
        blocks = k // quant_sched.DP4A_BLOCK
        q = bb.emit(relax.call_tir(qv, a[:1], [relax.TensorType([rows, k // 4], "int32"),
                                              relax.TensorType([rows, blocks], "float32"),
                                              relax.TensorType([rows, blocks], "int32")]))
        gv = kernel(("qgemv_dp4a_q", k, n, fmt.group_size, out.dtype, s_dtype, gemv),
                    lambda: quant_sched.make_gemv_dp4a_gpu(k, n, fmt, out.dtype, s_dtype, tokens=gemv))
        return relax.call_tir(gv, [*(bb.emit(relax.TupleGetItem(q, i)) for i in range(3)), a[1], a[2]],
                              relax.TensorType([rows, n], out.dtype))
    if gemv:
        s_dtype = graph.value(op.inputs[2]).dtype
        fused = _gemv_fusion(norm, residual, pdl, norm_next)
        gv = kernel(("qgemv", k, n, fmt.bits, fmt.group_size, fmt.sym, x_dtype, out.dtype, bias_dtype, s_dtype, gated,
                     gemv, *_named(fused), gate_out),
                    lambda: quant_sched.make_gemv_gpu(k, n, fmt, "", x_dtype, out.dtype, bias_dtype, s_dtype,
                                                      max_lanes=max_lanes, gated=gated, tokens=gemv,
                                                      gate_out=gate_out, **fused))
        parts = quant_sched.gemv_row_blocks(k, n, fmt, "", gemv if norm else 0) if norm_next else 0
        return relax.call_tir(gv, _gemv_args(a, norm, residual, norm_next),
                              _gemv_outputs(relax, a[0].ty.shape[0], n // 2 if gate_out else n, out.dtype,
                                            norm_next, parts))
    if kernel_kind == "cpu":
        gv = kernel(("qlinear", k, n, fmt.bits, fmt.group_size, fmt.sym, x_dtype, out.dtype, bias_dtype),
                    lambda: quant_sched.make_qlinear_cpu(k, n, fmt, x_dtype, out.dtype, bias_dtype))
        return relax.call_tir(gv, a, relax.TensorType([a[0].ty.shape[0], n], out.dtype))
    if mma_dtype:
        return _tiled_gemm(relax, kernel, graph, op, a, out, fmt, "", mma_dtype)
    return bb.emit_te(quant_sched.qlinear_te(fmt, out.dtype, at["bias"]), *a, primfunc_name_hint="qlinear")


def _moe(bb, relax, kernel, kernel_kind, int_dot_isa, graph, op, a, out, gemv: int, max_lanes: int,
         mma_dtype: str = ""):
    """route → dispatch by expert → grouped gate_up → SiLU·up → grouped down → weighted combine. On GPUs the
    decode entry point runs the experts as grouped GEMVs, the general one as tiled grouped GEMMs (on tensor
    cores in ``mma_dtype`` when set); either way only chosen experts' weights are read."""
    from tvm import te, tirx

    at = op.attrs
    E, k, inter = at["num_experts"], at["top_k"], at["intermediate"]
    x, logits, rest = a[0], a[1], list(a[2:])
    d = graph.value(op.inputs[0]).shape[1]
    stacks = []
    for key in ("gate_up_quant", "down_quant"):
        q = at[key]
        fmt = None if q is None else _quant_format(q)
        n = 1 if fmt is None else 2 if fmt.sym else 3
        stacks.append((fmt, rest[:n], q))
        rest = rest[n:]
    ntok = x.ty.shape[0]
    topk = kernel(("moe_topk", E, k, at["norm_topk_prob"], kernel_kind),
                  lambda: moe_sched.make_moe_topk(E, k, at["norm_topk_prob"], kernel_kind))
    routed = bb.emit(relax.call_tir(topk, [logits], [relax.TensorType([ntok, k], "float32"),
                                                    relax.TensorType([ntok * k], "int32")]))
    weights, ids = bb.emit(relax.TupleGetItem(routed, 0)), bb.emit(relax.TupleGetItem(routed, 1))

    def grouped(inp, fmt, tensors, q, kk, nn, x_div, gated=False, gate_out=False):
        # each stack's own (one may stay dense where the other is quantized: a width its groups do not divide)
        w_dtype = str(tensors[0].ty.dtype)
        s_dtype = str(tensors[1].ty.dtype) if fmt is not None else "float16"
        assert kernel_kind == "cpu" or fmt is None or not fmt.int_dot_only, f"{fmt}: x86 CPU targets only"
        out_ty = relax.TensorType([ntok * k, nn // 2 if gate_out else nn], "float32")
        if gemv:
            gv = kernel(("grouped_gemv", E, kk, nn, x_div, repr(fmt), inp.ty.dtype, w_dtype, s_dtype, gated, gate_out),
                        lambda: quant_sched.make_gemv_gpu(kk, nn, fmt, str(w_dtype), str(inp.ty.dtype), "float32", None,
                                                          s_dtype, max_lanes=max_lanes, experts=E, x_div=x_div,
                                                          gated=gated, gate_out=gate_out))
            return bb.emit(relax.call_tir(gv, [inp, *tensors, offsets, order], out_ty))
        if q is not None and q.get("layout") == "r16":  # CPU integer dot products (compile.kernel_layouts)
            gv = kernel(("grouped_r16", E, kk, nn, x_div, fmt.bits, fmt.group_size, fmt.sym, fmt.tag, inp.ty.dtype,
                         int_dot_isa, q["act_bits"]),
                        lambda: quant_sched.make_qlinear_r16_cpu(kk, nn, fmt, str(inp.ty.dtype), "float32", None,
                                                                 int_dot_isa, q["act_bits"], experts=E, x_div=x_div))
            return bb.emit(relax.call_tir(gv, [inp, *tensors, offsets, order], out_ty))
        if kernel_kind != "cpu":
            gv = kernel(("grouped_gemm", E, kk, nn, x_div, repr(fmt), inp.ty.dtype, w_dtype, s_dtype, gated, mma_dtype),
                        lambda: moe_sched.make_grouped_gemm_gpu(E, kk, nn, x_div, fmt, str(inp.ty.dtype), str(w_dtype),
                                                                s_dtype, gated, mma_dtype))
            return bb.emit(relax.call_tir(gv, [inp, *tensors, offsets, tiles, order], out_ty))
        gv = kernel(("grouped_linear", E, kk, nn, x_div, repr(fmt), inp.ty.dtype, w_dtype),
                    lambda: moe_sched.make_grouped_linear_cpu(E, kk, nn, x_div, fmt, inp.ty.dtype, w_dtype))
        return bb.emit(relax.call_tir(gv, [inp, *tensors, offsets, order], out_ty))

    dispatch = kernel(("moe_dispatch", E, kernel_kind), lambda: moe_sched.make_moe_dispatch(E, kernel_kind))
    index = relax.TensorType([E + 1], "int32")
    outs = [index] + ([index] if kernel_kind == "gpu" else []) + [relax.TensorType([ntok * k], "int32")]
    sorted_ = bb.emit(relax.call_tir(dispatch, [ids], outs))
    offsets, order = bb.emit(relax.TupleGetItem(sorted_, 0)), bb.emit(relax.TupleGetItem(sorted_, len(outs) - 1))
    tiles = bb.emit(relax.TupleGetItem(sorted_, 1)) if kernel_kind == "gpu" else None
    if gemv:  # the gate|up GEMV writes SiLU·mul's output [S, I] (make_gemv_gpu's gate_out), read as it is
        act = grouped(x, *stacks[0], d, 2 * inter, k, gate_out=True)
        return bb.emit_te(moe_sched.combine_te(k, out.dtype), weights,
                          grouped(act, *stacks[1], inter, d, 1), primfunc_name_hint="moe_combine")
    h = grouped(x, *stacks[0], d, 2 * inter, k)  # [S, 2I]
    if kernel_kind == "gpu":  # the down GEMM applies SiLU·mul to the gate|up rows it reads
        y = grouped(h, *stacks[1], inter, d, 1, gated=True)  # [S, D]
    else:
        gate = bb.emit(relax.op.strided_slice(h, axes=[1], begin=[0], end=[inter]))
        up = bb.emit(relax.op.strided_slice(h, axes=[1], begin=[inter], end=[2 * inter]))
        act = bb.emit_te(_silu_mul_te(te, tirx, kernel_kind), gate, up, primfunc_name_hint="silu_mul")
        y = grouped(act, *stacks[1], inter, d, 1)  # [S, D]
    return bb.emit_te(moe_sched.combine_te(k, out.dtype), weights, y, primfunc_name_hint="moe_combine")


def _qkv_source(graph: Graph, producer: dict, op):
    """For a ``paged_attention`` op: ``(projection, (q, k, v first heads), (q norm, k norm) or None, rope op)``
    when its queries and keys are RoPE'd head cuts (through per-head RMSNorms alike, or neither) and its
    values a plain head cut, all of one projection, with the op's head counts; else None."""
    rq, rk = producer.get(op.inputs[0]), producer.get(op.inputs[1])
    if rq is None or rk is None or rq.kind != "rope" or rk.kind != "rope":
        return None
    if rq.inputs[1] != rk.inputs[1] or rq.attrs != rk.attrs:
        return None
    cq, ck = _head_source(graph, producer, rq.inputs[0]), _head_source(graph, producer, rk.inputs[0])
    cv = _head_source(graph, producer, op.inputs[2])
    if cq is None or ck is None or cv is None or cv[3] is not None or not cq[0] == ck[0] == cv[0]:
        return None
    kv_heads = graph.value(op.inputs[3]).shape[2]
    if cq[2] != graph.value(op.output).shape[1] or ck[2] != kv_heads or cv[2] != kv_heads:
        return None
    nq, nk = cq[3], ck[3]
    if (nq is None) != (nk is None):
        return None
    if nq is not None and (nq.attrs["eps"] != nk.attrs["eps"]
                           or graph.value(nq.inputs[1]).dtype != graph.value(nk.inputs[1]).dtype):
        return None
    return cq[0], (cq[1], ck[1], cv[1]), None if nq is None else (nq, nk), rq


def _qkv_append(bb, relax, kernel, graph: Graph, env: dict, op, a, qkv, table):
    """``rope.make_qkv_append_gpu`` for the attention ``op`` (heads from ``_qkv_source``): returns ``a``
    with the queries and the appended cache in place of the q and cache arguments."""
    src, firsts, norms, _ = qkv
    cv = graph.value(op.inputs[3])
    _, _, kv_heads, block_size, d = cv.shape
    heads, dt = graph.value(op.output).shape[1], graph.value(op.output).dtype
    width = graph.value(src).shape[1]
    eps = norms[0].attrs["eps"] if norms else None
    wdt = graph.value(norms[0].inputs[1]).dtype if norms else "float32"
    gv = kernel(("qkv_append", width, *firsts, heads, kv_heads, d, block_size, dt, cv.dtype, eps, wdt),
                lambda: rope_sched.make_qkv_append_gpu(width, firsts, heads, kv_heads, d, block_size, dt, cv.dtype,
                                                       eps, wdt))
    q, k, v, cache, positions, query_start, block_tables, slot_mapping = a
    ins = [cache, env[src]] + ([env[n.inputs[1]] for n in norms] if norms else []) + [table, slot_mapping]
    q_ty = relax.TensorType([env[src].ty.shape[0], heads, d], dt)
    both = bb.emit(relax.call_tir_inplace(gv, ins, [0, -1], [cache.ty, q_ty]))
    return [bb.emit(relax.TupleGetItem(both, 1)), k, v, bb.emit(relax.TupleGetItem(both, 0)), positions,
            query_start, block_tables, slot_mapping]


def uses_tc_attention(graph: Graph, tensor_core_dtypes: tuple[str, ...]) -> bool:
    """Whether ``forward``'s attention runs on tensor cores (``make_prefill_attention_tc``) for some layer:
    an activation dtype in ``tensor_core_dtypes`` and a head size that fits its tile."""
    for op in graph.ops:
        if op.kind == "paged_attention":
            out = graph.value(op.output)
            if out.dtype in tensor_core_dtypes and attn_sched.tc_attention_fits(out.shape[2], out.dtype):
                return True
    return False


def _paged_attention(bb, relax, kernel, kernel_kind, graph, op, a, out, appended: bool = False,
                     tensor_cores: bool = False, decode: bool = False, max_lanes: int = 16,
                     shared_bytes: int = 40 * 1024, pdl: str = "", flash: bool = False, counters: list | None = None):
    """The KV append (unless ``appended``: ``_qkv_append`` wrote the cache) and the attention: on GPUs
    the tensor-core kernel when ``tensor_cores`` and the head fits it (``flash``: the one-pass mma.sync
    kernel where the head fits that), else split-KV partials and their merge, with one query token per tile
    in the ``decode`` entry points (their tokens are mostly one per sequence); ``pdl`` (a FERRUM_PDL mode):
    the split kernel waits for the kernel before it after reading the step's inputs. ``counters`` (a list,
    decode entries with ``merged_attention``): the split kernel merges itself, counting its blocks on the
    step's zeroed counters (made at the first attention, ``counters[0]`` after each)."""
    q, k, v, cache, positions, query_start, block_tables, slot_mapping = a
    cv = graph.value(op.inputs[3])
    _, _, kv_heads, block_size, head_dim = cv.shape
    heads = out.shape[1]
    dtype, cdtype = out.dtype, cv.dtype
    if not appended:
        append = kernel(("kv_append", kv_heads, head_dim, block_size, dtype, cdtype, kernel_kind),
                        lambda: attn_sched.make_kv_append(kv_heads, head_dim, block_size, dtype, kernel_kind, cdtype))
        cache = bb.emit(relax.call_tir_inplace(append, [cache, k, v, slot_mapping], 0, cache.ty))
    window, scale = op.attrs["sliding_window"], op.attrs["scale"]
    tc = kernel_kind == "gpu" and tensor_cores  # the tensor-core attentions: the flash one, else the wmma one
    name, make = (("attention_fa", attn_sched.make_prefill_attention_mma)
                  if tc and flash and attn_sched.fa_attention_fits(head_dim, dtype) else
                  ("attention_tc", attn_sched.make_prefill_attention_tc)
                  if tc and attn_sched.tc_attention_fits(head_dim, dtype) else ("", None))
    if make is not None:
        attend = kernel((name, heads, kv_heads, head_dim, block_size, dtype, cdtype, window, scale),
                        lambda: make(heads, kv_heads, head_dim, block_size, dtype, sliding_window=window, scale=scale,
                                     cache_dtype=cdtype))
        return relax.call_tir(attend, [q, cache, positions, query_start, block_tables], q.ty)
    if kernel_kind == "gpu":  # split-KV partials, then their merge
        ntok, max_blocks = q.ty.shape[0], block_tables.ty.shape[1]
        splits = attn_sched.gpu_num_splits(ntok, max_blocks, block_size)
        tile = 1 if decode else 0  # 0: the kernel's default
        merged = counters is not None  # (decode entries only)
        split = kernel(("attention_split", heads, kv_heads, head_dim, block_size, dtype, cdtype, window, scale,
                        tile, max_lanes, shared_bytes, *(["pdl", pdl] if pdl else []), *(["merged"] if merged else [])),
                       lambda: attn_sched.make_attention_gpu(heads, kv_heads, head_dim, block_size, dtype,
                                                             sliding_window=window, scale=scale, cache_dtype=cdtype,
                                                             tile_tokens=tile, max_lanes=max_lanes,
                                                             shared_bytes=shared_bytes, pdl=pdl, merged=merged))
        parts_ty = [relax.TensorType([ntok, heads, splits, head_dim], "float32"),
                    relax.TensorType([ntok, heads, splits, 2], "float32")]
        if merged:  # one kernel: the counters in place, the partials (scratch) and the output
            assert counters is not None
            if not counters:
                counters.append(bb.emit(relax.op.zeros(relax.ShapeExpr([ntok, kv_heads]), "int32")))
            done = bb.emit(relax.call_tir_inplace(split, [q, cache, positions, query_start, block_tables, counters[0]],
                                                  [5, -1, -1, -1], [counters[0].ty, *parts_ty, q.ty]))
            counters[0] = bb.emit(relax.TupleGetItem(done, 0))
            return relax.TupleGetItem(done, 3)
        parts = bb.emit(relax.call_tir(split, [q, cache, positions, query_start, block_tables], parts_ty))
        merge = kernel(("attention_merge", heads, head_dim, dtype),
                       lambda: attn_sched.make_attention_merge_gpu(heads, head_dim, dtype))
        return relax.call_tir(merge, [bb.emit(relax.TupleGetItem(parts, 0)), bb.emit(relax.TupleGetItem(parts, 1))],
                              q.ty)
    attend = kernel(("attention", heads, kv_heads, head_dim, block_size, dtype, cdtype, kernel_kind, window, scale),
                    lambda: attn_sched.make_attention(heads, kv_heads, head_dim, block_size, dtype, kernel_kind,
                                                      sliding_window=window, scale=scale, cache_dtype=cdtype))
    return relax.call_tir(attend, [q, cache, positions, query_start, block_tables], q.ty)


def _rope_table_te(te, tirx):
    """``[T, 2, D/2]``: cos (row 0) and sin (row 1) of ``positions[t] * inv_freq[j]``, computed once per step
    instead of once per head and layer."""
    def table(positions, inv_freq):
        def f(t, c, j):
            angle = positions[t].astype("float32") * inv_freq[j]
            return tirx.if_then_else(c == 0, tirx.cos(angle), tirx.sin(angle))

        return te.compute((positions.shape[0], 2, inv_freq.shape[0]), f, name="rope_table")

    return table


def _rope_te(te, tirx):
    def rope(x, table):
        half = x.shape[-1] // 2

        def f(t, h, d):
            j = tirx.floormod(d, half)
            xf = x[t, h, d].astype("float32")
            rot = tirx.if_then_else(d < half, -x[t, h, d + half], x[t, h, d - half]).astype("float32")
            return (xf * table[t, 0, j] + rot * table[t, 1, j]).astype(x.dtype)

        return te.compute(x.shape, f, name="rope")

    return rope


def _silu_mul_te(te, tirx, kernel_kind: str):
    exp = exp_f32 if kernel_kind == "cpu" else tirx.exp  # CPU: no scalar expf call per element

    def silu_mul(gate, up):
        def f(*idx):
            g = gate(*idx).astype("float32")
            return (g / (1.0 + exp(-g)) * up(*idx).astype("float32")).astype(gate.dtype)

        return te.compute(gate.shape, f, name="silu_mul")

    return silu_mul


def argument_specs(graph: Graph) -> list[dict]:
    """The entry point's arguments in call order, as recorded in the manifest."""
    specs = []
    for role, table in (("input", graph.inputs), ("param", graph.params)):
        for v in table.values():
            specs.append({"name": v.name, "role": role, "shape": list(v.shape), "dtype": v.dtype})
    return specs


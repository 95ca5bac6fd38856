"""Run a GPU kernel (a thread-bound TIR PrimFunc from ``schedules/``) on this CPU, for numerics tests.

TVM lowers the PrimFunc exactly as for CUDA (thread binding, shared memory, barriers: the same TIR passes)
and emits OpenCL C for it; PoCL (``pocl-binary-distribution``) runs that on the CPU with real work-group
semantics: ``__local`` memory shared by a work group, barriers, one private copy of every local buffer
per work item. The host side is not compiled: the launches TVM's ``SplitHostDevice`` leaves in the host
function (``call_ffi_kernel(name, args..., grid..., block...)``) are read and evaluated here with the
shapes of the numpy arguments bound.

What this does not cover: PoCL has no ``half`` arithmetic, so tests build the float32 variant of a kernel
(the dtype is a factory argument; index math, tiling and synchronisation are the same) and the float16 /
bfloat16 variants are checked by compiling them for every CUDA arch (tests/test_gpu_targets.py); warp
shuffles and tensor-core intrinsics have no OpenCL form, so kernels here reduce through shared memory.

``gpu_module`` and ``run_relax`` do the same for a whole model: the CUDA pipeline's legalization and
scheduling passes, then each Relax entry point interpreted call by call with every PrimFunc run here.
"""

from __future__ import annotations

import functools

import numpy as np

# the OpenCL target with CUDA's per-block limits, so a kernel that fits here fits an sm_80+ block
TARGET = {"kind": "opencl", "max_shared_memory_per_block": 49152, "max_num_threads": 1024,
          "max_threads_per_block": 1024, "thread_warp_size": 1}

@functools.cache
def _cl():
    """``(pyopencl, a context on the first OpenCL CPU device)``, made once."""
    import pyopencl as cl

    devices = [d for p in cl.get_platforms() for d in p.get_devices(cl.device_type.CPU)]
    if not devices:
        raise RuntimeError("no OpenCL CPU device (pip install pocl-binary-distribution)")
    return cl, cl.Context(devices[:1])


def build(func):
    """``(source, host, lets, launches)``: the OpenCL source of ``func``'s kernels, the host function after
    ``SplitHostDevice``, its integer let-bindings and, per launch in host order, ``(kernel name, args, kernel
    params, grid, block)`` with args and launch dimensions as TIR expressions over the host's variables."""
    import tvm
    from tvm import tirx

    snapshot = {}

    @tvm.instrument.pass_instrument
    class _Capture:
        def run_after_pass(self, mod, info):
            if info.name.endswith("SplitHostDevice"):
                snapshot["mod"] = mod

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with tvm.transform.PassContext(instruments=[_Capture()]):
        lib = tvm.tirx.build(mod, target=tvm.target.Target(TARGET, host="llvm"))
    source = lib.imports[0].inspect_source()
    split = snapshot["mod"]
    host = next(f for gv, f in split.functions.items() if "calling_conv" not in (f.attrs or {}))
    launches = []
    lets = []  # (var, value) of Bind statements, and (buffer, data) of DeclBuffer statements

    def walk(node):
        if isinstance(node, tirx.SeqStmt):
            for child in node.seq:
                walk(child)
        elif isinstance(node, tirx.For):
            raise NotImplementedError("kernel launches inside host loops")
        elif isinstance(node, tirx.Evaluate):
            call = node.value
            if isinstance(call, tvm.ir.Call) and call.op.name == "tirx.call_ffi_kernel":
                name = call.args[0].value
                params = list(split[name].params)
                dims = list(call.args[1 + len(params):])
                tags = [str(t) for t in split[name].attrs["tirx.kernel_launch_params"]]
                unknown = [t for t in tags if not t.startswith(("blockIdx.", "threadIdx."))]
                if unknown:
                    raise NotImplementedError(f"kernel launch parameters {unknown}")
                axis = {"x": 0, "y": 1, "z": 2}  # tags come in any order
                grid = [tirx.const(1, "int64")] * 3
                block = [tirx.const(1, "int64")] * 3
                for t, d in zip(tags, dims):
                    (grid if t.startswith("blockIdx") else block)[axis[t[-1]]] = d
                launches.append((name, list(call.args[1:1 + len(params)]), params, grid, block))
        elif isinstance(node, tirx.DeclBuffer):
            lets.append((node.buffer, node.data))
        else:
            if isinstance(node, tirx.Bind):
                lets.append((node.var, node.value))
            for field in ("body", "then_case", "else_case"):
                child = getattr(node, field, None)
                if isinstance(child, tirx.Stmt):
                    walk(child)

    walk(host.body)
    return source, host, lets, launches


def run(func, *arrays) -> None:
    """Run ``func`` on ``arrays`` (its parameters in order: numpy arrays, C-contiguous, or ints for scalar
    parameters), writing outputs in place."""
    import tvm
    from tvm import tirx

    cl, ctx = _cl()
    source, host, lets, launches = build(func)
    values: dict = {}
    data: list = []  # (buffer, array)
    host_params = list(host.params)
    if len(host_params) != len(arrays):
        raise ValueError(f"kernel takes {len(host_params)} arguments, got {len(arrays)}")
    for p, arr in zip(host_params, arrays):
        if isinstance(arr, (int, np.integer)):  # a scalar parameter (Relax passes symbolic shapes so)
            values[p] = int(arr)
            continue
        buf = p  # TVM 0.27: a buffer parameter is the buffer
        if np.dtype(str(buf.dtype)) != arr.dtype:
            raise TypeError(f"argument {buf.name}: expected {buf.dtype}, got {arr.dtype}")
        if len(buf.shape) != arr.ndim:
            raise ValueError(f"argument {buf.name}: expected rank {len(buf.shape)}, got shape {arr.shape}")
        for dim, n in zip(buf.shape, arr.shape):
            if isinstance(dim, tirx.Var):
                values.setdefault(dim, n)
        data.append((buf, arr))
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    for var, n in values.items():
        analyzer.bind(var, tirx.const(n, str(var.ty)))

    def array_of(expr):
        """The numpy array behind ``buffer_data(buf)``, or None for a scalar."""
        if not (isinstance(expr, tvm.ir.Call) and expr.op.name == "tirx.buffer_data"):
            return None
        return next(a for b, a in data if b.same_as(expr.args[0]))

    def evaluate(expr) -> int:
        out = analyzer.simplify(expr)
        if not isinstance(out, tirx.IntImm):
            raise ValueError(f"cannot evaluate launch expression {expr}")
        return int(out.value)

    for buf, arr in list(data):  # every dimension (``nbatch + 1`` too) must match once the variables are bound
        if [evaluate(d) for d in buf.shape] != list(arr.shape):
            raise ValueError(f"argument {buf.name}: expected shape {list(buf.shape)}, got {arr.shape}")
    for var, value in lets:
        if isinstance(value, tvm.ir.Call) and value.op.name == "tirx.buffer_data":
            data.append((var, array_of(value)))  # a buffer declared over a parameter's data
        elif "int" in str(var.ty):
            analyzer.bind(var, tirx.const(evaluate(value), str(var.ty)))

    queue = cl.CommandQueue(ctx)
    mf = cl.mem_flags
    tensors = [a for a in arrays if isinstance(a, np.ndarray)]
    buffers = {id(a): cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=a if a.size else np.zeros(1, a.dtype))
               for a in tensors}
    program = cl.Program(ctx, source).build()
    for name, args, params, grid, block in launches:
        cl_args = []
        for expr, param in zip(args, params):
            arr = array_of(expr)
            if arr is not None:
                cl_args.append(buffers[id(arr)])
            else:
                cl_args.append(np.dtype(str(param.ty)).type(evaluate(expr)))
        g = [evaluate(d) for d in grid]
        b = [evaluate(d) for d in block]
        if min(g) <= 0:
            continue  # an empty grid is no launch on CUDA either
        getattr(program, name)(queue, tuple(gi * bi for gi, bi in zip(g, b)), tuple(b), *cl_args)
    for a in tensors:
        if a.size:
            cl.enqueue_copy(queue, a, buffers[id(a)])
    queue.finish()


def gpu_module(relax_mod, arch: str = "sm_80"):
    """``relax_mod`` (from ``lowering.lower(graph, "gpu")``) after the CUDA pipeline's legalization and
    scheduling passes (dlight included) and its reshape rewrite: Relax functions calling thread-bound
    PrimFuncs, as the CUDA build compiles them, before memory planning."""
    import tvm
    from tvm.relax.backend.cuda import pipeline

    from ferrum_compiler.gpu_build import preload_tensor_intrinsics

    preload_tensor_intrinsics()  # else dlight's first matmul imports them, about 25 s under pytest
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    with target:
        # and the dataflow rewrite that turns copy kernels it recognises as reshapes into views
        passes = (pipeline.library_dispatch_passes(target) + pipeline.legalize_passes(target)
                  + [tvm.relax.transform.RewriteDataflowReshape()])
        return tvm.transform.Sequential(passes)(relax_mod)


def run_relax(mod, name: str, *arrays: np.ndarray) -> list[np.ndarray]:
    """Interpret Relax function ``name`` of ``gpu_module(...)`` on numpy arrays, every ``call_tir`` run on
    the CPU through ``run``; in-place calls write into the argument arrays as the device would. Returns
    the function's outputs (a tuple result as a list)."""
    import tvm
    from tvm import relax, tirx
    from tvm.sym.analyzer import Analyzer

    func = mod[name]
    analyzer = Analyzer()
    env: dict = {}
    for var, arr in zip(func.params, arrays):
        env[var] = arr
        for dim, n in zip(var.ty.shape, arr.shape):
            if isinstance(dim, tirx.Var):
                analyzer.bind(dim, tirx.const(n, "int64"))

    def shape(ty) -> tuple[int, ...]:
        return tuple(int(analyzer.simplify(d).value) for d in ty.shape)

    def value(expr):
        if isinstance(expr, relax.Var) and expr in env:
            return env[expr]
        if isinstance(expr, tirx.Var) and "int" in str(expr.ty):  # a symbolic shape passed as a scalar
            return int(analyzer.simplify(expr).value)
        if isinstance(expr, tvm.ir.expr.Constant):
            return expr.value.numpy()
        if isinstance(expr, relax.Tuple):
            return [value(f) for f in expr.fields]
        raise NotImplementedError(f"Relax expression {type(expr).__name__}")

    call_tir, inplace = tvm.ir.Op.get("relax.call_tir"), tvm.ir.Op.get("relax.call_tir_inplace")
    reshape = tvm.ir.Op.get("relax.reshape")
    for block in func.body.blocks:
        for binding in block.bindings:
            expr = binding.value
            if isinstance(expr, relax.Call) and expr.op in (call_tir, inplace):
                prim = mod[expr.args[0]]
                ins = [a if isinstance(a, int) else np.ascontiguousarray(a) for a in value(expr.args[1])]
                out_ty = binding.var.ty
                out_tys = list(out_ty.fields) if isinstance(out_ty, relax.TupleType) else [out_ty]
                if expr.op == inplace:  # index -1: an output allocated fresh, passed after the inputs
                    at = [int(i) for i in expr.attrs.inplace_indices]
                    fresh = [np.zeros(shape(t), str(t.dtype)) for i, t in zip(at, out_tys) if i < 0]
                    run(prim, *ins, *fresh)
                    outs, it = [], iter(fresh)
                    for i in at:
                        if i < 0:
                            outs.append(next(it))
                            continue
                        outs.append(ins[i])
                        src = value(expr.args[1])[i]
                        if src is not ins[i]:  # the caller's array is the one written
                            src[...] = ins[i]
                else:
                    outs = [np.zeros(shape(t), str(t.dtype)) for t in out_tys]
                    # symbolic shape values the PrimFunc takes as scalars come after the outputs
                    scalars = [int(analyzer.simplify(v).value) for v in expr.args[2].values] if len(expr.args) > 2 else []
                    run(prim, *ins, *outs, *scalars)
                env[binding.var] = outs if isinstance(out_ty, relax.TupleType) else outs[0]
            elif isinstance(expr, relax.Call) and expr.op == reshape:  # a view
                env[binding.var] = value(expr.args[0]).reshape(shape(binding.var.ty))
            elif isinstance(expr, relax.TupleGetItem):
                env[binding.var] = value(expr.tuple_value)[expr.index]
            else:
                env[binding.var] = value(expr)
    result = value(func.body.body)
    return result if isinstance(result, list) else [result]

"""Run a GPU kernel (a thread-bound TIR PrimFunc from ``schedules/``) on this CPU, for numerics tests.

TVM lowers the PrimFunc exactly as for CUDA (thread binding, shared memory, barriers: the same TIR passes)
and emits OpenCL C for it; PoCL (``pocl-binary-distribution``) runs that on the CPU with real work-group
semantics: ``__local`` memory shared by a work group, barriers, one private copy of every local buffer
per work item. The host side is not compiled: the launches TVM's ``SplitHostDevice`` leaves in the host
function (``call_ffi_kernel(name, args..., grid..., block...)``) are read and evaluated here with the
shapes of the numpy arguments bound.

Tensor cores (wmma) are emulated: a fragment becomes a private array holding the whole 16x16 tile in
every thread, and each ``tvm_*_matrix_sync`` / ``tvm_mma_sync`` / ``tvm_fill_fragment`` call becomes a
loop over it (an OpenCL helper, see ``_wmma_call``). Every thread of a warp then computes the warp's
whole tile redundantly, and a store writes the same values from all of them; the result is what the warp
computes together, as long as every thread of the warp makes the call with the same arguments (wmma's
own rule). Only the 16x16x16 shape is emulated; products are summed in the accumulator's type. The
register-operand ``mma.sync.m16n8k16`` (``T.ptx_legacy.mma``, whose fragments are spread over the warp's
lanes as the PTX ISA lays them out) is emulated through ``__local`` memory and two barriers (``_mma_call``),
and so is ``ldmatrix.x4`` (``T.ptx_legacy.ldmatrix``: ``_ldmatrix_call``).

PoCL has no ``half`` arithmetic. Most tests build the float32 variant of a kernel (the dtype is a factory
argument; index math, tiling and synchronisation are the same; wmma fragments of float32 exist only
here). float16 kernels run too, with ``half`` defined as ``float``: their arrays are widened on the way in
and rounded to half on the way out, so kernel outputs are rounded as on the device but nothing inside a
kernel is. Dynamic shared memory (dlight's matmul tiles) is made static for that (``_static_shared``).
bfloat16 kernels run exactly: TVM's OpenCL code keeps bfloat16 as its 16 bits (``ml_dtypes.bfloat16``
arrays pass as they are) and computes in float. Warp shuffles have no OpenCL form: kernels mostly
reduce through shared memory, and ``tvm_warp_shuffle_xor`` (float32, whole warps) is emulated as the mma is,
through ``__local`` memory and two barriers (``_shuffle_xor_call``).

``gpu_module`` and ``run_relax`` do the same for a whole model: the CUDA pipeline's legalization and
scheduling passes, then each Relax entry point interpreted call by call with every PrimFunc run here.
"""

from __future__ import annotations

import functools
import re

import numpy as np

# the OpenCL target with CUDA's per-block limits, so a kernel that fits here fits an sm_80+ block
TARGET = {"kind": "opencl", "max_shared_memory_per_block": 49152, "max_num_threads": 1024,
          "max_threads_per_block": 1024, "thread_warp_size": 1}

# PoCL builds a kernel without optimising it: its optimiser spent up to 40 s on one unrolled GEMV, and the
# tests' kernels run on a few hundred elements each. The arithmetic is the source's, operation by operation
BUILD_OPTIONS = ["-cl-opt-disable"]


@functools.cache
def _cl():
    """``(pyopencl, a context on the first OpenCL CPU device)``, made once."""
    import pyopencl as cl

    devices = [d for p in cl.get_platforms() for d in p.get_devices(cl.device_type.CPU)]
    if not devices:
        raise RuntimeError("no OpenCL CPU device (pip install pocl-binary-distribution)")
    return cl, cl.Context(devices[:1])


# float16 kernels run with float storage and arithmetic (PoCL has no half): the arrays are widened on the
# way in and rounded back on the way out (``run``); in between nothing is rounded to half
_HALF_AS_FLOAT = "".join(f"#define half{n} float{n}\n#define convert_half{n} convert_float{n}\n"
                         for n in ("", "2", "3", "4", "8", "16"))
_FP16_PRAGMA = re.compile(r"#ifdef cl_khr_fp16\n.*?#endif\n", re.S)  # TVM's enable-or-#error block
# CUDA's ``__dp4a(a, b, c)`` (sm_61+): c plus the products of a's and b's four signed bytes, summed
_DP4A = ("int ferrum_dp4a(int a, int b, int c) {\n  char4 x = as_char4(a), y = as_char4(b);\n"
         "  return c + x.s0 * y.s0 + x.s1 * y.s1 + x.s2 * y.s2 + x.s3 * y.s3;\n}\n")
# CUDA's ``__byte_perm(x, y, s)``: byte i of the result is byte ``s``'s nibble i of the 8 bytes y:x (the
# nibbles' sign-replicating bit, which nothing here uses, left out)
_BYTE_PERM = ("uint ferrum_byte_perm(uint x, uint y, uint s) {\n  ulong v = ((ulong)y << 32) | x;\n  uint r = 0;\n"
              "  for (int i = 0; i < 4; ++i) r |= (uint)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);\n"
              "  return r;\n}\n")
# CUDA's ``__threadfence()``: this thread's global writes are seen by every other block before its later
# ones (the split attention's merge by the last block counts on it)
_THREADFENCE = "void ferrum_threadfence() {\n  mem_fence(CLK_GLOBAL_MEM_FENCE);\n}\n"
# a float16 pair made from a 32-bit word's bits (INT4 nibbles OR-ed into 1024's: make_mma_linear_gpu):
# TVM writes ``(*(half2 *)(&(v)))``, which with half stored as float would read 8 bytes; each half's bits
# become the float of the same value instead (normal and zero halves: the decodes make no others)
_HALF2_PUN = re.compile(r"\(\*\(half2 \*\)\(&\((\w+)\)\)\)")
_HALF2_BITS = ("float ferrum_half_bits(uint h) {\n  uint e = (h >> 10) & 31u;\n"
               "  return as_float(((h & 0x8000u) << 16) | (e ? ((e + 112u) << 23) | ((h & 1023u) << 13) : 0u));\n}\n"
               "float2 ferrum_half2_bits(uint v) {\n"
               "  return (float2)(ferrum_half_bits(v & 0xFFFFu), ferrum_half_bits(v >> 16));\n}\n")
# bfloat16 reaches OpenCL as its bits (TVM's BF16 legalization): uint16 buffers and fragments
_CL_TYPES = {"float16": "half", "float32": "float", "float64": "double", "int32": "int", "int8": "char",
             "uint8": "uchar", "uint16": "ushort"}


_SPACES = {"shared": "__local", "global": "__global", "": "__global"}
_PUN = re.compile(r"\(\*\((float|uint|int) \*\)\(&\((\w+)\)\)\)")
_wmma_helpers: dict[str, str] = {}  # OpenCL helper name -> its definition, for the build under way


def _widen(ctype: str, value: str) -> str:
    """OpenCL for ``value`` of type ``ctype`` as a float: ushort fragments hold bfloat16 bits."""
    return f"as_float(((uint){value}) << 16)" if ctype == "ushort" else f"(float){value}"


def _buffer(expr):
    """The buffer of a wmma call's ``buffer_data(buf)`` or pointer argument (TVM 0.27: the buffer itself)."""
    return expr.args[0] if hasattr(expr, "args") else expr


def _scope(expr) -> str:
    return str(_buffer(expr).scope())


def _ctype(expr) -> str:
    return _CL_TYPES[str(_buffer(expr).dtype)]


def _frag_dims(var, m: int, n: int, k: int) -> tuple[int, int]:
    """Rows and columns of one tile of the fragment ``var``: A is m x k, B k x n, the accumulator m x n.
    Only the 16x16x16 shape is emulated (``tvm_mma_sync`` does not name its shape)."""
    if (m, n, k) != (16, 16, 16):
        raise NotImplementedError(f"wmma shape m{m}n{n}k{k}")
    return {"wmma.matrix_a": (m, k), "wmma.matrix_b": (k, n), "wmma.accumulator": (m, n)}[_scope(var)]


def _pointer(expr):
    """``(buffer, element offset)`` of a ``tvm_access_ptr`` argument (``buf.access_ptr(...)``)."""
    if expr.op.name == "tirx.tvm_access_ptr":
        return expr.args[1], expr.args[2]
    raise NotImplementedError(f"wmma pointer argument {expr}")


def _wmma_call(call):
    """The emulation of one wmma intrinsic call: a ``call_extern`` of an OpenCL helper (defined into
    ``_wmma_helpers``) that loops over the fragment tile every thread holds whole."""
    from tvm import tirx

    name = call.op.name.split(".")[-1]
    a = list(call.args)
    i32 = lambda e: tirx.Cast("int32", e)  # noqa: E731
    if name == "tvm_fill_fragment":
        frag, m, n, k, index, value = a
        rows, cols = _frag_dims(frag, int(m), int(n), int(k))
        ft = _ctype(frag)
        helper = f"ferrum_wmma_fill_{ft}"
        _wmma_helpers[helper] = (f"void {helper}({ft}* f, int off, int size, {ft} v) {{\n"
                                 f"  for (int i = 0; i < size; ++i) f[off + i] = v;\n}}\n")
        return tirx.call_extern("void", helper, frag, i32(index * rows * cols), rows * cols, value)
    if name in ("tvm_load_matrix_sync", "tvm_store_matrix_sync"):
        frag, m, n, k, index, ptr, stride, layout = a
        rows, cols = _frag_dims(frag, int(m), int(n), int(k))
        data, offset = _pointer(ptr)
        ft = _ctype(frag)
        mt = _ctype(data)
        space = _SPACES[_scope(data)]
        col_major = int(str(layout.value) in ("col_major", "mem_col_major"))
        load = name == "tvm_load_matrix_sync"
        helper = f"ferrum_wmma_{'load' if load else 'store'}_{ft}_{mt}_{space.strip('_')}"
        move = (f"f[off + i * cols + j] = ({ft})p[at]" if load else f"p[at] = ({mt})f[off + i * cols + j]")
        _wmma_helpers[helper] = (
            f"void {helper}({ft}* f, int off, int rows, int cols, {space} {mt}* p, int poff, int ld, int cm) {{\n"
            f"  for (int i = 0; i < rows; ++i)\n    for (int j = 0; j < cols; ++j) {{\n"
            f"      int at = poff + (cm ? j * ld + i : i * ld + j);\n      {move};\n    }}\n}}\n")
        return tirx.call_extern("void", helper, frag, i32(index * rows * cols), rows, cols, data, i32(offset),
                                i32(stride), col_major)
    if name == "tvm_mma_sync":  # d[di] = a[ai] @ b[bi] + c[ci]; d and c may be one tile
        d, di, fa, ai, fb, bi, c, ci = a
        dt, at = _ctype(d), _ctype(fa)
        helper = f"ferrum_wmma_mma_{at}_{dt}"
        _wmma_helpers[helper] = (
            f"void {helper}({dt}* d, int doff, {at}* a, int aoff, {at}* b, int boff, {dt}* c, int coff) {{\n"
            f"  for (int i = 0; i < 16; ++i)\n    for (int j = 0; j < 16; ++j) {{\n"
            f"      {dt} s = c[coff + i * 16 + j];\n"
            f"      for (int l = 0; l < 16; ++l)\n"
            f"        s += {_widen(at, 'a[aoff + i * 16 + l]')} * {_widen(at, 'b[boff + l * 16 + j]')};\n"
            f"      d[doff + i * 16 + j] = s;\n    }}\n}}\n")
        return tirx.call_extern("void", helper, d, i32(di * 256), fa, i32(ai * 256), fb, i32(bi * 256), c,
                                i32(ci * 256))
    raise NotImplementedError(name)


# ``mma.sync.aligned.m16n8k16.row.col.f32`` (``T.ptx_legacy.mma``): the warp's 32 threads each hold a
# piece of A (16 x 16, 8 values), B (16 x 8, 4) and the accumulator (16 x 8, 4), laid out as the PTX ISA's
# "Matrix Fragments for mma.m16n8k16" says. Emulated through ``__local`` memory: each thread writes its
# pieces of A and B to its warp's scratch rows, a barrier, each computes its 4 accumulator elements from
# the whole tiles, a barrier. So every thread of the block must reach every mma the same number of times
# (on the GPU only the warp's must): kernels built for this keep mma out of thread-dependent branches.
MMA_THREADS = 1024  # threads of a block the scratch is sized for
_LOCAL_TID = ("int tid = get_local_id(0) + get_local_size(0) * (get_local_id(1) + get_local_size(1) * "
              "get_local_id(2));\n")  # a work item's index in its work group
_MMA_SCRATCH = "ferrum_mma_x"


def _mma_call(call):
    """The emulation of one ``ptx_legacy.mma`` (m16n8k16, row.col, float32 accumulators): a helper call (a
    macro that passes the kernel's ``__local`` scratch, see ``build``)."""
    from tvm import tirx

    shape, a_layout, b_layout, a_type, b_type, c_type, a, ao, b, bo, c, co, _saturate = call.args
    if (shape.value, a_layout.value, b_layout.value, c_type.value) != ("m16n8k16", "row", "col", "fp32"):
        raise NotImplementedError(f"mma {shape.value}.{a_layout.value}.{b_layout.value}.{c_type.value}")
    at = {"fp16": "half", "bf16": "ushort"}[a_type.value]
    helper = f"ferrum_mma_m16n8k16_{at}"
    # A[row][k] sits in lane (row % 8) * 4 + (k % 8) / 2, slot k % 2 + 2 * (row / 8) + 4 * (k / 8);
    # B[k][n] in lane n * 4 + (k % 8) / 2, slot 8 + k % 2 + 2 * (k / 8) (after A's 8 in a scratch row);
    # accumulator element i of lane l is (row l / 4 + 8 * (i / 2), column 2 * (l % 4) + i % 2)
    _wmma_helpers[helper] = (
        f"void {helper}_x(float* c, int co, {at}* a, int ao, {at}* b, int bo, __local float* x) {{\n"
        f"  {_LOCAL_TID}"
        f"  int lane = tid % 32;\n  __local float* w = x + (tid - lane) * 12;\n"
        f"  for (int i = 0; i < 8; ++i) w[lane * 12 + i] = {_widen(at, 'a[ao + i]')};\n"
        f"  for (int i = 0; i < 4; ++i) w[lane * 12 + 8 + i] = {_widen(at, 'b[bo + i]')};\n"
        f"  barrier(CLK_LOCAL_MEM_FENCE);\n  float r[4];\n"
        f"  for (int i = 0; i < 4; ++i) {{\n"
        f"    int row = lane / 4 + 8 * (i / 2), n = 2 * (lane % 4) + i % 2;\n    float s = c[co + i];\n"
        f"    for (int k = 0; k < 16; ++k)\n"
        f"      s += w[((row % 8) * 4 + (k % 8) / 2) * 12 + k % 2 + 2 * (row / 8) + 4 * (k / 8)]\n"
        f"           * w[(n * 4 + (k % 8) / 2) * 12 + 8 + k % 2 + 2 * (k / 8)];\n"
        f"    r[i] = s;\n  }}\n  barrier(CLK_LOCAL_MEM_FENCE);\n"
        f"  for (int i = 0; i < 4; ++i) c[co + i] = r[i];\n}}\n"
        f"#define {helper}(c, co, a, ao, b, bo) {helper}_x(c, co, a, ao, b, bo, {_MMA_SCRATCH})\n")
    return tirx.call_extern("void", helper, c, co, a, ao, b, bo)


def _ldmatrix_call(call):
    """The emulation of ``ptx_legacy.ldmatrix`` (``.x4``, not transposed, 16-bit elements): each lane
    names one row of 8 elements in shared memory (lanes 8j to 8j+7 the rows of matrix j) and receives
    elements ``2c, 2c+1`` of row ``g`` of each matrix j (``g = lane / 4``, ``c = lane % 4``) in its slots
    ``2j, 2j+1``. Through the ``__local`` scratch of ``_mma_call`` (as float values: exact) and two
    barriers, so, as for mma, every thread of the block must reach it. The source is ``&buf[i]`` (passed
    on as the array and ``i``) or an array and an offset; in bfloat16 kernels the OpenCL build keeps
    shared arrays as float values and local ones as the 16 bits (uint16), hence the conversions."""
    from tvm import tirx

    trans, num, _type, local, local_off, smem, smem_off = call.args
    if getattr(smem, "op", None) is not None and smem.op.name == "tirx.address_of":
        load = smem.args[0]  # (typed float32 by the bfloat16 legalization: its address would count 4 bytes)
        smem, smem_off, st = load.source.data, load.indices[0] + smem_off, str(load.source.dtype)
    else:
        st = str(_buffer(smem).dtype)
    dt = str(_buffer(local).dtype)
    if bool(trans) or int(num) != 4 or {st, dt} - {"float16", "uint16", "float32"}:
        raise NotImplementedError(f"ldmatrix trans={trans} x{num} from {st} to {dt}")
    sc, dc = _CL_TYPES[st], _CL_TYPES[dt]
    into = "(ushort)(as_uint(v) >> 16)" if dc == "ushort" and sc != "ushort" else f"({dc})v"  # bfloat16 bits
    helper = f"ferrum_ldmatrix_x4_{sc}_{dc}"
    _wmma_helpers[helper] = (
        f"void {helper}_x({dc}* d, int doff, __local {sc}* s, int soff, __local float* x) {{\n"
        f"  {_LOCAL_TID}"
        f"  int lane = tid % 32;\n  __local float* w = x + (tid - lane) * 12;\n"
        f"  for (int i = 0; i < 8; ++i) w[lane * 12 + i] = {_widen(sc, 's[soff + i]')};\n"
        f"  barrier(CLK_LOCAL_MEM_FENCE);\n  {dc} r[8];\n"
        f"  for (int j = 0; j < 4; ++j)\n    for (int e = 0; e < 2; ++e) {{\n"
        f"      float v = w[(j * 8 + lane / 4) * 12 + 2 * (lane % 4) + e];\n      r[2 * j + e] = {into};\n    }}\n"
        f"  barrier(CLK_LOCAL_MEM_FENCE);\n"
        f"  for (int i = 0; i < 8; ++i) d[doff + i] = r[i];\n}}\n"
        f"#define {helper}(d, doff, s, soff) {helper}_x(d, doff, s, soff, {_MMA_SCRATCH})\n")
    return tirx.call_extern("void", helper, local, local_off, smem, smem_off)


def _shuffle_xor_call(call):
    """The emulation of ``tvm_warp_shuffle_xor(mask, value, lane_mask, width, warp_size)`` (a full warp,
    a float32 value): through the ``__local`` scratch of ``_mma_call`` and two barriers, so, as for mma,
    every thread of the block must reach it."""
    from tvm import tirx

    _mask, value, lane_mask, width, warp_size = call.args
    if str(call.ty) != "float32" or width.value != 32 or warp_size.value != 32:
        raise NotImplementedError(f"warp shuffle of {call.ty} over {width} lanes")
    helper = "ferrum_shfl_xor_f32"
    _wmma_helpers[helper] = (
        f"float {helper}_x(float v, int m, __local float* x) {{\n"
        f"  {_LOCAL_TID}"
        f"  x[tid] = v;\n  barrier(CLK_LOCAL_MEM_FENCE);\n  float r = x[tid ^ m];\n"
        f"  barrier(CLK_LOCAL_MEM_FENCE);\n  return r;\n}}\n"
        f"#define {helper}(v, m) {helper}_x(v, m, {_MMA_SCRATCH})\n")
    return tirx.call_extern("float32", helper, value, lane_mask)


def _no_grid_dependency(call):
    """``griddepcontrol`` (programmatic dependent launch, CUDA sm_90) has nothing to wait for here: one
    kernel runs at a time. A call of an empty helper keeps its place in the code."""
    from tvm import tirx

    _wmma_helpers["ferrum_griddepcontrol"] = "void ferrum_griddepcontrol(void) {}\n"
    return tirx.call_extern("void", "ferrum_griddepcontrol")


@functools.cache
def _emulate_wmma() -> None:
    """Lower the wmma intrinsics of OpenCL builds (ours only) to ``_wmma_call``'s helpers, and
    ``griddepcontrol`` to nothing (``_no_grid_dependency``)."""
    from tvm.tirx.op import register_intrin_lowering

    for op in ("tvm_fill_fragment", "tvm_load_matrix_sync", "tvm_store_matrix_sync", "tvm_mma_sync"):
        register_intrin_lowering(f"tirx.{op}", "opencl", f=_wmma_call, level=99)
    register_intrin_lowering("tirx.ptx.griddepcontrol", "opencl", f=_no_grid_dependency, level=99)
    register_intrin_lowering("tirx.ptx_legacy.mma", "opencl", f=_mma_call, level=99)
    register_intrin_lowering("tirx.ptx_legacy.ldmatrix", "opencl", f=_ldmatrix_call, level=99)
    register_intrin_lowering("tirx.tvm_warp_shuffle_xor", "opencl", f=_shuffle_xor_call, level=99)


def _static_shared(script: str):
    """The PrimFunc of TVMScript ``script`` with its dynamic shared memory made static. TVM merges dynamic
    shared buffers into one byte array addressed per element type, which float storage for half
    (``_HALF_AS_FLOAT``) would misplace, and its OpenCL code declares that array without ``__local``."""
    import tvm

    return tvm.script.from_source(script.replace('"shared.dyn"', '"shared"'))


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

    _emulate_wmma()
    _wmma_helpers.clear()
    script = func.script()
    if '"shared.dyn"' in script:  # dlight's matmul tiles: one static __local array each (see _static_shared)
        func = _static_shared(script)
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with tvm.transform.PassContext(instruments=[_Capture()]):
        lib = tvm.tirx.build(mod, target=tvm.target.Target(TARGET, host="llvm"))
    source = _HALF_AS_FLOAT + "".join(_wmma_helpers.values()) + _FP16_PRAGMA.sub("", lib.imports[0].inspect_source())
    # TVM writes a 32-bit reinterpret as a pointer pun, ``(*(float *)(&(v)))``: undefined behaviour in C
    # (strict aliasing) that an optimiser may break; OpenCL's ``as_float`` is the same bits, defined (nvcc
    # reads the pun as a register move)
    source = _PUN.sub(lambda m: f"as_{m.group(1)}({m.group(2)})", source)
    if any(_MMA_SCRATCH in h for h in _wmma_helpers.values()):  # every kernel declares the mma scratch
        source = re.sub(r"(__kernel void\b[^{]*\{)", rf"\1\n  __local float {_MMA_SCRATCH}[{MMA_THREADS * 12}];",
                        source)
    if "(*(half2 *)(&(" in source:  # a float16 pair from its bits: with half stored as float, a pun reads 8
        source = _HALF2_BITS + _HALF2_PUN.sub(lambda m: f"ferrum_half2_bits({m.group(1)})", source)  # bytes
    for name, helper in (("__dp4a", _DP4A), ("__byte_perm", _BYTE_PERM), ("__threadfence", _THREADFENCE)):
        if f"{name}(" in source:  # CUDA intrinsics, defined here (OpenCL reserves names beginning with __)
            source = helper + source.replace(f"{name}(", f"ferrum_{name[2:]}(")
    source = source.replace("atomicAdd(", "atomic_add(")  # 32-bit integers in global memory: OpenCL 1.1's
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


_builds: dict[int, tuple] = {}  # hash(func) (its object's address) -> (func, build(func) + its OpenCL kernels)


def _built(func) -> tuple:
    """``build(func)`` and its OpenCL kernels by name, made once per PrimFunc (a model's layers call the same
    kernels, each test a few times)."""
    hit = _builds.get(hash(func))
    if hit is None or not hit[0].same_as(func):
        if len(_builds) >= 256:
            _builds.clear()
        cl, ctx = _cl()
        source, host, lets, launches = build(func)
        program = cl.Program(ctx, source).build(options=BUILD_OPTIONS)
        kernels = {name: cl.Kernel(program, name) for name, *_ in launches}
        hit = _builds[hash(func)] = (func, (source, host, lets, launches, kernels))
    return hit[1]


def run(func, *arrays) -> None:
    """Run ``func`` on ``arrays`` (its parameters in order: numpy arrays, C-contiguous, or ints for scalar
    parameters), writing outputs in place."""
    import tvm
    from tvm import tirx

    cl, ctx = _cl()
    source, host, lets, launches, kernels = _built(func)
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
    # what the device holds: float16 arrays as float32 (see _HALF_AS_FLOAT)
    held = {id(a): a.astype(np.float32) if a.dtype == np.float16 else a for a in tensors}
    buffers = {id(a): cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR,
                                hostbuf=held[id(a)] if a.size else np.zeros(1, held[id(a)].dtype))
               for a in tensors}
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
        kernels[name](queue, tuple(gi * bi for gi, bi in zip(g, b)), tuple(b), *cl_args)
    for a in tensors:
        if a.size:
            cl.enqueue_copy(queue, held[id(a)], buffers[id(a)])
    queue.finish()
    for a in tensors:
        if a.dtype == np.float16 and a.size:
            a[...] = held[id(a)]  # rounded to half, as the device would store it


def gpu_module(relax_mod, arch: str = "sm_80"):
    """``relax_mod`` (from ``lowering.lower(graph, "gpu")``) after the CUDA pipeline's legalization and
    scheduling passes (dlight included) and its reshape rewrite: Relax functions calling thread-bound
    PrimFuncs, as the CUDA build compiles them, before memory planning."""
    import tvm
    from tvm.relax.backend.cuda import pipeline

    # dlight imports TVM's tensor intrinsics when it first tensorizes; the test session parses them with
    # ferrum_compiler.tvmscript.quick_frames (tests/conftest.py), so that import costs seconds, not 25 s
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

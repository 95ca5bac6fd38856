"""Building CUDA libraries on a machine without a GPU (DESIGN §7).

TVM embeds CUDA *source* instead of a compiled fatbin unless its CUDA runtime library is loaded, and
that library links the driver's ``libcuda.so.1``, absent without a GPU. We preload the CUDA runtime
from the toolkit and, when no driver is installed, a stub ``libcuda.so.1`` exporting the ``cu*``
symbols TVM imports (never called while compiling). Then nvcc compiles the kernels to a fatbin.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from ferrum_runtime.env import cache_dir
from ferrum_runtime.errors import FerrumError


class GpuBuildError(FerrumError):
    """The CUDA toolchain needed to build a GPU artifact is missing."""


def _cuda_home() -> Path | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").is_file():
            return Path(cand)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def _stub_driver(runtime_cuda: Path) -> Path:
    cache = cache_dir() / "cuda-driver-stub"
    lib = cache / "libcuda.so.1"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(runtime_cuda)], capture_output=True, text=True,
                               check=True).stdout
    symbols = sorted(set(re.findall(r"\bU (cu[A-Z]\w*)$", undefined, re.M)))
    src = cache / "stub.c"
    src.write_text("".join(f"int {s}(void) {{ return 999; }}\n" for s in symbols))
    tmp = cache / f"libcuda.so.1.{os.getpid()}"
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)], check=True)
    os.replace(tmp, lib)
    return lib


def preload_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (dlight's matmul rule imports it on first use) in seconds instead
    of half a minute: its hundreds of ``@T.prim_func`` definitions are parsed with ``quick_frames``."""
    import sys

    from .tvmscript import quick_frames

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with quick_frames():
        import tvm.s_tir.tensor_intrin  # noqa: F401


def prepare_cuda_build() -> None:
    """Make ``tvm.compile`` emit a fatbin compiled by nvcc, GPU or not."""
    from tvm.base import _LOADED_LIBS

    home = _cuda_home()
    if home is None:
        raise GpuBuildError("CUDA targets need nvcc (CUDA toolkit 12 or newer): install it or set CUDA_HOME")
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    os.environ["PATH"] = f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        from tvm_ffi.libinfo import load_lib_ctypes

        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        runtime_cuda = runtime_dir / "libtvm_runtime_cuda.so"
        cudart = sorted((home / "lib64").glob("libcudart.so.*")) or sorted((home / "lib").glob("libcudart.so.*"))
        if not cudart:
            raise GpuBuildError(f"no libcudart.so in {home}/lib64; reinstall the CUDA toolkit or set CUDA_HOME")
        ctypes.CDLL(str(cudart[-1]), mode=ctypes.RTLD_GLOBAL)
        try:
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            ctypes.CDLL(str(_stub_driver(runtime_cuda)), mode=ctypes.RTLD_GLOBAL)
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_LOCAL",
                                                           extra_lib_paths=[runtime_dir])
    import tvm.support.nvcc  # noqa: F401  (registers TVM's compile callback, which we then replace)
    import tvm_ffi

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_cubin_and_ptx, override=True)


def _compile_cubin_and_ptx(code: str) -> bytes:
    """nvcc → a fatbin holding the cubin for the target's arch and its PTX, so a newer GPU can JIT the PTX
    (TVM's own callback embeds the cubin only). The flags are those of TVM's nvcc path (half and bfloat16
    operators, fast math, ptxas's register-usage level 10); ptxas's report of each kernel's registers,
    shared memory, stack and spills goes to the ``kernel_usage()`` being recorded, if any."""
    import tvm

    num = _sm(str(tvm.target.Target.current().arch))  # 90 for sm_90
    home = _cuda_home()
    no = [f"-U__CUDA_NO_{kind}_{what}__" for kind in ("HALF", "BFLOAT16", "BFLOAT162")
          for what in ("OPERATORS", "CONVERSIONS")]
    with tempfile.TemporaryDirectory(prefix="ferrum-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        cmd = [str(home / "bin" / "nvcc") if home else "nvcc", "--fatbin", "-O3",
               "-gencode", f"arch=compute_{num},code=sm_{num}", "-gencode", f"arch=compute_{num},code=compute_{num}",
               *no, "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
               "--ptxas-options=-v,--register-usage-level=10,--warn-on-local-memory-usage", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise GpuBuildError(f"nvcc failed on the generated CUDA code: {(proc.stdout + proc.stderr)[-3000:]}")
        if _recording:
            _recording[-1].extend(ptxas_usage(proc.stdout + proc.stderr))
        return out.read_bytes()


_recording: list[list[dict]] = []  # the open ``kernel_usage()`` lists, innermost last


@contextlib.contextmanager
def kernel_usage() -> Iterator[list[dict]]:
    """Record ``ptxas_usage`` of every CUDA kernel compiled inside the block into the list it yields."""
    usage: list[dict] = []
    _recording.append(usage)
    try:
        yield usage
    finally:
        _recording.remove(usage)


_PTXAS_LINE = re.compile(r"Compiling entry function '(?P<name>[^']+)' for 'sm_"
                         r"|(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                         r"(?P<loads>\d+) bytes spill loads"
                         r"|Used (?P<regs>\d+) registers(?:, used \d+ barriers)?(?:, (?P<smem>\d+) bytes smem)?")


def ptxas_usage(log: str) -> list[dict]:
    """Per kernel of a ``ptxas -v`` log, ``{name, registers, shared, stack, spill_stores, spill_loads}``
    (bytes; a stack frame is local memory: spills, or arrays indexed at run time)."""
    kernels: list[dict] = []
    for m in _PTXAS_LINE.finditer(log):
        if m["name"]:
            kernels.append({"name": m["name"], "registers": 0, "shared": 0, "stack": 0, "spill_stores": 0,
                            "spill_loads": 0})
        elif kernels and m["stack"]:
            kernels[-1].update(stack=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
        elif kernels and m["regs"]:
            kernels[-1].update(registers=int(m["regs"]), shared=int(m["smem"] or 0))
    return kernels


def usage_summary(usage: list[dict]) -> dict:
    """The manifest's record of a CUDA library's kernels: how many, the most registers one uses, and the
    kernels that use local memory (``{name: stack bytes}``: each access a trip to memory, if cached)."""
    return {"kernels": len(usage), "max_registers": max((k["registers"] for k in usage), default=0),
            "local_memory": {k["name"]: k["stack"] for k in usage if k["stack"] or k["spill_stores"]}}


# What every device kernel must respect, checked on the scheduled kernels (before codegen). Shared memory:
# the per-block maximum with the dynamic opt-in, which TVM's CUDA runtime requests for kernels above 48 KiB
# (A100 163 KiB, sm_86/89 99 KiB, H100 227 KiB); Metal gives 32 KiB of threadgroup memory.
_CUDA_THREADS = {"max_threads_per_block": 1024, "max_thread_x": 1024, "max_thread_y": 1024, "max_thread_z": 64,
                 "max_vector_bytes": 16}
CUDA_SHARED_BYTES = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
METAL_LIMITS = {"max_threads_per_block": 1024, "max_thread_x": 1024, "max_thread_y": 1024, "max_thread_z": 1024,
                "max_shared_memory_per_block": 32 * 1024, "max_vector_bytes": 16}


def gpu_limits(kind: str, arch: str | None = None) -> dict:
    if kind == "metal":
        return dict(METAL_LIMITS)
    return {**_CUDA_THREADS, "max_shared_memory_per_block": CUDA_SHARED_BYTES.get(arch or "", 48 * 1024)}


def _threads_within(func, limits: dict) -> bool:
    """Thread-block extents against the limits (TVM 0.27's verifier checks memory and vector widths but let
    a 2048-thread block through). Read from the kernel's TVMScript: every extent must be a constant."""
    extents = {"x": 1, "y": 1, "z": 1}
    for axis, value in re.findall(r'T\.launch_thread\("threadIdx\.([xyz])", (?:T\.int\d+\()?(\w+)\)?\)',
                                  func.script()):
        if not value.isdigit():
            return False
        extents[axis] = int(value)
    return all(extents[a] <= limits[f"max_thread_{a}"] for a in "xyz") and \
        extents["x"] * extents["y"] * extents["z"] <= limits["max_threads_per_block"]


class GpuCodeVerifier:
    """A pass instrument for ``tvm.compile``: right after the host/device split, every device kernel goes
    through TVM's GPU code verifier (memory, vector widths) and our thread-block check with the target's
    ``gpu_limits``. ``report()`` gives the result."""

    def __init__(self, kind: str, arch: str | None = None):
        import tvm

        self.limits = gpu_limits(kind, arch)
        self.checked: list[str] = []
        self.failed: list[str] = []
        verifier = self

        @tvm.ir.instrument.pass_instrument
        class _Instrument:
            def run_after_pass(self, mod, info):
                if info.name == "tirx.SplitHostDevice":
                    verifier._check(mod)

        self.instrument = _Instrument()

    def _check(self, mod) -> None:
        import tvm
        from tvm.s_tir.analysis import verify_gpu_code

        for gv, func in mod.functions.items():
            target = func.attrs.get("target") if func.attrs is not None else None
            # device kernels only: the host functions that launch them keep a GPU target with a host
            if target is None or target.kind.name not in ("cuda", "metal") or target.host is not None:
                continue
            self.checked.append(gv.name_hint)
            # the verifier needs constant launch extents: the grid may follow the batch (a scalar param),
            # so fix every integer param at 1 (per-block limits do not depend on the grid)
            scalars = {p: tvm.tirx.const(1, p.ty.dtype) for p in func.params
                       if type(p.ty).__name__ == "PrimType" and str(p.ty.dtype).startswith("int")}
            if scalars:
                func = func.specialize(scalars)
                func = tvm.tirx.transform.StmtSimplify()(tvm.IRModule({"f": func}))["f"]
            if not verify_gpu_code(func, self.limits) or not _threads_within(func, self.limits):
                self.failed.append(gv.name_hint)

    def report(self) -> dict:
        return {"kernels": len(self.checked), "failed": sorted(self.failed), "limits": self.limits}


# Programmatic dependent launch (sm_90+; FERRUM_PDL at compile, an experiment). A kernel launched with
# CUDA's programmatic-stream-serialization attribute may start while the kernel before it in the stream
# still runs, once every block of that one has executed ``griddepcontrol.launch_dependents``; its own
# ``griddepcontrol.wait`` then blocks until that kernel has finished and its writes are visible. Every
# kernel here waits before its first instruction and then lets its successor launch: the stream's order
# is kept (nothing is read or written before the wait), but the next kernel's launch and block dispatch
# overlap this one's run instead of following its end. Schedules built with ``pdl`` (the decode GEMVs,
# the split attention) wait later, after reading only what no kernel writes (weights, the step's inputs),
# and let their successor launch first thing (FERRUM_PDL=1) or right after their wait (``late``); with
# ``first`` they are built without the early reads and wait first like the rest. A decode step is ~300-400
# short kernels, and the H200 profile (docs/bench/2026-11-26d-gpu-h200.md) put ~0.37 ms of a 3.1 ms float16
# step between them. On an H200 on 2026-11-27 FERRUM_PDL=1 gave wrong logits (docs/bench/2026-11-27-gpu-h200.md):
# the SASS, read later that day, showed ptxas issuing GEMVs' activation loads (read-only, so non-coherent)
# before the wait; kernels here are no longer ``__restrict__``, which puts them after it (unmeasured on a GPU).
# ``late`` and ``first`` stay as checks.
PDL_TAG = "tirx.use_programtic_dependent_launch"  # TVM's spelling (runtime/metadata.h)
PDL_PIPELINE = "ferrum-pdl"
PDL_MIN_ARCH = 90


def _sm(arch: str) -> int:
    """90 for ``sm_90``."""
    return int(arch.removeprefix("sm_"))


def supports_programmatic_launch(tvm_target: dict) -> bool:
    """Whether a target's kernels can be programmatic dependent launches: CUDA from sm_90 on."""
    return tvm_target["kind"] == "cuda" and _sm(str(tvm_target["arch"])) >= PDL_MIN_ARCH


def _griddepcontrol(action: str):
    import tvm

    return tvm.tirx.Evaluate(tvm.tirx.call_intrin("", "tirx.ptx.griddepcontrol", action, ""))


def with_programmatic_launch(func):
    """A CUDA device kernel (after the host/device split) launched with programmatic stream serialization:
    ``wait`` (unless the kernel has its own) then ``launch_dependents`` (unless it has its own) first in its
    body (inside the thread bindings that open it, if any), the launch tag among its
    ``tirx.kernel_launch_params`` (before the dynamic shared memory tag, which must stay last), and its
    pointers not ``__restrict__`` (``tirx.noalias`` off)."""
    import tvm

    params = [str(p) for p in func.attrs["tirx.kernel_launch_params"]]
    if PDL_TAG in params:
        return func
    dyn = "tirx.use_dyn_shared_memory"
    params = [p for p in params if p != dyn] + [PDL_TAG] + ([dyn] if dyn in params else [])

    # a schedule that waits itself (``make_gemv_gpu(pdl=...)``: weight loads, which no kernel writes, first)
    # and, in FERRUM_PDL's ``late`` mode, lets the next kernel launch itself, right after that wait
    script = func.script()
    first = ([] if 'griddepcontrol("launch_dependents"' in script else
             ["launch_dependents"] if 'griddepcontrol("wait"' in script else ["wait", "launch_dependents"])

    def prepend(stmt):
        if isinstance(stmt, tvm.tirx.AttrStmt) and stmt.attr_key == "thread_extent":
            return tvm.tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, prepend(stmt.body))
        return tvm.tirx.SeqStmt([*(_griddepcontrol(a) for a in first), stmt])

    # and no ``__restrict__`` on its pointers: nvcc loads what a restrict kernel only reads through the
    # non-coherent path (ld.global.nc), which promises that the data stays unchanged while the kernel runs,
    # and ptxas then moves such loads above ``griddepcontrol.wait`` (the SASS of Qwen3-4B's q|k|v GEMV,
    # 2026-11-27: its activation load issued with the weights', before the wait): the wrong logits of
    # FERRUM_PDL on the H200. Without it the activations are loaded after the wait.
    return (func.with_body(prepend(func.body) if first else func.body)
            .with_attr("tirx.kernel_launch_params", params).with_attr("tirx.noalias", False))


def _programmatic_launch_pass():
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ferrum.ProgrammaticLaunch")
    def apply(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            target = func.attrs.get("target") if isinstance(func, tvm.tirx.PrimFunc) and func.attrs else None
            if target is not None and target.kind.name == "cuda" and "tirx.kernel_launch_params" in func.attrs:
                updates[gv] = with_programmatic_launch(func)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return apply


def register_programmatic_launch_pipeline() -> str:
    """Register (once) the TIR pipeline ``tvm.compile(tir_pipeline=PDL_PIPELINE)`` takes: TVM's default one
    for GPUs, then every CUDA kernel made a programmatic launch (``with_programmatic_launch``)."""
    import tvm
    from tvm.tirx import compilation_pipeline

    def factory():
        base, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("default")
        return tvm.transform.Sequential([base, _programmatic_launch_pass()]), finalize_host, finalize_device

    compilation_pipeline.register_tir_pipeline(PDL_PIPELINE, factory)
    return PDL_PIPELINE

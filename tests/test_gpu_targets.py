"""GPU targets build on this CPU-only machine: CUDA artifacts hold an nvcc-compiled cubin for the
named arch (no CUDA source), Metal artifacts hold Metal source. Compiled through the CLI in a
subprocess, as CI would. Running them needs a GPU (tests marked ``gpu``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from ferrum_runtime.fatbin import embedded_cuda_code

from ferrum_compiler.gpu_build import PDL_TAG, _compile_cubin_and_ptx, kernel_usage, usage_summary

from .test_cli import assert_one_line_error, ferrum

pytestmark = pytest.mark.e2e

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                                reason="nvcc not installed")


@needs_nvcc
@pytest.mark.parametrize("family,target,quant,pdl,norms,mma,flash,gemm,kv,merged", [
    ("qwen3-wide", "cuda-sm90", "auto", False, False, "", True, True, "float16", False),
    ("llama-wide", "cuda-sm80", "q4", False, False, "decode", False, True, "float16", False),
    ("qwen2", "cuda-sm86", "auto", False, True, "", False, False, "float32", False),
    ("qwen3-moe", "cuda-sm90", "q4", True, False, "", False, False, "float16", True),
    ("mixtral", "cuda-sm89", "q4", False, False, "", False, False, "float16", True)])
def test_cuda_artifact_holds_cubin_for_its_arch(family, target, quant, pdl, norms, mma, flash, gemm, kv, merged,
                                                tiny_model_dir, tmp_path):
    """... and, with FERRUM_PDL=1 (the MoE model: dense, INT4 and grouped GEMVs), every kernel is a
    programmatic dependent launch that nvcc compiled; with FERRUM_GEMV_NORMS=1 (Qwen2: q|k|v with a bias)
    the GEMVs that begin and finish a deferred norm are compiled and verified too; with
    FERRUM_MMA_LINEAR=decode (Llama on sm_80, the oldest arch with the mma; widths INT4's 128-column steps
    divide) the many-token linears on tensor-core mma's, INT4 and the dense lm_head, and with FERRUM_MMA_GEMM=1
    forward's INT4 linears on the mma GEMM; with FERRUM_FLASH_ATTENTION=1 and FERRUM_MMA_GEMM=1 (Qwen3,
    head_dim 32, widths 128 and 256 that the GEMM's 128-output tiles divide) forward's one-pass mma
    attention and its dense linears on the mma GEMM; with a float32 KV cache
    (Qwen2) the wmma attention staging it 16 bytes a load (8 float32 a load failed the verifier until
    2026-11-27). Every model file
    compiles for a CUDA arch here (Mixtral with --quant q4: its down experts stay dense, 48 columns being
    no whole group; Mistral, llama.py's with a sliding window, was sm_89's before Mixtral took its place
    for CI time: the window's GPU kernels run in tests/test_gpu_kernels.py). With FERRUM_MERGED_ATTENTION=1
    (the MoE model, with PDL too, and Mixtral) the decode entries' split attention merges itself (its
    ``atomicAdd`` and ``__threadfence`` compiled by nvcc) and no merge kernel is left."""
    out = tmp_path / "art"
    res = ferrum("compile", tiny_model_dir(family), "--target", target, "--quant", quant, "--kv-dtype", kv, "-o", out,
                 env={"FERRUM_PDL": "1" if pdl else "", "FERRUM_GEMV_NORMS": "1" if norms else "",
                      "FERRUM_MMA_LINEAR": mma, "FERRUM_FLASH_ATTENTION": "1" if flash else "",
                      "FERRUM_MMA_GEMM": "1" if gemm else "", "FERRUM_MERGED_ATTENTION": "1" if merged else ""})
    assert res.returncode == 0, res.stderr[-3000:]
    arch = "sm_" + target.removeprefix("cuda-sm")
    code = embedded_cuda_code(out / "model.so")
    assert code["cubin"] == [arch] and code["ptx"] == ["compute_" + arch.removeprefix("sm_")]  # PTX for newer GPUs
    lib = (out / "model.so").read_bytes()
    assert b"__global__" not in lib and b"extern \"C\"" not in lib  # compiled, not embedded source
    manifest = yaml.safe_load((out / "ferrum.yaml").read_text())
    assert manifest["target"]["cuda_code"]["cubin"] == [arch] and manifest["dtype"] == "float16"
    assert manifest["kv_cache"]["dtype"] == kv
    shown = ferrum("inspect", out).stdout
    assert "cubin: " + arch in shown
    verified = manifest["target"]["gpu_code_verified"]  # every kernel within the arch's thread/shared limits
    assert verified["kernels"] >= 8 and verified["failed"] == []
    # ptxas's report of every kernel it compiled (some tiny shapes spill a word: not asserted away here)
    kernels = manifest["target"]["cuda_kernels"]
    assert kernels["kernels"] == verified["kernels"] and 16 <= kernels["max_registers"] <= 255
    assert all(b > 0 for b in kernels["local_memory"].values())
    assert f"kernels: {kernels['kernels']}, <= {kernels['max_registers']} registers, " in shown
    # the decode entry point: same arguments, GEMV kernels (compiled into the cubin too)
    entries = manifest["entry_points"]
    assert entries["decode"]["max_tokens"] == 16 and entries["decode"]["args"] == entries["forward"]["args"]
    assert entries["decode_one"] == {**entries["forward"], "max_tokens": 1}  # GEMVs in passes of one token
    assert entries["decode_one_graph"] == {**entries["decode_one"], "max_blocks": entries["decode_graph"]["max_blocks"]}
    assert b"gemv" in lib and b"attention_split" in lib and b"add_rms_norm" in lib
    # FERRUM_MERGED_ATTENTION: the split kernels merge themselves (forward's attention is the tensor-core one)
    assert (b"_merged" in lib, b"attention_merge" in lib) == (merged, not merged)
    assert bool(manifest["compile_options"].get("merged_attention")) == merged
    assert ("decode's split attention merging itself (FERRUM_MERGED_ATTENTION)" in shown) == merged
    # forward's attention on tensor cores (head_dim 16 and 32 fit the wmma tile, 32 the flash one)
    assert (b"attention_tc" in lib, b"attention_fa" in lib) == (not flash, flash)
    assert bool(manifest["compile_options"].get("flash_attention")) == flash
    assert ("forward's attention in one pass on mma.sync (FERRUM_FLASH_ATTENTION)" in shown) == flash
    # ... and its linears (q|k|v, o, gate|up, down; not the lm_head) on the mma GEMM: dense, or INT4
    assert bool(manifest["compile_options"].get("mma_gemm")) == gemm and (b"mma_gemm" in lib) == gemm
    assert ("forward's linears on the mma.sync GEMM (FERRUM_MMA_GEMM)" in shown) == gemm
    assert bool(re.search(rb"mma_gemm_\d+_\d+_QuantFormat", lib)) == (gemm and quant == "q4")
    # ... and forward with the split-KV attention for wide steps of one decode token per sequence
    assert entries["decode_wide"] == {**entries["forward"], "decode_only": True}
    assert entries["decode_wide_graph"] == {**entries["decode_wide"], "max_tokens": 64,
                                            "max_blocks": entries["decode_graph"]["max_blocks"]}
    assert "decode_wide(same, split-KV attention)" in shown and "decode_wide_graph(same, CUDA graphs)" in shown
    # tokens picked on the device: greedy and sampled
    assert entries["argmax"]["returns"]["dtype"] == "int32" and [a["name"] for a in entries["sample"]["args"]] == [
        "logits", "params", "uniform"]
    assert b"argmax" in lib and b"sample" in lib
    assert "decode(same) for batches of <= 16 tokens" in shown
    # decode again as CUDA graphs: one capture per step shape, blocks planned for the model's full length
    assert entries["decode_graph"]["args"] == entries["forward"]["args"] and entries["decode_graph"]["max_blocks"] == \
        -(-manifest["model"]["max_model_len"] // manifest["kv_cache"]["block_size"])
    assert b"vm.builtin.cuda_graph.run_or_capture" in lib
    if quant == "q4":  # dequantizing matmuls were compiled for the GPU too
        assert manifest["quantization"]["method"] == "rtn-q4" and manifest["ir"]["ops"]["qlinear"] > 0
    # one launch tag per kernel (TVM's function table in the library), none without FERRUM_PDL
    assert lib.count(PDL_TAG.encode()) == (verified["kernels"] if pdl else 0)
    assert manifest["compile_options"].get("pdl", "") == ("early" if pdl else "")  # FERRUM_PDL=1's mode
    assert ("programmatic dependent launches (FERRUM_PDL, early)" in shown) == pdl
    assert bool(manifest["compile_options"].get("gemv_norms")) == norms
    assert ("norms deferred into the decode GEMVs (FERRUM_GEMV_NORMS)" in shown) == norms
    assert (b"norm_next" in lib and b"norm_parts" in lib) == norms
    assert manifest["compile_options"].get("mma_linear", "") == mma and (b"mma_linear" in lib) == bool(mma)
    if mma:  # INT4 (its QuantFormat in the kernel's name) and dense (the lm_head)
        assert re.search(rb"mma_linear_\d+_\d+_QuantFormat", lib) and re.search(rb"mma_linear_\d+_\d+_None", lib)
    assert (f"tensor-core mma's (FERRUM_MMA_LINEAR, {mma})" in shown) == bool(mma)


@needs_nvcc
def test_ptxas_reports_each_kernels_registers_and_local_memory():
    """The nvcc callback keeps ptxas's report per kernel: a kernel indexing a local array at run time is
    in local memory (the manifest's ``cuda_kernels`` names it), a plain one is not."""
    import tvm

    code = """
extern "C" __global__ void indexed(float* out, const float* x, int n) {
  float a[256];
  for (int i = 0; i < 256; ++i) a[i] = x[(i * n + threadIdx.x) % 1000];
  out[threadIdx.x] = a[(n * threadIdx.x) % 256];
}
extern "C" __global__ void plain(float* out, const float* x) {
  __shared__ float s[64];
  s[threadIdx.x % 64] = x[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64] * 2.0f;
}
"""
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}), kernel_usage() as usage:
        fatbin = _compile_cubin_and_ptx(code)
    assert fatbin[:4] == b"\x50\xed\x55\xba"
    by = {k["name"]: k for k in usage}
    assert set(by) == {"indexed", "plain"}
    assert by["indexed"]["stack"] >= 1024 and by["plain"]["stack"] == 0
    assert by["plain"]["shared"] == 256 and by["plain"]["registers"] > 0 and by["indexed"]["registers"] > 0
    assert usage_summary(usage) == {"kernels": 2, "max_registers": max(k["registers"] for k in usage),
                                    "local_memory": {"indexed": by["indexed"]["stack"]}}


def test_pdl_needs_sm90(tiny_model_dir, tmp_path):
    res = ferrum("compile", tiny_model_dir("qwen3"), "--target", "cuda-sm89", "-o", tmp_path / "art",
                 env={"FERRUM_PDL": "1"})
    assert_one_line_error(res, "FERRUM_PDL needs --target cuda-sm90", "unset FERRUM_PDL")


def test_mma_linear_mode_must_be_known_and_not_beside_deferred_norms(tiny_model_dir, tmp_path):
    res = ferrum("compile", tiny_model_dir("qwen3"), "--target", "cuda-sm90", "-o", tmp_path / "art",
                 env={"FERRUM_MMA_LINEAR": "all"})
    assert_one_line_error(res, "FERRUM_MMA_LINEAR=all is not a mode", "use 1 (wide) or decode")
    res = ferrum("compile", tiny_model_dir("qwen3"), "--target", "cuda-sm90", "-o", tmp_path / "art",
                 env={"FERRUM_MMA_LINEAR": "decode", "FERRUM_GEMV_NORMS": "1"})
    assert_one_line_error(res, "FERRUM_MMA_LINEAR=decode and FERRUM_GEMV_NORMS=1 do not combine", "unset one")


def test_pdl_mode_must_be_known(tiny_model_dir, tmp_path):
    res = ferrum("compile", tiny_model_dir("qwen3"), "--target", "cuda-sm90", "-o", tmp_path / "art",
                 env={"FERRUM_PDL": "eager"})
    assert_one_line_error(res, "FERRUM_PDL=eager is not a mode", "use 1, late, first or deep")


def test_programmatic_launch_pass():
    """Every CUDA kernel of the module, after TVM's lowering: the launch tag (before the dynamic shared memory
    one, which the runtime wants last), then ``wait`` and ``launch_dependents`` before anything else; a GEMV
    built with ``pdl`` keeps its own wait, after its first weight loads, and gets no second one; the split
    attention built with ``pdl`` waits after reading the step's block tables and staging the cache rows of
    earlier steps: every cache load before its wait is under a test against ``fresh``, the step's first
    position of the sequence (that such loads read no row this step writes is run in
    test_gpu_kernels.py::test_split_attention_reads_only_older_rows_before_its_wait). Built with FERRUM_PDL's
    ``late`` mode, those two let the next kernel launch right after their wait instead of first thing."""
    import tvm
    from tvm.script import tirx as T

    from ferrum.schedules import paged_attention as pa
    from ferrum.schedules import quant_linear as ql
    from ferrum_compiler.gpu_build import register_programmatic_launch_pipeline
    from tvm.tirx.compilation_pipeline import get_tir_pipeline

    @T.prim_func(private=True)
    def staged(a: T.Buffer((256,), "float32"), b: T.Buffer((256,), "float32")):
        for bx in T.thread_binding(2, thread="blockIdx.x"):
            for tx in T.thread_binding(128, thread="threadIdx.x"):
                buf = T.alloc_buffer((128,), "float32", scope="shared.dyn")
                buf[tx] = a[bx * 128 + tx]
                T.tvm_storage_sync("shared.dyn")
                b[bx * 128 + tx] = buf[127 - tx]

    funcs = {"staged": staged,
             "gemv": ql.make_gemv_gpu(512, 64, None, "float16", "float16", "float16", None, tokens=1),
             **{f"{kind}_{mode}": make(mode) for mode in ("early", "late") for kind, make in (
                 ("gemv", lambda mode: ql.make_gemv_gpu(512, 64, ql.QuantFormat(4, 128, True), "", "float16",
                                                         "float16", None, tokens=1, pdl=mode)),
                 ("attention", lambda mode: pa.make_attention_gpu(32, 8, 128, 16, "float16", tile_tokens=1,
                                                                  pdl=mode)))}}
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name).with_attr("target", target)
                        for name, f in funcs.items()})
    lowered = get_tir_pipeline(register_programmatic_launch_pipeline())[0](mod)
    kernels = {gv.name_hint: f for gv, f in lowered.functions.items()
               if f.attrs is not None and "tirx.kernel_launch_params" in f.attrs}
    assert sorted(kernels) == ["attention_early_kernel", "attention_late_kernel", "gemv_early_kernel",
                               "gemv_kernel", "gemv_late_kernel", "staged_kernel"]
    for name, f in kernels.items():
        tags = [str(t) for t in f.attrs["tirx.kernel_launch_params"]]
        assert tags.count(PDL_TAG) == 1
        assert tags[-1] == "tirx.use_dyn_shared_memory" if name == "staged_kernel" else tags[-1] == PDL_TAG
        # the body's lines, without declarations: which come first
        lines = [ln.strip() for ln in f.script().splitlines()[4:]
                 if not re.search(r"decl_buffer|alloc_|launch_thread|T\.int64\(\)$", ln)]
        first = {key: next((i for i, ln in enumerate(lines) if re.search(pattern, ln)), None) for key, pattern in (
            ("wait", r'griddepcontrol\("wait"'), ("trigger", r'griddepcontrol\("launch_dependents"'),
            ("access", r"\w\["), ("weights", r"wq\["), ("x", r"xb\["), ("tables", r"block_tables\["),
            ("queries", r"\bq\["), ("cache", r"cache\["))}
        assert sum('griddepcontrol("wait"' in ln for ln in lines) == 1
        assert sum("griddepcontrol" in ln for ln in lines) == 2
        if name.endswith("_late_kernel"):  # the next kernel may launch right after the wait, not before it
            assert first["trigger"] == first["wait"] + 1
        if name in ("gemv_early_kernel", "gemv_late_kernel"):  # weight loads, the wait, the activations
            assert first["weights"] < first["wait"] < first["x"]
            assert first["trigger"] < first["weights"] if name == "gemv_early_kernel" else True
        elif name.startswith("attention_"):  # the step's block tables and older cache rows, the wait, queries
            assert first["tables"] < first["cache"] < first["wait"] < first["queries"]
            assert first["trigger"] < first["tables"] if name == "attention_early_kernel" else True
            full = f.script().splitlines()
            wait = next(i for i, ln in enumerate(full) if 'griddepcontrol("wait"' in ln)
            for i in (i for i, ln in enumerate(full[:wait]) if "cache[" in ln):
                indent, conditions = len(full[i]) - len(full[i].lstrip()), []
                for ln in reversed(full[:i]):  # the enclosing statements' lines
                    if len(ln) - len(ln.lstrip()) < indent:
                        indent = len(ln) - len(ln.lstrip())
                        conditions.append(ln.strip())
                assert any(c.startswith("if ") and "fresh" in c for c in conditions), full[i]
        else:
            assert first["wait"] < first["trigger"] < first["access"]


@needs_nvcc
def test_programmatic_launches_read_nothing_through_the_read_only_cache():
    """A kernel built for programmatic launch has no ``__restrict__`` pointers, so nvcc loads nothing it
    reads through the non-coherent path (``ld.global.nc``, which promises the data stays unchanged while
    the kernel runs): ptxas moved such an activation load above ``griddepcontrol.wait`` (seen in the SASS
    of Qwen3-4B's q|k|v GEMV, 2026-11-27), reading the previous kernel's output before it was written. The
    same GEMV built without it keeps them."""
    import tvm

    from ferrum.schedules import quant_linear as ql
    from ferrum_compiler.gpu_build import prepare_cuda_build, register_programmatic_launch_pipeline

    prepare_cuda_build()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm")

    def source(pdl: str) -> str:
        f = ql.make_gemv_gpu(512, 64, None, "float16", "float16", "float16", None, tokens=1, pdl=pdl)
        with target:
            lib = tvm.compile(tvm.IRModule({"gemv": f.with_attr("global_symbol", "gemv")}), target=target,
                              tir_pipeline=register_programmatic_launch_pipeline() if pdl else "default")
        return lib.mod.imports[0].inspect_source()

    launched, plain = source("early"), source("")
    assert "griddepcontrol.wait" in launched and "__restrict__" not in launched
    assert "griddepcontrol" not in plain and "__restrict__" in plain


def test_metal_artifact_holds_metal_source(tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    res = ferrum("compile", tiny_model_dir("llama-tied"), "--target", "metal", "--quant", "q4", "-o", out)
    assert res.returncode == 0, res.stderr[-3000:]
    lib = (out / "model.so").read_bytes()
    assert b"kernel void" in lib and b"#include <metal_stdlib>" in lib
    assert b"qlinear" in lib  # the INT4 dequantizing matmul kernels
    verified = yaml.safe_load((out / "ferrum.yaml").read_text())["target"]["gpu_code_verified"]
    assert verified["kernels"] >= 8 and verified["failed"] == [] and verified["limits"]["max_shared_memory_per_block"] == 32768


@pytest.mark.parametrize("threads,shared,ok", [(1024, 160 * 1024, True), (2048, 1024, False), (256, 200 * 1024, False)])
def test_gpu_code_verifier_rejects_kernels_over_the_limits(threads, shared, ok):
    """The check the compiler runs on every device kernel can fail: too many threads, more shared memory
    than an A100 block may have."""
    import tvm
    from tvm.script import tirx as T

    from ferrum_compiler.gpu_build import GpuCodeVerifier

    n = shared // 4

    @T.prim_func(private=True)
    def kernel(a: T.Buffer((n,), "float32")):
        T.func_attr({"target": T.target({"kind": "cuda", "arch": "sm_80"})})
        tx = T.env_thread("threadIdx.x")  # named like the kernels TVM lowers
        T.launch_thread(tx, threads)
        buf = T.alloc_buffer((n,), "float32", scope="shared")
        buf[tx % n] = a[tx % n]
        a[tx % n] = buf[(tx + 1) % n]

    verifier = GpuCodeVerifier("cuda", "sm_80")  # 163 KiB of shared memory per block
    verifier._check(tvm.IRModule({"kernel": kernel}))
    assert verifier.report()["kernels"] == 1 and (verifier.report()["failed"] == []) == ok


def _compute_capability() -> int:
    import subprocess

    return int(subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.split()[0].replace(".", ""))


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", ["", "1", "late", "first", "deep"])
def test_cuda_artifact_runs_on_gpu(pdl, tiny_model_dir, compiled, tmp_path, monkeypatch):
    """On a GPU machine: build for its arch, run a ragged step, compare with transformers (fp16 tolerance);
    on sm_90 again with every kernel a programmatic dependent launch, in each FERRUM_PDL mode."""
    import numpy as np

    from ferrum_compiler.compile import compile_model
    from ferrum_compiler.config import CompileOptions
    from ferrum_runtime.model import CompiledModel

    from .ragged import RaggedDriver
    from .test_model_parity import hf_logits

    cap = _compute_capability()
    model_dir = tiny_model_dir("qwen3")
    if pdl:
        if cap < 90:
            pytest.skip("programmatic dependent launch needs sm_90")
        monkeypatch.setenv("FERRUM_PDL", pdl)
        art = compile_model(str(model_dir), tmp_path / "pdl", CompileOptions(target="cuda-sm90"), progress=print)
    else:
        art = compiled(model_dir, target=f"cuda-sm{cap}")
    model = CompiledModel.load(art, device="cuda", num_blocks=16)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, n)) for n in (5, 23)]
    out = RaggedDriver(model, 2, 32, rng).step(prompts)
    ref = np.stack([hf_logits(str(model_dir), p)[-1] for p in prompts])
    assert np.abs(out - ref).max() < 3e-2


@needs_nvcc
def test_mma_operands_point_at_their_elements():
    """The CUDA source of ``make_mma_linear_gpu`` (float16 dense and INT4, Qwen3-4B's q|k|v shape), of
    ``make_mma_gemm_gpu`` (the same shape) and of ``make_prefill_attention_mma`` (Qwen3-4B's heads): TVM
    passes an mma operand as ``(unsigned *)(array + offset)`` with the offset in elements of the array's C
    type, and types a local array it vectorizes as ``uint4`` (16 bytes an element): an offset into such an
    array read activations 8 times too far on (found in the mma linear's SASS: mma's on never-loaded
    registers; the emulator, whose OpenCL is typed otherwise, cannot see it). Every operand is an array of
    the operand's own element type at a nonzero offset, or any array at offset 0. The GEMM's ``ldmatrix``
    loads likewise: each destination so, and each source ``&array[i]`` (an element address, right for any
    C type: TVM types the staged tiles, all of whose own reads and writes are 16-byte vectors, as
    ``uint4``, so ``array + i`` pointed 8 times too far, again where the emulator could not see it)."""
    import tvm

    from ferrum.schedules import mma_linear as ml
    from ferrum.schedules import paged_attention as pa
    from ferrum.schedules.quant_linear import QuantFormat
    from ferrum_compiler.gpu_build import prepare_cuda_build

    prepare_cuda_build()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host="llvm")
    for fmt in (None, QuantFormat(4, 128, True), "attention", "gemm"):
        func = pa.make_prefill_attention_mma(32, 8, 128, 16, "float16") if fmt == "attention" else \
            ml.make_mma_gemm_gpu(2560, 6144, "float16", "float16") if fmt == "gemm" else \
            ml.make_mma_linear_gpu(2560, 6144, "float16", "float16", fmt=fmt)
        with target:
            lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        code = lib.imports[0].inspect_source()
        types = dict((name, ctype) for ctype, name in re.findall(r"alignas\(\d+\) (\w+) (\w+)\[\d+\];", code))
        operands = re.findall(r'"[rf]"\(\(\((unsigned|float) \*\)\((\w+) \+ (\d+)\)\)', code)
        assert len(operands) >= 64, len(operands)
        for cast, name, offset in operands:
            want = "float" if cast == "float" else "half"
            assert offset == "0" or types[name] == want, (fmt, cast, name, offset, types[name])
        loads = re.findall(r'"=r"\(\(\(unsigned \*\)\((\w+) \+ (\d+)\)\)', code)  # ldmatrix destinations
        assert all(offset == "0" or types[name] == "half" for name, offset in loads), (fmt, loads)
        sources = re.findall(r"__cvta_generic_to_shared\((.{0,12})", code)
        assert all(src.startswith("(&(") for src in sources), (fmt, sources)
        assert (len(loads), len(sources)) == ((4 * 12, 12) if fmt == "gemm" else (0, 0)), (fmt, len(loads))


@needs_nvcc
def test_key_tiles_issue_all_their_loads_before_a_store():
    """The CUDA source of the decode attention (``make_attention_gpu``, one token a tile) and the wmma
    prefill attention (``make_prefill_attention_tc``, both passes), Qwen3-4B's heads: in each loop over key
    tiles every global load of the cache comes before the first store into the shared K/V tile. Staged
    as load, store, load, store... each load waited for the one before (its store needs its data): 8 to 16
    round trips a key tile in their SASS (``bench/cuda_sass.py --waits``), where one does. And
    ``make_qkv_append_gpu`` loads everything it reads (the element, norm weight, cos, sin, slot) before its
    first barrier: read after the norm's sum, each was a round trip more."""
    import tvm

    from ferrum.schedules import paged_attention as pa
    from ferrum.schedules.rope import make_qkv_append_gpu
    from ferrum_compiler.gpu_build import prepare_cuda_build

    prepare_cuda_build()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host="llvm")
    funcs = {"split": pa.make_attention_gpu(32, 8, 128, 16, "float16", tile_tokens=1),
             "tc": pa.make_prefill_attention_tc(32, 8, 128, 16, "float16"),
             "qkv_append": make_qkv_append_gpu(6144, (0, 32, 40), 32, 8, 128, 16, "float16", "float16", 1e-6,
                                               "float16")}
    for name, func in funcs.items():
        with target:
            lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        code = lib.imports[0].inspect_source()
        if name == "qkv_append":
            body = code[code.index("main_kernel(") :]
            first_sync = body.index("__syncthreads()")
            assert len(re.findall(r"_ptr\[", body[:first_sync])) >= 5 and not re.search(
                r"(src|table|kw|qw|slot_mapping)_ptr\[", body[first_sync:]), name
            continue
        loops = re.split(r"for \(int kt(?:_\d+)? = 0;", code)[1:]
        assert len(loops) == (1 if name == "split" else 2), name
        for loop in loops:
            lines = [ln.split(" = ", 1) for ln in loop.splitlines() if " = " in ln]
            loads = [i for i, (lhs, rhs) in enumerate(lines) if "cache_ptr" in rhs]
            # (a store into any shared array: TVM gives the K tile the queries' array once they are loaded)
            stores = [i for i, (lhs, _) in enumerate(lines) if re.search(r"\b[a-z]_s_ptr", lhs)]
            assert len(loads) >= 4 and stores and max(loads) < min(stores), (name, loads, stores[:3])

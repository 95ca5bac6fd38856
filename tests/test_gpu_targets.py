"""GPU targets build on this CPU-only machine: CUDA artifacts hold an nvcc-compiled cubin for the
named arch (no CUDA source), Metal artifacts hold Metal source. Compiled through the CLI in a
subprocess, as CI would. Running them needs a GPU (tests marked ``gpu``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ferrum_runtime.fatbin import embedded_cuda_code

from .test_cli import ferrum

pytestmark = pytest.mark.e2e

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                                reason="nvcc not installed")


@needs_nvcc
@pytest.mark.parametrize("family,target,quant", [("qwen3", "cuda-sm90", "auto"), ("llama", "cuda-sm80", "auto"),
                                                 ("qwen2", "cuda-sm86", "auto"), ("mistral", "cuda-sm89", "q4"),
                                                 ("qwen3-moe", "cuda-sm90", "q4")])
def test_cuda_artifact_holds_cubin_for_its_arch(family, target, quant, tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    res = ferrum("compile", tiny_model_dir(family), "--target", target, "--quant", quant, "-o", out)
    assert res.returncode == 0, res.stderr[-3000:]
    arch = "sm_" + target.removeprefix("cuda-sm")
    code = embedded_cuda_code(out / "model.so")
    assert code["cubin"] == [arch] and code["ptx"] == ["compute_" + arch.removeprefix("sm_")]  # PTX for newer GPUs
    lib = (out / "model.so").read_bytes()
    assert b"__global__" not in lib and b"extern \"C\"" not in lib  # compiled, not embedded source
    manifest = yaml.safe_load((out / "ferrum.yaml").read_text())
    assert manifest["target"]["cuda_code"]["cubin"] == [arch] and manifest["dtype"] == "float16"
    shown = ferrum("inspect", out).stdout
    assert "cubin: " + arch in shown
    verified = manifest["target"]["gpu_code_verified"]  # every kernel within the arch's thread/shared limits
    assert verified["kernels"] >= 8 and verified["failed"] == []
    # the decode entry point: same arguments, GEMV kernels (compiled into the cubin too)
    entries = manifest["entry_points"]
    assert entries["decode"]["max_tokens"] == 16 and entries["decode"]["args"] == entries["forward"]["args"]
    assert entries["decode_one"] == {**entries["forward"], "max_tokens": 1}  # GEMVs in passes of one token
    assert entries["decode_one_graph"] == {**entries["decode_one"], "max_blocks": entries["decode_graph"]["max_blocks"]}
    assert b"gemv" in lib and b"attention_split" in lib and b"attention_merge" in lib and b"add_rms_norm" in lib
    assert b"attention_tc" in lib  # forward's attention on tensor cores (head_dim 16 and 32 fit its tile)
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


@pytest.mark.gpu
def test_cuda_artifact_runs_on_gpu(tiny_model_dir, compiled):
    """On a GPU machine: build for its arch, run a ragged step, compare with transformers (fp16 tolerance)."""
    import subprocess

    import numpy as np

    from ferrum_runtime.model import CompiledModel

    from .ragged import RaggedDriver
    from .test_model_parity import hf_logits

    cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.split()[0].replace(".", "")
    model_dir = tiny_model_dir("qwen3")
    model = CompiledModel.load(compiled(model_dir, target=f"cuda-sm{cap}"), device="cuda", num_blocks=16)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, n)) for n in (5, 23)]
    out = RaggedDriver(model, 2, 32, rng).step(prompts)
    ref = np.stack([hf_logits(str(model_dir), p)[-1] for p in prompts])
    assert np.abs(out - ref).max() < 3e-2

"""``ferrum compile --no-weights`` on a config-only model directory, then ``ferrum pack-weights`` in a
process where TVM and torch cannot be imported (as on a GPU machine that has only TVM's runtime): the
result is byte-for-byte the artifact a normal compile writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ferrum_compiler.quant import GPTQConfig
from ferrum_runtime.model import CompiledModel

from .gptq import gptq_checkpoint
from .test_cli import assert_one_line_error, ferrum

pytestmark = pytest.mark.e2e

BLOCKED = "import sys\nfor m in ('tvm', 'tvm_ffi', 'torch', 'transformers'):\n    sys.modules[m] = None\n"


def pack_without_tvm(artifact: Path, model: Path) -> subprocess.CompletedProcess:
    code = BLOCKED + f"from ferrum_runtime.cli import main\nsys.exit(main(['pack-weights', {str(artifact)!r}, {str(model)!r}]))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def config_only(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            shutil.copyfile(f, dest / f.name)
    return dest


def weight_digests(artifact: Path) -> dict[str, str]:
    files = yaml.safe_load((artifact / "ferrum.yaml").read_text())["files"]
    return {k: v for k, v in files.items() if k.startswith("weights/")}


@pytest.mark.parametrize("family,quant", [("qwen3", "auto"), ("llama-wide", "q4")])
def test_no_weights_then_pack_equals_a_full_compile(family, quant, tiny_model_dir, compiled, tmp_path):
    src = tiny_model_dir(family)
    full = compiled(src, quant=quant)
    art = tmp_path / "art"
    res = ferrum("compile", config_only(src, tmp_path / "cfg"), "--no-weights", "--quant", quant, "-o", art)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (art / "weights").exists() and weight_digests(art) == {}
    assert "weights: none yet" in ferrum("inspect", art).stdout
    assert_one_line_error(ferrum("run", art, "--prompt", "hi"), "--no-weights", "ferrum pack-weights")

    res = pack_without_tvm(art, src)
    assert res.returncode == 0, res.stderr[-2000:]
    assert weight_digests(art) == weight_digests(full)  # same shards, byte for byte
    a, b = CompiledModel.load(art, num_blocks=8), CompiledModel.load(full, num_blocks=8)
    from .ragged import RaggedDriver

    prompts = [[3, 14, 15, 92, 65], [35, 89, 79]]
    out_a = RaggedDriver(a, 2, 16, np.random.default_rng(0)).step(prompts)
    out_b = RaggedDriver(b, 2, 16, np.random.default_rng(0)).step(prompts)
    assert np.array_equal(out_a, out_b)


def test_config_only_gptq_declares_the_checkpoints_quantization(tiny_model_dir, compiled, tmp_path):
    src = gptq_checkpoint(tiny_model_dir("qwen3-wide"), tmp_path / "gptq", GPTQConfig(4, 32, False, False, False),
                          np.random.default_rng(3))
    full = compiled(src)
    art = tmp_path / "art"
    res = ferrum("compile", config_only(src, tmp_path / "cfg"), "--no-weights", "-o", art)
    assert res.returncode == 0, res.stderr[-2000:]
    spec = lambda p: yaml.safe_load((p / "ferrum.yaml").read_text())["quantization"]["weights"]  # noqa: E731
    assert spec(art) == spec(full) and len(spec(art)) > 0
    assert pack_without_tvm(art, src).returncode == 0
    assert weight_digests(art) == weight_digests(full)


def test_pack_weights_refuses_another_model(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen3")
    art = tmp_path / "art"
    assert ferrum("compile", config_only(src, tmp_path / "cfg"), "--no-weights", "-o", art).returncode == 0
    manifest = (art / "ferrum.yaml").read_text()
    res = ferrum("pack-weights", art, tiny_model_dir("llama"))
    assert_one_line_error(res, "does not match artifact")
    assert (art / "ferrum.yaml").read_text() == manifest and not (art / "weights").exists()

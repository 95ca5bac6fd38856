"""The ``ferrum`` CLI end to end, in subprocesses as a user runs it: compile, inspect, run, and the
one-line errors for bad input (never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def ferrum(*args, env=None, input=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, input=input, timeout=timeout)


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("ferrum: error:")]
    assert len(lines) == 1, res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_compile_inspect_run_hf_directory(tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    res = ferrum("compile", tiny_model_dir("qwen3"), "--target", "cpu", "-o", out, "--dump-ir")
    assert res.returncode == 0, res.stderr
    dumps = sorted(p.name for p in (out / "debug").iterdir())
    assert dumps == ["00-model.txt", "01-fuse_parallel_linears.txt", "02-quantize_linears.txt", "relax.py"]
    assert "q_proj+k_proj+v_proj" in (out / "debug" / "01-fuse_parallel_linears.txt").read_text()
    for phase in range(1, 7):
        assert f"[{phase}/6]" in res.stderr
    assert (out / "ferrum.yaml").is_file() and (out / "model.so").is_file()
    res = ferrum("inspect", out)
    assert res.returncode == 0 and "qwen3: 2 layers" in res.stdout and "paged_attention x2" in res.stdout
    data = json.loads(ferrum("inspect", out, "--json").stdout)
    assert data["abi_version"] == 1 and data["target"]["name"] == "cpu"
    assert data["kv_cache"]["block_size"] == 16
    assert all(len(h) == 64 for h in data["files"].values())


def test_run_smollm2_prompt(smollm2_artifact):
    res = ferrum("run", smollm2_artifact, "--prompt", "What is the capital of France?", "--max-tokens", "12")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    assert "tok/s" in res.stderr


def test_commands_leave_torch_alone(tiny_model_dir, smollm2_artifact, tmp_path):
    """torch is installed here (the tests' reference), and TVM imports it whenever it can: 1.1 s and ~200 MB
    for nothing. `ferrum run` and `ferrum compile` run without it, and torch still imports afterwards."""
    import importlib.util

    assert importlib.util.find_spec("torch") is not None  # else this test proves nothing
    script = ("import sys; from ferrum_runtime import cli; code = cli.main(sys.argv[1:]); "
              "assert 'torch' not in sys.modules, 'torch was imported'; import torch; assert torch.ones(2).sum() == 2")
    for args in (["run", smollm2_artifact, "--prompt", "Hi", "--max-tokens", "2"],
                 ["compile", tiny_model_dir("qwen3"), "--target", "cpu", "-o", tmp_path / "art"]):
        res = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr


def test_chat_repl_keeps_conversation_and_exits(smollm2_artifact):
    res = ferrum("run", smollm2_artifact, "--max-tokens", "8", input="Hi\n/reset\nWhat is 2+2?\n/exit\n")
    assert res.returncode == 0, res.stderr
    import re

    prompts = [int(n) for n in re.findall(r"\[prompt (\d+) tok", res.stderr)]
    assert len(prompts) == 2
    assert prompts[1] < prompts[0] + 10  # /reset dropped the first exchange from the second prompt


def test_chat_repl_sends_history(smollm2_artifact):
    import re

    res = ferrum("run", smollm2_artifact, "--max-tokens", "8", input="Hi\nWhat is 2+2?\n")
    prompts = [int(n) for n in re.findall(r"\[prompt (\d+) tok", res.stderr)]
    assert res.returncode == 0 and len(prompts) == 2 and prompts[1] > prompts[0] + 10


@pytest.mark.parametrize("args,fragments", [
    (["compile", "does/not/exist/x.gguf"], ["does not exist"]),
    (["compile", "./no-such-dir"], ["no model named"]),
    (["compile", "smollm2", "--target", "tpu"], ["unknown target 'tpu'", "cuda-sm90"]),
    (["inspect", "/tmp"], ["not a ferrum artifact", "ferrum compile"]),
])
def test_bad_input_is_one_line(args, fragments):
    assert_one_line_error(ferrum(*args), *fragments)


def test_serve_names_the_fix_for_a_port_it_cannot_have(smollm2_artifact):
    """Before the model loads: a port in use, a host that is not this machine's, a port out of range."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(ferrum("serve", smollm2_artifact, "--port", port, timeout=120),
                              f"port {port} is in use", "--port")
    assert_one_line_error(ferrum("serve", smollm2_artifact, "--host", "203.0.113.7", timeout=120),
                          "not an address of this machine", "--host 127.0.0.1")
    assert_one_line_error(ferrum("serve", smollm2_artifact, "--port", 70000, timeout=120), "1-65535")
    assert_one_line_error(ferrum("serve", smollm2_artifact, "--kv-cache-memory", 0, timeout=120), "MiB above 0")
    assert_one_line_error(ferrum("serve", smollm2_artifact, "--max-num-batched-tokens", -5, timeout=120),
                          "--max-num-batched-tokens -5")


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    assert_one_line_error(ferrum("compile", tmp_path, "-o", tmp_path / "out"), "GPT2LMHeadModel",
                          "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_hub_without_network_names_the_missing_file(tmp_path):
    res = ferrum("compile", "Qwen/Qwen3-0.6B", "-o", tmp_path / "q",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(res, "config.json", "Qwen/Qwen3-0.6B", "hf download")


def test_missing_weights_are_named(tiny_model_dir, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the checkpoint has 2
    (src / "config.json").write_text(json.dumps(cfg))
    res = ferrum("compile", src, "-o", tmp_path / "out")
    assert_one_line_error(res, "model.layers.2.")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_refuses_to_overwrite_a_non_artifact(tiny_model_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    assert_one_line_error(ferrum("compile", tiny_model_dir("qwen2"), "-o", tmp_path), "not a ferrum artifact")
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_ctrl_c_stops_the_answer_not_the_chat(smollm2_artifact):
    import signal
    import time

    # greedy SmolLM2 writes this story for thousands of tokens, so the answer is still streaming when Ctrl-C
    # comes. The child gets SIGINT's default disposition, as under a terminal: a suite started in the
    # background by a non-interactive shell ignores SIGINT, which children inherit (Python then installs no
    # KeyboardInterrupt handler at all).
    proc = subprocess.Popen([sys.executable, "-m", "ferrum_runtime.cli", "run", str(smollm2_artifact), "--max-tokens",
                             "3000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("Write a very long story about a dragon.\n")
        proc.stdin.flush()
        assert proc.stdout.read(20)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in err and "Traceback" not in err


def test_run_alias_compiles_once_and_caches(tmp_path):
    env = {"FERRUM_CACHE": str(tmp_path)}
    first = ferrum("run", "smollm2", "--prompt", "Hi", "--max-tokens", "4", env=env)
    assert first.returncode == 0, first.stderr
    assert "compiling smollm2 for this machine once" in first.stderr
    second = ferrum("run", "smollm2", "--prompt", "Hi", "--max-tokens", "4", env=env)
    assert second.returncode == 0 and "compiling" not in second.stderr
    assert first.stdout == second.stdout  # greedy
    assert_one_line_error(ferrum("run", "no-such-model", env=env), "neither an artifact", "smollm2")

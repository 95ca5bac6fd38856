"""Compile wall time, artifact size, peak memory and real-shape parity on `cpu`, for the closing notes of
the compiler work. Not a test: it writes a report and raw logs under docs/bench/.

    python bench/compile_cpu.py            # SmolLM2 (packaged GGUF) and a Qwen3-0.6B-shaped random model

Each compile runs as `ferrum compile` under /usr/bin/time -v (peak RSS includes the memory-mapped
source pages, which are file-backed). The random Qwen3-0.6B is built with transformers (bf16, 3
shards) and compared with transformers fp32 on a ragged prefill and one decode step.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench"
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)


def timed_compile(source: str, out: Path, log: Path) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "ferrum_runtime.cli", "compile", source, "--target", "cpu",
           "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    if res.returncode:
        raise SystemExit(f"compile of {source} failed; see {log}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", res.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"wall_s": seconds, "peak_rss_mib": rss / 1024, "artifact_mib": size / 2**20}


def qwen3_parity(model_dir: Path, artifact: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from ferrum_runtime.model import CompiledModel
    from tests.ragged import RaggedDriver

    t0 = time.perf_counter()
    model = CompiledModel.load(artifact, num_blocks=64)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, QWEN3_06B["vocab_size"], n)] for n in (7, 50, 120)]
    drv = RaggedDriver(model, 3, 160, rng)
    ours = drv.step(prompts, all_rows=True)
    last = np.cumsum([len(p) for p in prompts]) - 1
    toks = [int(ours[i].argmax()) for i in last]
    dec = drv.step([[t] for t in toks])
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = np.concatenate([hf(torch.tensor([p])).logits[0].numpy() for p in prompts])
        ref_dec = np.stack([hf(torch.tensor([p + [t]])).logits[0, -1].numpy() for p, t in zip(prompts, toks)])
    return {"load_s": load_s, "prefill_max_abs_err": float(np.abs(ours - ref).max()),
            "decode_max_abs_err": float(np.abs(dec - ref_dec).max()), "logit_max": float(np.abs(ref).max())}


def main() -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    stamp = datetime.date.today().isoformat()
    raw = OUT / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{stamp}-lscpu.txt").write_text(subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        smol = timed_compile("smollm2", tmp / "smollm2", raw / f"{stamp}-compile-smollm2.log")
        torch.manual_seed(0)
        Qwen3ForCausalLM(Qwen3Config(**QWEN3_06B)).to(torch.bfloat16).save_pretrained(tmp / "q06", max_shard_size="500MB")
        q06 = timed_compile(str(tmp / "q06"), tmp / "q06-art", raw / f"{stamp}-compile-qwen3-0.6b-random.log")
        parity = qwen3_parity(tmp / "q06", tmp / "q06-art")
    cpu = re.search(r"Model name:\s*(.+)", (raw / f"{stamp}-lscpu.txt").read_text()).group(1)
    report = OUT / f"{stamp}-compile-cpu.md"
    report.write_text(f"""# Compile on `cpu`, {stamp}

Machine: {cpu}, 2 vCPUs (raw/{stamp}-lscpu.txt). Command: `python bench/compile_cpu.py`.

| model | source | compile wall (s) | peak RSS (MiB) | artifact (MiB, float32) |
|---|---|---|---|---|
| SmolLM2-135M-Instruct | Q4_1 GGUF, 98 MB | {smol['wall_s']:.1f} | {smol['peak_rss_mib']:.0f} | {smol['artifact_mib']:.0f} |
| Qwen3-0.6B shape, random | bf16 safetensors, 3 shards, 1.2 GB | {q06['wall_s']:.1f} | {q06['peak_rss_mib']:.0f} | {q06['artifact_mib']:.0f} |

Wall time includes Python start-up and TVM import; peak RSS includes the memory-mapped source pages.

Qwen3-0.6B-shaped artifact vs transformers fp32 (ragged prefill of 7/50/120 tokens, every row, then one
decode step): prefill max abs logit error {parity['prefill_max_abs_err']:.2e}, decode
{parity['decode_max_abs_err']:.2e} (logits up to {parity['logit_max']:.2f}); artifact load {parity['load_s']:.1f} s
(sha256 of every file included).
""")
    print(report.read_text())


if __name__ == "__main__":
    main()

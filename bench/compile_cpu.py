"""Compile wall time, artifact size, peak memory and real-shape parity on `cpu`, for the closing notes of
the compiler work. Not a test: it writes a report and raw logs under docs/bench/.

    python bench/compile_cpu.py            # SmolLM2 (packaged GGUF) and a Qwen3-0.6B-shaped random model
    python bench/compile_cpu.py --qwen3-4b # a Qwen3-4B-shaped random checkpoint (8 GB bf16): memory proof

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


QWEN3_4B = dict(QWEN3_06B, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32)


def write_random_checkpoint(cfg: dict, dest: Path, shard_bytes: int = 2 << 30) -> None:
    """A bf16 HF checkpoint of random weights, written shard by shard (never the whole model in memory)."""
    import json

    import ml_dtypes

    sys.path.insert(0, str(ROOT))
    from ferrum_runtime.safetensors_io import write_safetensors

    dest.mkdir(parents=True, exist_ok=True)
    d, hd, i = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, d),
                       p + "self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, d),
                       p + "self_attn.v_proj.weight": (cfg["num_key_value_heads"] * hd, d),
                       p + "self_attn.o_proj.weight": (d, cfg["num_attention_heads"] * hd),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d),
                       p + "mlp.down_proj.weight": (d, i)})
    rng = np.random.default_rng(0)
    shard: dict = {}
    weight_map: dict = {}
    count = 0

    def flush() -> None:
        nonlocal shard, count
        name = f"model-{count:05d}.safetensors"
        write_safetensors(dest / name, shard)
        weight_map.update({k: name for k in shard})
        shard, count = {}, count + 1

    for name, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32) * (0.02 if len(shape) == 2 else 0.1) + (len(shape) == 1)
        shard[name] = w.astype(ml_dtypes.bfloat16)
        if sum(a.nbytes for a in shard.values()) >= shard_bytes:
            flush()
    flush()
    (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (dest / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                                                  "dtype": "bfloat16", **cfg}))


def big_model() -> None:
    stamp = datetime.date.today().isoformat()
    raw = OUT / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:  # /tmp may be small; the artifact is ~16 GB
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_random_checkpoint(QWEN3_4B, tmp / "q4b")
        print(f"random checkpoint written in {time.perf_counter() - t0:.0f} s")
        r = timed_compile(str(tmp / "q4b"), tmp / "q4b-art", raw / f"{stamp}-compile-qwen3-4b-random.log")
    cpu = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout).group(1)
    report = OUT / f"{stamp}-compile-qwen3-4b.md"
    report.write_text(f"""# A 4B model compiles on a 24 GiB machine, {stamp}

Machine: {cpu}, 2 vCPUs, 24 GiB. Command: `python bench/compile_cpu.py --qwen3-4b`.

A Qwen3-4B-shaped checkpoint of random bf16 weights (36 layers, hidden 2560, 4.0 B parameters, 8 GB in
4 shards), compiled for `cpu` (float32): wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB
(memory-mapped source pages included), artifact {r['artifact_mib']:.0f} MiB written in ~1 GiB shards.
Raw log: raw/{stamp}-compile-qwen3-4b-random.log.
""")
    print(report.read_text())


def main() -> None:
    if "--qwen3-4b" in sys.argv:
        big_model()
        return
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

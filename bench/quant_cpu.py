"""Packed INT4/INT8 vs dequantized SmolLM2 on `cpu`: artifact size, resident memory while serving, and
model-call speed (prefill 128 tokens, batch-1 decode), measured in one run. Not a test: it writes a
report and a raw log under docs/bench/.

    python bench/quant_cpu.py

Artifacts: the packaged SmolLM2 GGUF compiled three ways (Q4_1/Q8_0 kept packed; dequantized to
float32; dequantized to float16 for the size column only). Resident memory is VmRSS of `ferrum serve`
after /health turns 200 and one chat request. Speeds alternate the two artifacts, 5 rounds, and report
the median; the ratio is what to read (the machine is shared).
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench"


def compile_(out: Path, *extra: str) -> float:
    subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", "compile", "smollm2", "--target", "cpu", "-o",
                    str(out), *extra], check=True, capture_output=True)
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20


def serve_rss(art: Path, port: int) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "ferrum_runtime.cli", "serve", str(art), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        model = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())["data"][0]["id"]
        req.data = body.replace(b'"x"', json.dumps(model).encode())
        urllib.request.urlopen(req, timeout=60).read()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
    finally:
        proc.terminate()
        proc.wait()


def speeds(art: Path) -> tuple[float, float]:
    """(prefill tok/s for 128 tokens, batch-1 decode tok/s over 64 steps) of the model call alone."""
    sys.path.insert(0, str(ROOT))
    from ferrum_runtime.model import CompiledModel
    from tests.ragged import RaggedDriver

    model = CompiledModel.load(art, num_blocks=64)
    rng = np.random.default_rng(0)
    prompt = list(rng.integers(0, 49152, 128))
    drv = RaggedDriver(model, 1, 256, rng)
    t0 = time.perf_counter()
    out = drv.step([prompt])
    prefill = 128 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(64):
        out = drv.step([[int(out[0].argmax())]])
    return prefill, 64 / (time.perf_counter() - t0)


def main() -> None:
    date = datetime.date.today().isoformat()
    lines = [f"# {date} quantized SmolLM2 on cpu", "", "`python bench/quant_cpu.py`", ""]
    with tempfile.TemporaryDirectory() as tmp:
        arts = {"packed Q4_1/Q8_0": Path(tmp) / "q", "dequantized fp32": Path(tmp) / "f32"}
        sizes = {"packed Q4_1/Q8_0": compile_(arts["packed Q4_1/Q8_0"]),
                 "dequantized fp32": compile_(arts["dequantized fp32"], "--quant", "none"),
                 "dequantized fp16": compile_(Path(tmp) / "f16", "--quant", "none", "--dtype", "float16")}
        rss = {name: serve_rss(path, 8400 + i) for i, (name, path) in enumerate(arts.items())}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in arts}
        for _ in range(5):  # alternate, one fresh process per measurement
            for name, path in arts.items():
                res = subprocess.run([sys.executable, __file__, "--speed", str(path)], capture_output=True, text=True,
                                     check=True)
                runs[name].append(tuple(json.loads(res.stdout.strip().splitlines()[-1])))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    lines += [f"Machine: {model_name}, 2 threads (raw/{date}-quant-lscpu.txt).", "",
              "| artifact | size (MiB) | serve RSS (MiB) | prefill 128 (tok/s) | decode b=1 (tok/s) |", "|---|---|---|---|---|"]
    med = {n: (statistics.median(r[0] for r in runs[n]), statistics.median(r[1] for r in runs[n])) for n in runs}
    for name, size in sizes.items():
        if name in arts:
            lines.append(f"| {name} | {size:.1f} | {rss[name]:.0f} | {med[name][0]:.0f} | {med[name][1]:.1f} |")
        else:
            lines.append(f"| {name} | {size:.1f} | - | - | - |")
    q, f = med["packed Q4_1/Q8_0"], med["dequantized fp32"]
    lines += ["", f"Packed / fp32 in the same run: prefill x{q[0] / f[0]:.2f}, decode x{q[1] / f[1]:.2f}.", ""]
    (OUT / f"{date}-quant-cpu.md").write_text("\n".join(lines))
    (OUT / "raw" / f"{date}-quant-cpu.log").write_text(json.dumps({"sizes_mib": sizes, "serve_rss_mib": rss,
                                                                    "runs_prefill_decode": runs}, indent=1))
    (OUT / "raw" / f"{date}-quant-lscpu.txt").write_text(lscpu)
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--speed":
        print(json.dumps(speeds(Path(sys.argv[2]))))
    else:
        main()

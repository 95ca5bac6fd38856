"""``ferrum bench ARTIFACT``: llama-bench-style throughput of one artifact on this machine.

Rows (each repeated ``--repetitions`` times, mean ± standard deviation):
- ``ppN``: prefill of one N-token prompt (in chunks of ``--ubatch`` tokens, as the engine schedules it);
- ``tgN@dD``: N greedy decode steps of one sequence whose cache already holds D tokens;
- ``decode bB``: aggregate decode throughput of B sequences (128-token prompts) stepping together;
- ``ttft``: time to first token through the engine (tokenize → schedule → prefill → sample) for a
  128-token prompt.
Model-call rows time the compiled model and the greedy pick only; ``ttft`` includes the engine. Prompts
are random token ids, so no tokenizer is needed (except for ``ttft``, which falls back to ids).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .model import CompiledModel, RaggedBatch


@dataclass
class BenchRow:
    test: str  # pp512, tg128@d0, decode b16, ttft
    tokens: int  # tokens processed per repetition
    tok_per_s: float  # mean
    tok_per_s_std: float
    ms: float  # mean wall time per repetition
    runs: list[float]  # seconds per repetition


class _Seqs:
    """Sequences on the KV cache with contiguous blocks, driven directly through ``CompiledModel``."""

    def __init__(self, model: CompiledModel, count: int, max_len: int):
        self.model = model
        per = -(-max_len // model.block_size)
        if per * count > model.num_blocks:
            raise ValueError(f"the KV cache holds {model.num_blocks} blocks; {count} sequences of {max_len} tokens "
                             f"need {per * count}; lower the batch or the lengths")
        self.tables = np.arange(per * count, dtype=np.int32).reshape(count, per)
        self.lens = [0] * count

    def step(self, chunks: list[list[int]], greedy: bool = False) -> np.ndarray:
        """Feed ``chunks[i]`` to sequence i (empty: not in this call); logits of each fed one's last token,
        or with ``greedy`` its argmax token id, picked as the engine picks greedy tokens (on the device when
        the artifact has an argmax entry point)."""
        batch = self.batch(chunks)
        if greedy and self.model.has_device_argmax:
            return self.model.forward_picked(batch, None, False, check=False)[0]
        logits = self.model.forward(batch, check=False)
        return logits.argmax(axis=1) if greedy else logits

    def batch(self, chunks: list[list[int]]) -> RaggedBatch:
        """The call that feeds ``chunks`` (as ``step``); the sequences count them as fed."""
        ids, pos, slots, starts, rows = [], [], [], [0], []
        bs = self.model.block_size
        fed = [i for i, c in enumerate(chunks) if c]
        for i in fed:
            chunk = chunks[i]
            for j, tok in enumerate(chunk):
                p = self.lens[i] + j
                ids.append(tok)
                pos.append(p)
                slots.append(int(self.tables[i, p // bs]) * bs + p % bs)
            starts.append(len(ids))
            rows.append(len(ids) - 1)
            self.lens[i] += len(chunk)
        return RaggedBatch(np.array(ids, np.int32), np.array(pos, np.int32), np.array(starts, np.int32),
                           self.tables[fed], np.array(slots, np.int32), np.array(rows, np.int32))


def _row(test: str, tokens: int, runs: list[float]) -> BenchRow:
    rates = [tokens / s for s in runs]
    return BenchRow(test, tokens, statistics.mean(rates), statistics.stdev(rates) if len(rates) > 1 else 0.0,
                    statistics.mean(runs) * 1e3, runs)


def run_bench(artifact: str | Path, *, prompt_lens=(128, 512, 2048), gen: int = 128, depths=(0, 512),
              batches=(1, 4, 16, 64), repetitions: int = 3, ubatch: int = 512, ttft: bool = True,
              progress=lambda msg: None, kv_cache_bytes: int = 1 << 30) -> dict:
    model = CompiledModel.load(artifact, kv_cache_bytes=kv_cache_bytes)
    rng = np.random.default_rng(0)
    vocab = model.vocab_size
    rows: list[BenchRow] = []
    limit = model.max_model_len

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, vocab, n)]

    # warm-up: one call of each kind loads code and pages in the weights
    w = _Seqs(model, 1, 64)
    w.step([prompt(16)])
    w.step([[1]])
    for n in prompt_lens:
        if n + 1 > limit or -(-n // model.block_size) > model.num_blocks:
            progress(f"skip pp{n}: exceeds the context or the KV cache")
            continue
        runs = []
        for _ in range(repetitions):
            seqs, p = _Seqs(model, 1, n), prompt(n)
            t0 = time.perf_counter()
            for a in range(0, n, ubatch):
                seqs.step([p[a:a + ubatch]])
            runs.append(time.perf_counter() - t0)
        rows.append(_row(f"pp{n}", n, runs))
        progress(f"pp{n}: {rows[-1].tok_per_s:.1f} tok/s")
    for d in depths:
        if d + gen + 1 > limit:
            continue
        runs = []
        for _ in range(repetitions):
            seqs = _Seqs(model, 1, d + gen + 1)
            p = prompt(max(d, 1))
            for a in range(0, len(p), ubatch):
                last = seqs.step([p[a:a + ubatch]])
            tok = int(last[0].argmax())
            t0 = time.perf_counter()
            for _ in range(gen):  # the token picked as the engine picks greedy ones
                tok = int(seqs.step([[tok]], greedy=True)[0])
            runs.append(time.perf_counter() - t0)
        rows.append(_row(f"tg{gen}@d{d}", gen, runs))
        progress(f"tg{gen}@d{d}: {rows[-1].tok_per_s:.1f} tok/s")
    steps = 32
    for b in batches:
        try:
            seqs = _Seqs(model, b, 128 + steps * repetitions + 1)
        except ValueError as e:
            progress(f"skip decode b{b}: {e}")
            continue
        for a in range(0, b, max(1, ubatch // 128)):  # prefill first, so the timed steps are pure decode
            group = list(range(a, min(b, a + max(1, ubatch // 128))))
            seqs.step([prompt(128) if j in group else [] for j in range(b)])
        toks = [1] * b
        runs = []
        for _ in range(repetitions):
            t0 = time.perf_counter()
            for _ in range(steps):
                toks = [int(t) for t in seqs.step([[t] for t in toks], greedy=True)]
            runs.append(time.perf_counter() - t0)
        rows.append(_row(f"decode b{b}", b * steps, runs))
        progress(f"decode b{b}: {rows[-1].tok_per_s:.1f} tok/s")
    breakdown = None
    if ttft:
        row, breakdown = _engine_rows(model, artifact, prompt(128), repetitions, gen)
        rows.append(row)
        progress(f"ttft: {rows[-1].ms:.1f} ms")
    return {"engine_decode_b1": breakdown,"artifact": str(artifact), "model": model.manifest.model["family"],
            "quantization": model.manifest.data.get("quantization", {}).get("method", "none"),
            "target": model.manifest.target["name"], "threads": _threads(), "rows": [asdict(r) for r in rows]}


def _engine_rows(model: CompiledModel, artifact, prompt: list[int], repetitions: int,
                 gen: int) -> tuple[BenchRow, dict]:
    """TTFT through the engine, and where the time of a batch-1 decode step goes (engine actions vs
    the compiled model call). The engine runs on the model already loaded (its KV cache is scratch)."""
    from .engine import Engine, EngineConfig
    from .sampler import SamplingParams
    from .tokenizer import TokenizerFiles

    engine = Engine(model, TokenizerFiles.of(Path(artifact)), EngineConfig(enable_prefix_caching=False))

    async def once(max_tokens: int) -> float:
        t0 = time.perf_counter()
        first = None
        async for d in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)):
            if d.token_ids and first is None:
                first = time.perf_counter() - t0
        return first or time.perf_counter() - t0

    asyncio.run(once(1))  # warm-up
    runs = [asyncio.run(once(1)) for _ in range(repetitions)]
    before = dict(engine.seconds)
    steps0 = engine.counters["steps"]
    asyncio.run(once(gen + 1))
    steps = engine.counters["steps"] - steps0 - 1  # the prefill step is not a decode step
    spent = {k: engine.seconds[k] - before[k] for k in engine.seconds}
    step_total = sum(spent[k] for k in engine.STEP)
    # the actions' own time: _launch less the model's launch (building the batch), _collect less the wait
    own = {**spent, "_launch": spent["_launch"] - spent["model_launch"],
           "_collect": spent["_collect"] - spent["model_wait"]}
    breakdown = {"steps": steps, "ms_per_step": step_total / (steps + 1) * 1e3,
                 "share": {"model_call": spent["model_call"] / step_total,
                           **{k.strip("_"): own[k] / step_total for k in engine.STEP}}}
    return _row("ttft", len(prompt), runs), breakdown


def _threads() -> int:
    import os

    return int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)


def format_table(result: dict) -> str:
    head = (f"ferrum bench: {result['artifact']} ({result['model']}, {result['quantization']}, "
            f"{result['target']}, {result['threads']} threads)")
    lines = [head, "", "| test | tokens | tok/s | ms/rep |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['test']} | {r['tokens']} | {r['tok_per_s']:.2f} ± {r['tok_per_s_std']:.2f} | {r['ms']:.1f} |")
    b = result.get("engine_decode_b1")
    if b:
        shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in b["share"].items())
        lines += ["", f"engine, batch-1 decode: {b['ms_per_step']:.2f} ms/step over {b['steps']} steps: {shares}"]
    return "\n".join(lines)


def main(args) -> int:
    result = run_bench(args.artifact, prompt_lens=args.prompt_lens, gen=args.gen, depths=args.depths,
                       batches=args.batches, repetitions=args.repetitions, ttft=not args.no_ttft,
                       progress=(lambda m: None) if args.json else (lambda m: print("  " + m, flush=True)))
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0

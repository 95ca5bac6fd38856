"""``ferrum bench-serve URL``: load-test any OpenAI-compatible server (ferrum, ``llama_cpp.server``, vLLM).

For each concurrency level, ``--num-prompts`` requests (default 4 × concurrency, at least 8) go to
``/v1/completions`` with streaming, at most ``concurrency`` in flight. Prompts are random words of about
``--input-len`` tokens (measured with the server's own ``/tokenize`` when it has one); every request asks
for ``--output-len`` tokens (``ignore_eos`` and ``min_tokens`` sent for servers that honour them).
Per request: TTFT (first streamed token), ITL (gaps between tokens), TPOT ((E2E − TTFT) / (tokens − 1)),
E2E, output tokens (the server's ``usage`` when it sends one, else streamed pieces). A failed request
counts as an error and adds nothing to throughput. Raw per-request records are written as JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import FerrumError

_WORDS = ("time year people way day man thing woman life child world school state family student group country "
          "problem hand part place case week company system program question work government number night point "
          "home water room mother area money story fact month lot right study book eye job word business issue "
          "side kind head house service friend father power hour game line end member law car city community").split()


@dataclass
class Record:
    concurrency: int
    ok: bool
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.ok and self.output_tokens > 1 else None


@contextlib.contextmanager
def server_process(cmd: list[str], url: str, log_path, env: dict | None = None, timeout: float = 300):
    """Run the server ``cmd`` (output to ``log_path``) until the block ends, entered once ``url``'s
    ``/v1/models`` answers 200 (ferrum answers 503 while loading); terminated (killed after 60 s) on exit.
    For bench scripts that measure a server they start."""
    import subprocess
    import urllib.request

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {proc.returncode} before it was ready "
                                       f"(log: {log_path})")
                try:
                    with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"{url} was not ready after {timeout} s (log: {log_path})")
                time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


async def _words_per_token(client, base: str, model: str) -> float:
    """Tokens per word of the random prompts, from the server's tokenizer when it has /tokenize (ferrum and
    vLLM read ``prompt``, llama.cpp's llama-server ``content``); about one otherwise."""
    sample = _prompt(random.Random(1), 200)
    try:
        r = await client.post(f"{base}/tokenize", json={"model": model, "prompt": sample, "content": sample})
        tokens = len(r.json()["tokens"]) if r.status_code == 200 else 0
    except Exception:  # noqa: BLE001 - a server without /tokenize: assume about one token per word
        tokens = 0
    return tokens / 200 if tokens else 1.0


async def _one(client, base: str, model: str, prompt: str, output_len: int, concurrency: int, api_key: str | None,
               sampling: dict) -> Record:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": output_len, **sampling}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rec = Record(concurrency, ok=False)
    t0 = time.perf_counter()
    last = None
    pieces = 0
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    rec.error = str(event["error"])[:200]
                    return rec
                if event.get("usage"):
                    rec.output_tokens = int(event["usage"].get("completion_tokens") or 0)
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        now = time.perf_counter()
                        if last is None:
                            rec.ttft = now - t0
                        else:
                            rec.itl.append(now - last)
                        last = now
                        pieces += 1
        rec.e2e = time.perf_counter() - t0
        rec.output_tokens = rec.output_tokens or pieces
        rec.ok = pieces > 0
        if not rec.ok:
            rec.error = "no tokens streamed"
    except Exception as e:  # noqa: BLE001 - a failed request is an error record, never a crash
        rec.error = f"{e.__class__.__name__}: {e}"[:200]
    return rec


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(records: list[Record], wall: float, concurrency: int) -> dict:
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {"concurrency": concurrency, "requests": len(records), "errors": len(records) - len(ok),
           "duration_s": wall, "output_tokens": sum(r.output_tokens for r in ok),
           "output_tok_per_s": sum(r.output_tokens for r in ok) / wall if wall > 0 else 0.0}
    metrics = {"ttft_ms": [r.ttft * 1e3 for r in ok], "tpot_ms": [r.tpot * 1e3 for r in ok if r.tpot is not None],
               "itl_ms": [x * 1e3 for r in ok for x in r.itl], "e2e_ms": [r.e2e * 1e3 for r in ok]}
    for name, xs in metrics.items():
        out[name] = {"mean": statistics.mean(xs) if xs else float("nan"),
                     **{f"p{q}": _pct(xs, q) for q in (50, 90, 99)}}
    return out


async def run_bench_serve(base: str, *, concurrency: list[int], input_len: int, output_len: int,
                          num_prompts: int | None = None, model: str | None = None, api_key: str | None = None,
                          seed: int = 0, progress=lambda msg: None, records_path: str | None = None,
                          sampling: dict | None = None) -> dict:
    """``sampling``: request fields sent with every request (``temperature``, ``top_p``, ``top_k``); greedy
    (temperature 0) when absent."""
    import httpx

    sampling = sampling or {}

    base = base.rstrip("/")
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        if model is None:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            try:
                resp = await client.get(f"{base}/v1/models", headers=headers)
                resp.raise_for_status()
                model = resp.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                raise FerrumError(f"cannot list the models of {base} ({e.__class__.__name__}: {e}); is an OpenAI "
                                  "server running there? (or pass --model)") from None
        words = max(1, round(input_len / await _words_per_token(client, base, model)))
        rng = random.Random(seed)
        results = []
        sink = open(records_path, "w") if records_path else None
        try:
            for c in concurrency:
                n = num_prompts or max(8, 4 * c)
                prompts = [_prompt(rng, words) for _ in range(n)]
                done = [0]  # requests finished at this level, for the progress line

                async def task(p: str, sem: asyncio.Semaphore, c: int, n: int, done: list[int]) -> Record:
                    async with sem:
                        rec = await _one(client, base, model, p, output_len, c, api_key, sampling)
                    done[0] += 1
                    progress(f"concurrency {c}: {done[0]}/{n} requests" + (f" (error: {rec.error})" if rec.error else ""))
                    return rec

                sem = asyncio.Semaphore(c)
                t0 = time.perf_counter()
                records = await asyncio.gather(*[task(p, sem, c, n, done) for p in prompts])
                summary = summarize(list(records), time.perf_counter() - t0, c)
                results.append(summary)
                if sink:
                    for r in records:
                        sink.write(json.dumps({**asdict(r), "tpot": r.tpot}) + "\n")
        finally:
            if sink:
                sink.close()
    return {"url": base, "model": model, "input_len": input_len, "output_len": output_len,
            "sampling": {"temperature": 0.0, **sampling}, "results": results}


def format_table(result: dict) -> str:
    lines = [f"bench-serve {result['url']} ({result['model']}): input ~{result['input_len']} tokens, "
             f"output {result['output_len']} tokens, "
             + ", ".join(f"{k} {v}" for k, v in result.get("sampling", {"temperature": 0.0}).items()), "",
             "| conc | reqs | errors | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p99 ms | E2E p50/p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    def pct(r: dict, k: str, qs=(50, 90, 99)) -> str:
        return "/".join(f"{r[k][f'p{q}']:.1f}" for q in qs)

    for r in result["results"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['output_tok_per_s']:.1f} | "
                     f"{pct(r, 'ttft_ms')} | {pct(r, 'tpot_ms')} | {pct(r, 'itl_ms', (50, 99))} | "
                     f"{pct(r, 'e2e_ms', (50, 99))} |")
    return "\n".join(lines)


def _sampling(args) -> dict:
    """The sampling fields the flags ask for; one-line errors for values no server takes."""
    out: dict[str, float | int] = {}
    if args.temperature is not None:
        if not args.temperature >= 0:
            raise SystemExit("ferrum: error: --temperature takes a value >= 0 (0 = greedy)")
        out["temperature"] = args.temperature
    if args.top_p is not None:
        if not 0 < args.top_p <= 1:
            raise SystemExit("ferrum: error: --top-p takes a value in (0, 1]")
        out["top_p"] = args.top_p
    if args.top_k is not None:
        if args.top_k < 1:
            raise SystemExit("ferrum: error: --top-k takes a positive integer")
        out["top_k"] = args.top_k
    return out


def main(args) -> int:
    conc = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    if not conc or any(c < 1 for c in conc):
        raise SystemExit("ferrum: error: --concurrency takes positive integers, e.g. 1,4,16")

    def show(msg: str) -> None:
        if not args.json:
            print(f"\r  {msg}\033[K", end="", file=sys.stderr, flush=True)

    result = asyncio.run(run_bench_serve(args.url, concurrency=conc, input_len=args.input_len,
                                         output_len=args.output_len, num_prompts=args.num_prompts, model=args.model,
                                         api_key=args.api_key, seed=args.seed, progress=show,
                                         records_path=args.records, sampling=_sampling(args)))
    if not args.json:
        print(file=sys.stderr)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0

"""Cost of grammar-constrained decoding on SmolLM2 (`cpu`): per-token time of constrained vs free decoding
at batch 1 and 16 (same run, alternating, median of 3), and the time to compile typical schemas. Not a
test: it writes a report and a raw log under docs/bench/.

    python bench/structured_cpu.py [ARTIFACT]     # default: compiles smollm2 into a temp dir

Both modes generate exactly 128 tokens per request: free decoding with ignore_eos, constrained decoding
under a schema that cannot complete within 128 tokens (an array of 200 strings): plain strings (the
common case) and strings with maxLength (xgrammar's slowest mask: bounded repetition is not cached).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench"
def _long(item: dict) -> dict:
    return {"type": "object", "properties": {"items": {"type": "array", "maxItems": 200, "minItems": 200,
                                                       "items": item}},
            "required": ["items"], "additionalProperties": False}


LONG = {"strings": _long({"type": "string"}), "maxLength strings": _long({"type": "string", "maxLength": 12})}
TYPICAL = {
    "person (4 fields, nested array)": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
        "required": ["name", "age", "email", "hobbies"]},
    "order ($defs, enum, anyOf, 3 levels)": {"$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1},
        "price": {"type": "number"}}, "required": ["sku", "qty", "price"]}},
        "type": "object", "properties": {"id": {"type": "string"}, "status": {"enum": ["new", "paid", "shipped"]},
                                         "items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                                         "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["id", "status", "items"]},
}


def main(artifact: Path) -> None:
    from ferrum_runtime.engine import Engine, EngineConfig
    from ferrum_runtime.sampler import SamplingParams
    from ferrum_runtime.structured import Constraint

    engine = Engine.from_artifact(artifact, EngineConfig(num_blocks=1024, max_num_seqs=16, max_num_batched_tokens=512))
    t0 = time.perf_counter()
    structured = engine.structured
    setup = time.perf_counter() - t0
    compile_ms = {}
    for name, schema in TYPICAL.items():
        c = Constraint("json_schema", json.dumps(schema), "s")
        t0 = time.perf_counter()
        structured.compile(c)
        compile_ms[name] = (time.perf_counter() - t0) * 1e3
    constraints = {name: Constraint("json_schema", json.dumps(s), "s") for name, s in LONG.items()}

    async def run(batch: int, mode: str) -> float:
        params = SamplingParams(max_tokens=128, temperature=1.0, seed=0, ignore_eos=mode == "free")

        async def one(i: int) -> int:
            n = 0
            async for d in engine.generate(f"Request {i}: list some words.", params,
                                           constraint=constraints.get(mode)):
                n += len(d.token_ids)
                assert d.finish_reason in (None, "length"), d.finish_reason
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*[one(i) for i in range(batch)])
        assert all(c == 128 for c in counts), counts
        return (time.perf_counter() - t0) / 128 * 1e3  # ms per decode step (prefill included, same in both)

    modes = ["free", *constraints]
    asyncio.run(run(1, "strings"))  # warm-up
    results: dict[str, list[float]] = {}
    for _ in range(3):
        for batch in (1, 16):
            for mode in modes:
                results.setdefault(f"b{batch}-{mode}", []).append(asyncio.run(run(batch, mode)))
    med = {k: statistics.median(v) for k, v in results.items()}
    date = datetime.date.today().isoformat()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    lines = [f"# {date} structured output overhead on cpu (SmolLM2 Q4_1/Q8_0)", "",
             "`python bench/structured_cpu.py`", "", f"Machine: {model}, 2 threads (raw/{date}-structured-lscpu.txt).", "",
             "| batch | free (ms/step) | " + " | ".join(f"{m} (ms/step, overhead)" for m in constraints) + " |",
             "|---|---|" + "---|" * len(constraints)]
    for batch in (1, 16):
        f = med[f"b{batch}-free"]
        cells = [f"{med[f'b{batch}-{m}']:.2f} ({100 * (med[f'b{batch}-{m}'] - f) / f:+.1f}%)" for m in constraints]
        lines.append(f"| {batch} | {f:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Grammar engine set-up for this vocabulary (once per server): {setup * 1e3:.0f} ms.", "",
              "| schema | compile (ms) |", "|---|---|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in compile_ms.items()]
    lines.append("")
    (OUT / f"{date}-structured-cpu.md").write_text("\n".join(lines))
    (OUT / "raw" / f"{date}-structured-cpu.log").write_text(json.dumps(
        {"ms_per_step": results, "setup_ms": setup * 1e3, "compile_ms": compile_ms}, indent=1))
    (OUT / "raw" / f"{date}-structured-lscpu.txt").write_text(lscpu)
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", "compile", "smollm2", "-o", f"{tmp}/a"],
                           check=True, capture_output=True)
            main(Path(tmp) / "a")

"""`ferrum bench` and `ferrum bench-serve` run for a few steps on a tiny model and give well-formed JSON
(correctness only: no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from .test_cli import ferrum
from .test_server import running_server

pytestmark = pytest.mark.e2e


def test_bench_json(chat_artifact):
    res = ferrum("bench", chat_artifact, "-p", "32,64", "-n", "4", "-d", "0,16", "-b", "1,3", "-r", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    tests = [r["test"] for r in out["rows"]]
    assert tests == ["pp32", "pp64", "tg4@d0", "tg4@d16", "decode b1", "decode b3", "ttft"]
    for r in out["rows"]:
        assert r["tok_per_s"] > 0 and len(r["runs"]) == 2 and all(s > 0 for s in r["runs"])
    assert out["rows"][5]["tokens"] == 3 * 32
    table = ferrum("bench", chat_artifact, "-p", "32", "-n", "2", "-d", "0", "-b", "1", "-r", "1", "--no-ttft")
    assert table.returncode == 0 and "| pp32 | 32 |" in table.stdout and "ttft" not in table.stdout


def test_bench_serve_json_and_records(chat_artifact, tmp_path):
    with running_server(chat_artifact) as base:
        records = tmp_path / "records.jsonl"
        res = ferrum("bench-serve", base, "--concurrency", "1,2", "--input-len", "16", "--output-len", "6",
                     "--num-prompts", "3", "--records", records, "--json")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["model"] == "tiny" and [r["concurrency"] for r in out["results"]] == [1, 2]
        for r in out["results"]:
            assert r["requests"] == 3 and r["errors"] == 0 and r["output_tokens"] == 3 * 6
            assert r["output_tok_per_s"] > 0 and 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
            assert r["e2e_ms"]["p50"] >= r["ttft_ms"]["p50"]
        lines = [json.loads(line) for line in records.read_text().splitlines()]
        assert len(lines) == 6 and all(line["ok"] and line["output_tokens"] == 6 for line in lines)
        sampled = ferrum("bench-serve", base, "--concurrency", "2", "--input-len", "16", "--output-len", "4",
                         "--num-prompts", "2", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20", "--json")
        out = json.loads(sampled.stdout)  # the server takes all three fields (it refuses unknown ones with 400)
        assert out["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 20}
        assert out["results"][0]["errors"] == 0 and out["results"][0]["output_tokens"] == 2 * 4
        wrong = ferrum("bench-serve", base, "--top-p", "1.5")
        assert wrong.returncode == 1 and wrong.stderr.strip() == "ferrum: error: --top-p takes a value in (0, 1]"
        bad = ferrum("bench-serve", base.replace(base.rsplit(":", 1)[1], "9"), "--concurrency", "1",
                     "--num-prompts", "2", "--model", "tiny", "--json")  # nothing listens: errors, no crash
        assert bad.returncode == 0 and json.loads(bad.stdout)["results"][0]["errors"] == 2
        down = ferrum("bench-serve", "http://127.0.0.1:9", "--concurrency", "1")  # nothing to list models from
        assert down.returncode == 2 and "cannot list the models" in down.stderr

"""The OpenAI-compatible server as a real process, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e

KEY = "sk-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact, *extra) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ferrum_runtime.cli", "serve", str(artifact), "--port", str(port),
                             "--served-model-name", "tiny", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become healthy")


@contextlib.contextmanager
def running_server(artifact, *extra):
    """``start_server``, stopped with SIGTERM (graceful shutdown) on exit."""
    proc, base = start_server(artifact, *extra)
    try:
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            proc.kill()


@pytest.fixture(scope="module")
def server(chat_artifact):
    with running_server(chat_artifact, "--api-key", KEY, "--max-num-seqs", "16", "--max-waiting", "64") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def post(base, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}{path}", content=raw if raw is not None else json.dumps(body),
                      headers={**headers, "Content-Type": "application/json"}, timeout=60)


MSG = [{"role": "user", "content": "Hello there"}]


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == 512
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["max_model_len"] == 512


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_stream_with_usage(server, client):
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    greedy = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, stream=True, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in greedy if c.choices) == again.choices[0].message.content
    assert isinstance(text, str)
    raw = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                     json={"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True})
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and sum(e == "data: [DONE]" for e in events) == 1


def test_completions_prompt_forms(client):
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=4, extra_body={"ignore_eos": True})
    assert len(r.choices) == 1 and r.usage.completion_tokens == 4
    r = client.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=3, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3] and r.usage.completion_tokens == 12
    r = client.completions.create(model="tiny", prompt=[1, 2, 3, 4], max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 4


def test_echo_scoring(client):
    r = client.completions.create(model="tiny", prompt="one two three four", max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "one two three four"
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens and r.usage.completion_tokens == 0


def test_stop_n_seed_logprobs(client):
    base = client.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    if len(base) > 4:
        stop = base[2:4]
        cut = client.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
        assert cut.finish_reason == "stop" and cut.text == base[:base.index(stop)]
    a = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, n=2, seed=7, temperature=1.0)
    b = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, n=2, seed=7, temperature=1.0)
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, logprobs=True, top_logprobs=2,
                                       temperature=0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].token == t.token for t in content)  # greedy takes the most likely


def test_errors(server, client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": MSG}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(server, "/v1/chat/completions", None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(server, "/v1/completions", None, raw=json.dumps({"model": "tiny", "prompt": "x" * (9 << 20)}).encode())
    assert r.status_code == 413
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": list(range(1, 511)), "max_tokens": 10})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "510" in err["message"]
    assert "512" in err["message"]


def test_bad_request_table_over_http(server):
    """The protocol layer's table of bad requests, over HTTP: 400, the same param and code (cases whose
    verdict depends on the imaginary model's vocabulary or context size are left out)."""
    from .test_openai_protocol import BAD

    checked = 0
    for case, body, param, code in BAD:
        if "vocab" in case or "context" in case:
            continue
        is_chat = isinstance(body, dict) and ("messages" in body or body == {"model": "m"})
        if isinstance(body, dict) and body.get("model") == "m":
            body = {**body, "model": "tiny"}
        r = post(server, "/v1/chat/completions" if is_chat else "/v1/completions", body)
        assert r.status_code == 400, (case, r.text)
        err = r.json()["error"]
        assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), (case, err)
        checked += 1
    assert checked >= 40


def test_disconnects_free_everything(server):
    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            async def one():
                async with http.stream("POST", f"{server}/v1/chat/completions",
                                       headers={"Authorization": f"Bearer {KEY}"},
                                       json={"model": "tiny", "messages": MSG, "max_tokens": 400, "stream": True,
                                             "ignore_eos": True}) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            return  # leave after the first chunk
            await asyncio.gather(*(one() for _ in range(8)))

    asyncio.run(main())
    for _ in range(200):
        h = httpx.get(f"{server}/health").json()
        if h["running"] == 0 and h["waiting"] == 0 and h["kv_cache_usage"] == 0:
            break
        time.sleep(0.05)
    assert h["running"] == 0 and h["kv_cache_usage"] == 0, h
    metrics = httpx.get(f"{server}/metrics").text
    line = next(l for l in metrics.splitlines() if l.startswith("ferrum:client_disconnects_total"))
    assert float(line.split()[-1]) >= 8


def test_32_concurrent_streams(server):
    import openai

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)

        async def one(i):
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=5 + i % 4, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            return chunks[-1].usage.completion_tokens, 5 + i % 4

        return await asyncio.gather(*(one(i) for i in range(32)))

    for got, want in asyncio.run(main()):
        assert got == want


def test_metrics_names(server):
    text = httpx.get(f"{server}/metrics").text
    for name in ("ferrum:num_requests_running", "ferrum:num_requests_waiting", "ferrum:kv_cache_usage_perc",
                 "ferrum:prompt_tokens_total", "ferrum:generation_tokens_total", "ferrum:prefix_cache_queries_total",
                 "ferrum:prefix_cache_hits_total", "ferrum:num_preemptions_total",
                 "ferrum:spec_decode_num_draft_tokens_total", "ferrum:spec_decode_num_accepted_tokens_total",
                 "ferrum:time_to_first_token_seconds_bucket", "ferrum:inter_token_latency_seconds_bucket",
                 "ferrum:e2e_request_latency_seconds_bucket", "ferrum:request_queue_time_seconds_bucket"):
        assert name in text, name


def test_tokenize_detokenize(server):
    r = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    assert post(server, "/detokenize", {"tokens": [10 ** 9]}).status_code == 400


def test_fuzzed_requests_never_5xx(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=8)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                          max_leaves=12)
    fields = st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                              "stream", "logprobs", "top_logprobs", "logit_bias", "echo", "stream_options", "top_k",
                              "presence_penalty", "tools", "response_format", "max_completion_tokens"])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(endpoint=st.sampled_from(["chat/completions", "completions"]),
           body=st.dictionaries(fields, values, max_size=6))
    def check(endpoint, body):
        body = {"model": "tiny", "max_tokens": 2, **body}
        r = post(server, f"/v1/{endpoint}", body)
        assert r.status_code < 500, (body, r.text)

    check()
    assert httpx.get(f"{server}/health").status_code == 200


def test_sigterm_drains_in_flight_requests(chat_artifact):
    proc, base = start_server(chat_artifact)
    try:
        with httpx.stream("POST", f"{base}/v1/completions", timeout=120,
                          json={"model": "tiny", "prompt": "x", "max_tokens": 60, "stream": True,
                                "ignore_eos": True}) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert first and rest[-1] == "data: [DONE]"
        finish = [json.loads(l[5:])["choices"][0]["finish_reason"] for l in rest[:-1] if json.loads(l[5:])["choices"]]
        assert finish[-1] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_full_queue_gets_429_with_retry_after(chat_artifact):
    proc, base = start_server(chat_artifact, "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        async def main():
            async with httpx.AsyncClient(timeout=120) as http:
                async def one():
                    return await http.post(f"{base}/v1/completions", json={
                        "model": "tiny", "prompt": "x", "max_tokens": 400, "ignore_eos": True})
                return await asyncio.gather(*(one() for _ in range(8)))

        results = asyncio.run(main())
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["type"] == "rate_limit_exceeded"
    finally:
        proc.kill()

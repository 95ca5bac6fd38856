"""``ferrum serve``: the OpenAI-compatible HTTP server on Sanic, over one engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics,
POST /tokenize, POST /detokenize, GET /openapi.json. Requests are parsed and checked completely
(``openai_protocol``) before anything reaches the engine; every error is OpenAI-shaped JSON with the
right status, never a traceback. Streams are SSE exactly as OpenAI sends them. A client that goes
away aborts its request (its KV blocks are freed at the next engine step). SIGTERM stops accepting
connections and lets in-flight requests finish (Sanic's graceful shutdown).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from . import openai_protocol as proto
from .chat_output import ChatOutput
from .engine import Delta, Engine, EngineConfig, RequestError, ThinkTokens
from .errors import FerrumError
from .metrics import Metrics
from .openai_protocol import APIError
from .sampler import SamplingError
from .structured import (Constraint, ConstraintError, template_renders_tools, tool_format, tool_messages_as_text,
                         tools_system_prompt)

log = logging.getLogger("ferrum.server")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_body_bytes: int = 8 << 20
    max_waiting: int = 256  # requests queued beyond max_num_seqs; more get 429
    cors: bool = False
    disable_thinking: bool = False  # enable_thinking=False for templates that read it, unless a request sets it
    engine: EngineConfig = EngineConfig()


class Server:
    def __init__(self, artifact: str | Path, config: ServeConfig = ServeConfig()):
        from sanic import Sanic

        self.artifact = Path(artifact)
        self.config = config
        self.model_name = config.served_model_name or self.artifact.name
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self._in_flight = 0  # admitted generation requests not yet answered
        self.metrics = Metrics(self)
        app = Sanic("ferrum", configure_logging=False)
        app.config.REQUEST_MAX_SIZE = config.max_body_bytes
        app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 60.0
        app.config.KEEP_ALIVE_TIMEOUT = 30
        app.config.FALLBACK_ERROR_FORMAT = "json"
        self.app = app
        self._routes()

    # ------------------------------------------------------------------ wiring
    def _routes(self) -> None:
        from sanic import response

        app = self.app

        @app.before_server_start
        async def load(app_):
            app_.add_task(self._load())

        @app.on_request
        async def auth(request):
            if self.config.api_key and request.path.startswith("/v1/"):
                if request.headers.get("authorization", "") != f"Bearer {self.config.api_key}":
                    raise APIError(401, "invalid or missing API key; send `Authorization: Bearer KEY`",
                                   type="authentication_error", code="invalid_api_key")

        if self.config.cors:
            @app.on_response
            async def cors(request, resp):
                resp.headers["Access-Control-Allow-Origin"] = "*"
                resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"

        @app.exception(Exception)
        async def errors(request, exc):
            return self._error_response(exc)

        @app.get("/health")
        async def health(request):
            if self.engine is None:
                body = {"status": "error" if self.load_error else "loading", "error": self.load_error}
                return response.json(body, status=503, headers={"Retry-After": "1"})
            s = self.engine.stats()
            return response.json({"status": "ok", "model": self.model_name, "running": s["running"],
                                  "waiting": s["waiting"], "kv_cache_usage": s["kv_usage"],
                                  "num_blocks": s["num_blocks"], "max_model_len": self.engine.capacity})

        @app.get("/metrics")
        async def metrics(request):
            return response.raw(self.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

        @app.get("/openapi.json")
        async def openapi(request):
            e = self.engine
            return response.json(proto.openapi_document(vocab_size=e.model.vocab_size if e else None,
                                                        max_model_len=e.capacity if e else None,
                                                        models=[self.model_name]))

        @app.get("/v1/models")
        async def models(request):
            engine = self._ready()
            card = proto.model_card(self.model_name, int(self.artifact.stat().st_mtime), engine.capacity)
            return response.json(proto.model_list([card]))

        @app.post("/tokenize")
        async def tokenize(request):
            engine = self._ready()
            body = _json_body(request, object_only=True)
            tok = self._tokenizer(engine)
            if isinstance(body.get("messages"), list):
                chat = proto.parse_chat_request({"model": self.model_name, **body}, vocab_size=engine.model.vocab_size,
                                                max_model_len=engine.capacity)
                text = tok.render_chat(chat.messages, add_generation_prompt=chat.add_generation_prompt,
                                       **self._template_kwargs(chat.chat_template_kwargs))
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise APIError(400, "send `prompt` (a string) or `messages` (a list)", param="prompt")
            ids = tok.encode(text)
            return response.json({"tokens": ids, "count": len(ids), "max_model_len": engine.capacity})

        @app.post("/detokenize")
        async def detokenize(request):
            engine = self._ready()
            body = _json_body(request, object_only=True)
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                    and 0 <= t < engine.model.vocab_size for t in ids):
                raise APIError(400, f"`tokens` must be a list of token ids in [0, {engine.model.vocab_size})",
                               param="tokens")
            return response.json({"prompt": self._tokenizer(engine).tokenizer.decode(ids, skip_special_tokens=False)})

        @app.post("/v1/chat/completions")
        async def chat(request):
            try:
                return await self._chat(request)
            finally:
                self._release(request)

        @app.post("/v1/completions")
        async def completions(request):
            try:
                return await self._completions(request)
            finally:
                self._release(request)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.engine = await loop.run_in_executor(None, Engine.from_artifact, self.artifact, self.config.engine)
            gc.freeze()  # what loading built lives as long as the server: keep the collector off it
            log.info("ferrum: serving %s from %s", self.model_name, self.artifact)
            m = self.engine.model
            log.info("ferrum: KV cache %.2f GiB: %d blocks of %d tokens, %d tokens in all (context %d)",
                     m.num_blocks * m.kv_block_bytes / 2**30, m.num_blocks, m.block_size,
                     m.num_blocks * m.block_size, self.engine.capacity)
        except FerrumError as e:
            self.load_error = str(e)
            log.error("ferrum: error: %s", e)

    def run(self) -> None:
        self.app.run(host=self.config.host, port=self.config.port, single_process=True, access_log=False, motd=False)

    # ------------------------------------------------------------------ helpers
    def _template_kwargs(self, asked: dict) -> dict:
        """A request's template variables over the server's defaults (``--disable-thinking``)."""
        return {"enable_thinking": False, **asked} if self.config.disable_thinking else asked

    def _ready(self) -> Engine:
        if self.engine is None:
            raise APIError(503, "the model is still loading" if not self.load_error else self.load_error,
                           type="server_error", code="model_loading")
        return self.engine

    @staticmethod
    def _tokenizer(engine: Engine):
        if engine.tokenizer is None:
            raise APIError(400, "this artifact has no tokenizer: send token ids to /v1/completions", param="prompt")
        return engine.tokenizer

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           type="not_found_error", param="model", code="model_not_found")

    def _admit(self, request, engine: Engine) -> None:
        """Count a valid generation request in; refuse it when more than ``max_waiting`` would queue
        behind the ``max_num_seqs`` that can run. Counted here, synchronously, so that a burst of
        arrivals cannot all slip past before any reaches the engine."""
        if self._in_flight >= engine.config.max_num_seqs + self.config.max_waiting:
            raise APIError(429, "the server is busy: too many queued requests; retry shortly",
                           type="rate_limit_exceeded", code="queue_full")
        self._in_flight += 1
        request.ctx.admitted = True

    def _release(self, request) -> None:
        if getattr(request.ctx, "admitted", False):
            self._in_flight -= 1
            request.ctx.admitted = False

    def _error_response(self, exc: BaseException):
        from sanic import response
        from sanic.exceptions import MethodNotAllowed, NotFound, PayloadTooLarge, SanicException

        if isinstance(exc, APIError):
            err = exc
        elif isinstance(exc, (RequestError, SamplingError)):
            err = APIError(400, str(exc), param=exc.param, code=getattr(exc, "code", None))
        elif isinstance(exc, FerrumError):  # chat template errors and other user-fixable problems
            err = APIError(400, str(exc))
        elif isinstance(exc, PayloadTooLarge):
            err = APIError(413, f"the request body exceeds {self.config.max_body_bytes} bytes", code="payload_too_large")
        elif isinstance(exc, NotFound):
            err = APIError(404, "no such endpoint", type="not_found_error")
        elif isinstance(exc, MethodNotAllowed):
            err = APIError(405, str(exc))
        elif isinstance(exc, SanicException) and exc.status_code < 500:
            err = APIError(exc.status_code, str(exc))
        else:
            log.exception("ferrum: internal error", exc_info=exc)
            err = APIError(500, "internal server error", type="server_error")
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return response.json(err.to_dict(), status=err.status, headers=headers)

    # ------------------------------------------------------------------ generation endpoints
    async def _chat(self, request):
        engine = self._ready()
        req = proto.parse_chat_request(_json_body(request), vocab_size=engine.model.vocab_size,
                                       max_model_len=engine.capacity)
        self._check_model(req.model)
        tok = self._tokenizer(engine)
        calling = bool(req.tools) and req.tool_choice != "none"
        messages = req.messages
        if not template_renders_tools(tok.chat_template):  # the generic format, spelled out for the model
            messages = tool_messages_as_text(messages)
            if calling and req.tools:
                messages = [{"role": "system", "content": tools_system_prompt(req.tools)}] + messages
        text = tok.render_chat(messages, add_generation_prompt=req.add_generation_prompt, tools=req.tools,
                               **self._template_kwargs(req.chat_template_kwargs))
        ids = tok.encode(text)
        params = req.params_for(len(ids))
        engine.check(ids, params)
        fmt = tool_format(tok.chat_template)
        constraint = Constraint.tools(fmt, req.tools or [], req.tool_choice, req.parallel_tool_calls) \
            if calling else req.constraint
        await self._compile(engine, constraint)
        think = _think_tokens(tok, text)
        self._admit(request, engine)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        deltas = self._generate(engine, [ids], params, rid, constraint, think)
        token_text = self._token_text(engine)
        names = frozenset(t["function"]["name"] for t in req.tools or [])

        def output() -> ChatOutput:
            return ChatOutput(reasoning=think is not None, opened=bool(think and think.opened),
                              tool_format=fmt if calling else None, tool_names=names)

        if req.stream:
            return await self._stream(request, self._chat_events(req, rid, created, deltas, len(ids), token_text,
                                                                 output))
        outs: dict[int, ChatOutput] = {}
        lps: dict[int, list] = {}
        finish: dict[int, str] = {}
        usage = [len(ids), 0]
        async for _, d in deltas:
            out = outs.setdefault(d.index, output())
            out.feed(d.text)
            lps.setdefault(d.index, []).extend(d.logprobs or [])
            if d.finish_reason:
                out.flush()
                finish[d.index] = d.finish_reason
                usage[1] += d.completion_tokens
        choices = []
        for i in sorted(outs):
            content, reasoning, calls = outs[i].message()
            choices.append(proto.chat_choice(i, content, _chat_reason(finish[i], calls),
                                             proto.chat_logprobs(lps[i], token_text) if req.logprobs else None,
                                             reasoning=reasoning, tool_calls=calls))
        return _json(proto.chat_completion(rid, created, self.model_name, choices, proto.usage_dict(*usage)))

    async def _compile(self, engine: Engine, constraint: Constraint | None) -> None:
        """Compile the request's grammar before admitting it (a bad one is a 400; the first one builds the
        grammar engine's vocabulary tables, so it runs off the event loop)."""
        if constraint is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.compile_constraint, constraint)
        except ConstraintError as e:
            raise APIError(400, str(e), param=e.param) from None

    async def _completions(self, request):
        engine = self._ready()
        req = proto.parse_completion_request(_json_body(request), vocab_size=engine.model.vocab_size,
                                             max_model_len=engine.capacity)
        self._check_model(req.model)
        prompts = [p if isinstance(p, list) else self._tokenizer(engine).encode(p) for p in req.prompts]
        params = req.params_for(max(len(p) for p in prompts))
        for p in prompts:
            engine.check(p, params)
        await self._compile(engine, req.constraint)
        self._admit(request, engine)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        token_text = self._token_text(engine)
        deltas = self._generate(engine, prompts, params, rid, req.constraint)
        n = params.n
        if req.stream:
            return await self._stream(request, self._completion_events(req, rid, created, deltas, prompts, n,
                                                                       token_text, engine))
        out: dict[int, dict] = {}
        usage = [sum(len(p) for p in prompts), 0]
        async for p_idx, d in deltas:
            o = out.setdefault(p_idx * n + d.index, {"text": [], "lps": [], "prompt_lps": None, "finish": None,
                                                     "prompt": p_idx})
            o["text"].append(d.text)
            o["lps"].extend(d.logprobs or [])
            o["prompt_lps"] = o["prompt_lps"] or d.prompt_logprobs
            if d.finish_reason:
                o["finish"] = d.finish_reason
                usage[1] += d.completion_tokens
        choices = []
        for i in sorted(out):
            o = out[i]
            prompt_ids = prompts[o["prompt"]]
            text = "".join(o["text"])
            echo_text = self._echo_text(engine, req.prompts[o["prompt"]], prompt_ids) if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = proto.completion_logprobs(o["lps"], token_text, echo_prompt=prompt_ids if req.echo else None,
                                                     prompt_logprobs=o["prompt_lps"] if req.echo else None)
            choices.append(proto.completion_choice(i, echo_text + text, _reason(o["finish"]), logprobs))
        return _json(proto.completion(rid, created, self.model_name, choices, proto.usage_dict(*usage)))

    @staticmethod
    def _echo_text(engine: Engine, prompt, prompt_ids: list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return engine.tokenizer.tokenizer.decode(prompt_ids, skip_special_tokens=False) if engine.tokenizer else ""

    @staticmethod
    def _token_text(engine: Engine):
        tok = engine.tokenizer

        def text(token_id: int) -> str:
            return tok.tokenizer.decode([token_id], skip_special_tokens=False) if tok else str(token_id)

        return text

    async def _generate(self, engine: Engine, prompts: list[list[int]], params, rid: str,
                        constraint: Constraint | None = None,
                        think: ThinkTokens | None = None) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas of every prompt's generation, merged as they come, tagged with the prompt's index."""
        labels = [self.model_name]
        t0 = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, ids: list[int]):
            try:
                async for d in engine.generate(ids, params, request_id=f"{rid}-{i}", constraint=constraint,
                                               think=think):
                    await queue.put((i, d))
            except Exception as exc:  # noqa: BLE001 - a failed engine step: raised below, answered as a 500
                await queue.put(exc)
            finally:
                await queue.put(done)

        self.metrics.running.labels(*labels).inc()
        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        remaining = len(tasks)
        last: dict[tuple[int, int], float] = {}
        first_seen = False
        finished_ok = False
        try:
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                i, d = item
                now = time.monotonic()
                if d.queue_time is not None:
                    self.metrics.queue.labels(*labels).observe(d.queue_time)
                if d.token_ids:
                    if not first_seen:
                        self.metrics.ttft.labels(*labels).observe(now - t0)
                        first_seen = True
                    elif (i, d.index) in last:
                        self.metrics.itl.labels(*labels).observe(now - last[(i, d.index)])
                    last[(i, d.index)] = now
                    self.metrics.generation_tokens.labels(*labels).inc(len(d.token_ids))
                if d.finish_reason:
                    self.metrics.requests.labels(*labels, d.finish_reason).inc()
                yield i, d
            finished_ok = True
            self.metrics.e2e.labels(*labels).observe(time.monotonic() - t0)
            self.metrics.prompt_tokens.labels(*labels).inc(sum(len(p) for p in prompts))
        finally:
            if not finished_ok:
                self.metrics.disconnects.labels(*labels).inc()
            for t in tasks:
                t.cancel()  # closes the engine streams: unfinished requests are aborted
            await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.running.labels(*labels).dec()

    async def _chat_events(self, req, rid: str, created: int, deltas, prompt_tokens: int, token_text, output):
        """OpenAI's chat stream: per choice a role chunk, then reasoning_content / content / tool-call chunks,
        one chunk with finish_reason; then the usage chunk (``choices: []``) when asked for."""
        outs: dict[int, ChatOutput] = {}
        completion_tokens = 0
        async for _, d in deltas:
            if d.index not in outs:
                outs[d.index] = output()
                yield proto.chat_chunk(rid, created, self.model_name, d.index, {"role": "assistant", "content": ""}, None)
            out = outs[d.index]
            parts = out.feed(d.text) + (out.flush() if d.finish_reason else [])
            logprobs = proto.chat_logprobs(d.logprobs, token_text) if req.logprobs and d.logprobs else None
            if logprobs is not None and not parts:
                parts = [{}]  # the tokens' logprobs even while their text is held back
            for k, part in enumerate(parts):
                yield proto.chat_chunk(rid, created, self.model_name, d.index, part, None,
                                       logprobs if k == 0 else None)
            if d.finish_reason:
                calls = out.message()[2]
                yield proto.chat_chunk(rid, created, self.model_name, d.index, {}, _chat_reason(d.finish_reason, calls))
                completion_tokens += d.completion_tokens
        if req.include_usage:
            yield proto.chat_usage_chunk(rid, created, self.model_name, proto.usage_dict(prompt_tokens, completion_tokens))

    async def _completion_events(self, req, rid: str, created: int, deltas, prompts: list[list[int]], n: int,
                                 token_text, engine: Engine):
        started: set[int] = set()
        completion_tokens = 0
        async for p_idx, d in deltas:
            index = p_idx * n + d.index
            text = d.text
            logprobs = None
            if index not in started:
                started.add(index)
                if req.echo:
                    text = self._echo_text(engine, req.prompts[p_idx], prompts[p_idx]) + text
            if req.logprobs is not None and (d.logprobs or d.prompt_logprobs):
                logprobs = proto.completion_logprobs(d.logprobs or [], token_text,
                                                     echo_prompt=prompts[p_idx] if req.echo and d.prompt_logprobs else None,
                                                     prompt_logprobs=d.prompt_logprobs if req.echo else None)
            if text or d.finish_reason or logprobs:
                yield proto.completion_chunk(rid, created, self.model_name, index, text, _reason(d.finish_reason),
                                             logprobs)
            if d.finish_reason:
                completion_tokens += d.completion_tokens
        if req.include_usage:
            usage = proto.usage_dict(sum(len(p) for p in prompts), completion_tokens)
            yield proto.completion_usage_chunk(rid, created, self.model_name, usage)

    async def _stream(self, request, events):
        """Send ``events`` as SSE; an error mid-stream becomes an error event; always one ``[DONE]``."""
        resp = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for event in events:
                await _send(resp, event)
        except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
            if isinstance(exc, FerrumError) and not isinstance(exc, APIError):
                exc = APIError(400, str(exc))
            if not isinstance(exc, APIError):
                log.exception("ferrum: error during a stream", exc_info=exc)
                exc = APIError(500, "internal server error", type="server_error")
            await _send(resp, exc.to_dict())
        await resp.send("data: [DONE]\n\n")
        await resp.eof()
        return resp


def _chat_reason(reason: str, calls: list | None) -> str:
    """A chat answer that ended on its own after tool calls finishes with "tool_calls"."""
    return "tool_calls" if calls and reason == "stop" else _reason(reason)


def _think_tokens(tok, prompt: str) -> ThinkTokens | None:
    """For a reasoning template (``<think>`` / ``</think>`` as single tokens): where the answer starts."""
    template = tok.chat_template or ""
    start, end = tok.tokenizer.token_to_id("<think>"), tok.tokenizer.token_to_id("</think>")
    if "</think>" not in template or start is None or end is None:
        return None
    tail = prompt.rstrip()
    if tail.endswith("</think>"):  # thinking switched off: the template closed an empty block
        return None
    return ThinkTokens(start, end, opened=tail.endswith("<think>"))


def _reason(reason):
    """The engine's finish reasons in OpenAI's words ("abort" only reaches a client that is still there
    when the server itself cancels, e.g. at shutdown)."""
    return "stop" if reason == "abort" else reason


def _json_body(request, object_only: bool = False):
    """The parsed JSON body (any JSON value: the protocol parsers name what is wrong with it)."""
    try:
        body = json.loads(request.body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e.__class__.__name__}: {e})",
                       code="invalid_json") from None
    if object_only and not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    return body


def _json(body: dict):
    from sanic import response

    return response.json(body)


async def _send(resp, payload: dict) -> None:
    await resp.send(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n")

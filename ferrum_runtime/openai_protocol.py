"""The OpenAI HTTP protocol, without HTTP: request parsing, response shapes, errors and the OpenAPI document.

Pure Python (no Sanic, no TVM), so every rule here is unit-tested without a server or a model.

Parsing is strict and complete: a request either becomes a typed ``ChatRequest`` / ``CompletionRequest``
whose ``SamplingParams`` already passed ``validate`` or raises ``APIError(400)`` naming the offending
field as a dotted path (``messages[1].content[0].type``). The rules, field by field:

- ``null`` means "not given" for every optional field (clients send ``"temperature": null``).
- Types are JSON's: a boolean is not an integer, an integer is accepted where a number is expected,
  a float is not accepted where an integer is expected, NaN and infinities are rejected.
- Ranges are OpenAI's documented ones; vLLM / llama.cpp extensions (top_k, min_p, repetition_penalty,
  ignore_eos, stop_token_ids, chat_template_kwargs, add_generation_prompt) are honoured.
- OpenAI fields ferrum cannot honour (audio, deprecated ``functions``, ...) are rejected with code
  ``unsupported_parameter`` / ``unsupported_value`` rather than silently ignored.
- Structured output (``response_format`` json_object / json_schema, the ``grammar`` and ``regex``
  extensions) and ``tools`` are checked here (schemas with ``jsonschema``, names, tool_choice against the
  declared tools); the server compiles the grammar before admitting the request.
- Unknown fields are ignored, as vLLM does (clients add vendor fields freely).

``max_tokens`` defaults depend on the prompt's length, known only after tokenizing, so a request keeps
``max_tokens=None`` when none was sent and ``req.params_for(prompt_tokens)`` resolves it: chat, as many
as the context leaves (``max_model_len - prompt_tokens``); completions, OpenAI's 16, capped by what the
context leaves. A default never fails; an explicit max_tokens that does not fit beside the prompt is a
400 ``context_length_exceeded``. Until resolved, ``params.max_tokens`` holds the largest value any prompt
allows. Always hand the engine ``params_for(...)``'s result.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol, Sequence

from .errors import FerrumError
from .sampler import MAX_LOGPROBS, SamplingError, SamplingParams
from .structured import Constraint, ConstraintError, check_schema

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")
# set by the chat renderer itself (TokenizerFiles.render_chat): a template kwarg cannot override them
RESERVED_TEMPLATE_KWARGS = frozenset({"self", "template", "messages", "add_generation_prompt", "tools",
                                      "special_tokens"})
MAX_N = 128  # OpenAI's limit on n
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions logprobs
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for -inf (JSON has no infinities)

_SEED_RANGE = (-(2**63), 2**64 - 1)  # signed or unsigned 64-bit
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}


class APIError(FerrumError):
    """An error the HTTP layer returns as ``{"error": {...}}`` with ``status``. ``type`` defaults by status
    (400 invalid_request_error, 401 authentication_error, 404 not_found_error, 429 rate_limit_exceeded,
    5xx server_error); ``param`` is the offending request field as a dotted path; ``code`` a string code."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- parsed requests

@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]  # role, content (str; None only for an assistant turn with tool_calls), name,
    #                       tool_calls (function.arguments parsed to an object when it is JSON), tool_call_id,
    #                       reasoning_content
    params: SamplingParams  # max_tokens: as asked, else the most any prompt allows; use params_for
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    chat_template_kwargs: dict
    add_generation_prompt: bool
    max_tokens: int | None  # None: as many as the context leaves
    max_model_len: int
    constraint: Constraint | None = None  # response_format json_object/json_schema, grammar, regex
    tools: list[dict] | None = None  # [{"type": "function", "function": {name, description?, parameters}}]
    tool_choice: str | dict = "auto"  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True

    def params_for(self, prompt_tokens: int) -> SamplingParams:
        """The engine's parameters for a rendered prompt of ``prompt_tokens`` tokens (400 if it cannot fit)."""
        return _fit(self.params, self.max_tokens, prompt_tokens, self.max_model_len, "messages")


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]  # each yields n choices: choice index = prompt index * n + sample index
    params: SamplingParams  # max_tokens: as asked, else min(16, max_model_len - 1); use params_for
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None
    max_tokens: int | None  # None: 16, or what the context leaves if less
    max_model_len: int
    constraint: Constraint | None = None  # grammar, regex, response_format (extensions)

    def params_for(self, prompt_tokens: int) -> SamplingParams:
        """The engine's parameters for a prompt of ``prompt_tokens`` tokens (pass the longest prompt's)."""
        return _fit(self.params, self.max_tokens, prompt_tokens, self.max_model_len, "prompt",
                    COMPLETION_DEFAULT_MAX_TOKENS)


def _fit(params: SamplingParams, asked: int | None, prompt_tokens: int, max_model_len: int, prompt_param: str,
         default: int | None = None) -> SamplingParams:
    """``params`` with max_tokens resolved for the prompt: ``asked``, else ``default`` (None: unbounded) capped
    by what the context leaves."""
    room = max_model_len - prompt_tokens
    if asked is None:
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens and this model's context holds "
                           f"{max_model_len}, leaving no room for a reply; shorten the prompt", param=prompt_param,
                           code="context_length_exceeded")
        return replace(params, max_tokens=room if default is None else min(default, room))
    if asked > room:
        raise APIError(400, f"this model's context holds {max_model_len} tokens; the prompt has {prompt_tokens} "
                       f"and max_tokens asks for {asked} more; lower max_tokens or shorten the prompt",
                       param="max_tokens" if room > 0 else prompt_param, code="context_length_exceeded")
    return params


# ---------------------------------------------------------------------------------------------- field readers

def _kind(v: object) -> str:
    """The JSON type of a parsed value, for messages."""
    if v is None:
        return "null"
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                    (dict, "object")):
        if isinstance(v, t):
            return name
    return type(v).__name__


def _show(v: object) -> str:
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON, or an integer too long to print
        s = f"<{_kind(v)}>"
    s = s if len(s) <= 60 else s[:57] + "..."
    return s.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates as \udxxx


def _unicode(param: str, s: str) -> str:
    """``s`` unless it holds a lone UTF-16 surrogate (valid JSON, but no tokenizer or encoder takes it)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _invalid(param, f"`{param}` has an unpaired UTF-16 surrogate at character {e.start}; send valid "
                       "Unicode") from None
    return s


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, type="invalid_request_error", param=param, code=code)


def _wrong_type(param: str, expected: str, v: object) -> APIError:
    return _invalid(param, f"`{param}` must be {expected}; got {_kind(v)} {_show(v)}", "invalid_type")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range_text(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    return f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"<= {hi}"


def _check_range(param: str, v: float, lo: float | None, hi: float | None, lo_open: bool, kind: str) -> None:
    low = lo is not None and (v <= lo if lo_open else v < lo)
    if low or (hi is not None and v > hi):
        raise _invalid(param, f"`{param}` must be {_range_text(lo, hi, lo_open)}; got {_show(v)}",
                       f"{kind}_{'below_min' if low else 'above_max'}_value")


class _Object:
    """Typed, range-checked reads of one JSON object; errors name the field's dotted path."""

    def __init__(self, value: object, path: str, what: str = "an object"):
        if not isinstance(value, dict):
            if not path:
                raise _invalid(None, f"the request body must be a JSON object; got {_kind(value)}", "invalid_type")
            raise _wrong_type(path, what, value)
        self.d: dict = value
        self.path = path

    def param(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> Any:
        return self.d.get(key)  # None: absent or null

    def require(self, key: str) -> Any:
        v = self.d.get(key)
        if v is None:
            raise _invalid(self.param(key), f"`{self.param(key)}` is required", "missing_required_parameter")
        return v

    def string(self, key: str, *, required: bool = False) -> str | None:
        v = self.require(key) if required else self.d.get(key)
        if v is not None and not isinstance(v, str):
            raise _wrong_type(self.param(key), "a string", v)
        return v if v is None else _unicode(self.param(key), v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise _wrong_type(self.param(key), "a boolean (true or false)", v)
        return v

    def opt_integer(self, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.d.get(key)
        if v is None:
            return None
        if not _is_int(v):
            raise _wrong_type(self.param(key), f"an integer {_range_text(lo, hi, False)}" if lo is not None or
                              hi is not None else "an integer", v)
        _check_range(self.param(key), v, lo, hi, False, "integer")
        return v

    def integer(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        v = self.opt_integer(key, lo, hi)
        return default if v is None else v

    def number(self, key: str, default: float, lo: float | None, hi: float | None, *, lo_open: bool = False) -> float:
        v = self.d.get(key)
        if v is None:
            return default
        return _number(self.param(key), v, lo, hi, lo_open)

    def obj(self, key: str) -> dict | None:
        v = self.d.get(key)
        if v is not None and not isinstance(v, dict):
            raise _wrong_type(self.param(key), "an object", v)
        return v


def _number(param: str, v: object, lo: float | None, hi: float | None, lo_open: bool = False) -> float:
    if not (_is_int(v) or isinstance(v, float)):
        raise _wrong_type(param, f"a number {_range_text(lo, hi, lo_open)}", v)
    assert isinstance(v, (int, float))
    if isinstance(v, float) and not math.isfinite(v):
        raise _invalid(param, f"`{param}` must be a finite number {_range_text(lo, hi, lo_open)}; got {v}")
    _check_range(param, v, lo, hi, lo_open, "decimal")  # ints compare exactly: no float overflow here
    return float(v)


def _token_ids(param: str, v: object, vocab_size: int, where: str) -> list[int]:
    """A non-empty list of token ids in [0, vocab_size); errors name ``param`` and the position in ``where``."""
    if not isinstance(v, list):
        raise _wrong_type(param, "an array of token ids", v)
    if not v:
        raise _invalid(param, f"`{param}`: {where} is an empty token list; send at least one token id", "empty_array")
    for i, t in enumerate(v):
        if not _is_int(t):
            raise _invalid(param, f"`{param}`: {where}[{i}] must be an integer token id; got {_kind(t)} {_show(t)}",
                           "invalid_type")
        if not 0 <= t < vocab_size:
            raise _invalid(param, f"`{param}`: token id {t} at {where}[{i}] is outside this model's vocabulary "
                           f"[0, {vocab_size})")
    return list(v)


# ---------------------------------------------------------------------------------------------- shared fields

def _stream(f: _Object) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = f.boolean("stream", False)
    opts = f.obj("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise _invalid("stream_options", "`stream_options` is only allowed with `stream: true`; remove it or stream")
    o = _Object(opts, "stream_options")
    o.boolean("include_obfuscation", False)  # checked, then ignored: ferrum adds no obfuscation padding
    o.boolean("continuous_usage_stats", False)  # vLLM's; checked, then ignored
    return stream, o.boolean("include_usage", False)


def _stop(f: _Object) -> tuple[str, ...]:
    v = f.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        if not v:
            raise _invalid("stop", "`stop` is an empty string; send a non-empty string or leave it out")
        return (_unicode("stop", v),)
    if not isinstance(v, list):
        raise _wrong_type("stop", f"a string or an array of up to {MAX_STOP} strings", v)
    if len(v) > MAX_STOP:
        raise _invalid("stop", f"`stop` has {len(v)} strings; send at most {MAX_STOP}", "array_above_max_length")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise _wrong_type(f"stop[{i}]", "a string", s)
        if not s:
            raise _invalid(f"stop[{i}]", f"`stop[{i}]` is an empty string; stop strings must be non-empty")
        _unicode(f"stop[{i}]", s)
    return tuple(v)


def _logit_bias(f: _Object, vocab_size: int) -> tuple[tuple[int, float], ...]:
    v = f.obj("logit_bias")
    if v is None:
        return ()
    out = []
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise _invalid("logit_bias", f"`logit_bias` keys must be token ids written as strings (\"50256\"); "
                           f"got {_show(key)}", "invalid_type")
        tid = int(key) if len(key) <= 18 else vocab_size  # int() refuses > 4300 digits
        if tid >= vocab_size:
            raise _invalid("logit_bias", f"`logit_bias`: token id {tid} is outside this model's vocabulary "
                           f"[0, {vocab_size})")
        out.append((tid, _number("logit_bias", bias, -100, 100)))
    return tuple(sorted(out))


def _sampling(f: _Object, vocab_size: int) -> dict[str, Any]:
    """The SamplingParams fields both endpoints share (OpenAI's, then the vLLM / llama.cpp extensions)."""
    stop_ids = f.get("stop_token_ids")
    return dict(
        temperature=f.number("temperature", 1.0, 0, 2),
        top_p=f.number("top_p", 1.0, 0, 1, lo_open=True),
        presence_penalty=f.number("presence_penalty", 0.0, -2, 2),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2, 2),
        logit_bias=_logit_bias(f, vocab_size),
        seed=f.opt_integer("seed", *_SEED_RANGE),
        stop=_stop(f),
        n=f.integer("n", 1, 1, MAX_N),
        top_k=f.integer("top_k", 0, -1),
        min_p=f.number("min_p", 0.0, 0, 1),
        repetition_penalty=f.number("repetition_penalty", 1.0, 0, None, lo_open=True),
        ignore_eos=f.boolean("ignore_eos", False),
        stop_token_ids=() if stop_ids is None or stop_ids == [] else
        tuple(_token_ids("stop_token_ids", stop_ids, vocab_size, "stop_token_ids")),
    )


def _validated(params: SamplingParams, vocab_size: int) -> SamplingParams:
    try:
        params.validate(vocab_size)
    except SamplingError as e:
        raise _invalid(e.param, str(e)) from None
    return params


def _reject(f: _Object, key: str, allowed: Callable[[Any], bool], why: str, code: str = "unsupported_parameter",
            param: str | None = None) -> None:
    """400 when ``key`` is present, non-null and not ``allowed``."""
    v = f.get(key)
    if v is not None and not allowed(v):
        raise _invalid(param or key, f"`{param or key}` {why}; got {_show(v)}", code)


def _not_exposed(f: _Object) -> None:
    _reject(f, "prompt_logprobs", lambda v: False, "is not supported; use `echo: true` with `logprobs` on "
            "/v1/completions to score a prompt")


# ---------------------------------------------------------------------------------------------- chat

def parse_chat_request(body: object, *, vocab_size: int, max_model_len: int) -> ChatRequest:
    """A POST /v1/chat/completions body (parsed JSON) as a ChatRequest; APIError(400) naming the field if wrong."""
    assert vocab_size > 0 and max_model_len > 1, (vocab_size, max_model_len)
    f = _Object(body, "")
    model = f.string("model", required=True)
    assert model is not None
    messages = _messages(f.require("messages"))
    _chat_unsupported(f)
    tools, tool_choice, parallel = _tools(f)
    constraint = _constraint(f)
    if constraint is not None and tools and tool_choice != "none":
        raise _invalid(constraint.param, f"`{constraint.param}` and `tools` cannot constrain the same answer; "
                       "send one of them (or tool_choice \"none\")")
    logprobs = f.boolean("logprobs", False)
    top_logprobs = f.opt_integer("top_logprobs", 0, MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise _invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`; set it or remove top_logprobs")
    max_tokens = f.opt_integer("max_tokens", 1, max_model_len - 1)
    max_completion_tokens = f.opt_integer("max_completion_tokens", 1, max_model_len - 1)
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        raise _invalid("max_tokens", f"`max_tokens` ({max_tokens}) and `max_completion_tokens` "
                       f"({max_completion_tokens}) disagree; send only max_completion_tokens")
    limit = max_completion_tokens if max_completion_tokens is not None else max_tokens
    stream, include_usage = _stream(f)
    f.string("user")  # accepted, ignored
    f.string("safety_identifier")
    f.string("prompt_cache_key")  # ferrum caches prefixes automatically
    kwargs = f.obj("chat_template_kwargs") or {}
    _unicode("chat_template_kwargs", json.dumps(kwargs, ensure_ascii=False))
    for key in kwargs:
        if key in RESERVED_TEMPLATE_KWARGS:
            raise _invalid(f"chat_template_kwargs.{key}", f"`chat_template_kwargs.{key}` is set by ferrum itself; "
                           f"remove it (reserved: {', '.join(sorted(RESERVED_TEMPLATE_KWARGS))})")
    params = SamplingParams(max_tokens=max_model_len - 1 if limit is None else limit,
                            logprobs=(top_logprobs or 0) if logprobs else None, **_sampling(f, vocab_size))
    return ChatRequest(model, messages, _validated(params, vocab_size), stream, include_usage, logprobs,
                       top_logprobs or 0, dict(kwargs), f.boolean("add_generation_prompt", True), limit, max_model_len,
                       constraint, tools, tool_choice, parallel)


_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _tools(f: _Object) -> tuple[list[dict] | None, str | dict, bool]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked (deprecated ``functions`` refused)."""
    legacy = "is deprecated and not supported; send `tools` and `tool_choice` instead"
    _reject(f, "functions", lambda v: v == [], legacy)
    _reject(f, "function_call", lambda v: v == "none", legacy)
    parallel = f.boolean("parallel_tool_calls", True)
    raw = f.get("tools")
    tools: list[dict] | None = None
    if raw is not None:
        if not isinstance(raw, list):
            raise _wrong_type("tools", "an array of tools", raw)
        tools = [_tool(t, f"tools[{i}]") for i, t in enumerate(raw)]
        names = [t["function"]["name"] for t in tools]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise _invalid("tools", f"`tools` declares the function {dup!r} twice; names must be unique")
    choice: str | dict = "auto" if tools else "none"
    rc = f.get("tool_choice")
    if rc is not None:
        if isinstance(rc, str):
            if rc not in ("none", "auto", "required"):
                raise _invalid("tool_choice", f"`tool_choice` {rc!r} is not one of none, auto, required, or "
                               "{\"type\": \"function\", \"function\": {\"name\": ...}}")
            choice = rc
        else:
            c = _Object(rc, "tool_choice", "a string or {\"type\": \"function\", \"function\": {\"name\": ...}}")
            if c.string("type", required=True) != "function":
                raise _invalid("tool_choice.type", "`tool_choice.type` must be \"function\"", "unsupported_value")
            name = _Object(c.require("function"), "tool_choice.function").string("name", required=True)
            if not tools or name not in {t["function"]["name"] for t in tools}:
                raise _invalid("tool_choice.function.name", f"`tool_choice` names the function {name!r}, which "
                               "`tools` does not declare")
            choice = {"type": "function", "function": {"name": name}}
        if choice in ("auto", "required") and not tools:
            raise _invalid("tool_choice", f"`tool_choice` {choice!r} needs `tools`; declare at least one function")
    return tools or None, choice, parallel


def _tool(t: object, path: str) -> dict:
    f = _Object(t, path, "a tool ({\"type\": \"function\", \"function\": {...}})")
    kind = f.string("type", required=True)
    if kind != "function":
        raise _invalid(f.param("type"), f"`{f.param('type')}` {kind!r} is not supported; only \"function\" tools are",
                       "unsupported_value")
    fn = _Object(f.require("function"), f.param("function"))
    name = fn.string("name", required=True)
    assert name is not None
    if not _TOOL_NAME.match(name):
        raise _invalid(fn.param("name"), f"`{fn.param('name')}` {name!r} must be 1-64 letters, digits, _ or -")
    out: dict[str, Any] = {"name": name}
    desc = fn.string("description")
    if desc is not None:
        out["description"] = desc
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    _schema(params, fn.param("parameters"))
    out["parameters"] = params
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _wrong_type(fn.param("strict"), "a boolean", strict)
    return {"type": "function", "function": out}


def _schema(schema: object, param: str) -> None:
    try:
        check_schema(schema, param)
    except ConstraintError as e:
        raise _invalid(e.param, str(e)) from None


def _constraint(f: _Object) -> Constraint | None:
    """At most one of response_format (json_object / json_schema), ``grammar`` (EBNF/GBNF) and ``regex``."""
    found: list[Constraint] = []
    fmt = f.obj("response_format")
    if fmt is not None:
        r = _Object(fmt, "response_format")
        kind = r.string("type", required=True)
        if kind == "json_object":
            found.append(Constraint("json_object", "", "response_format"))
        elif kind == "json_schema":
            js = _Object(r.require("json_schema"), "response_format.json_schema")
            js.string("name", required=True)
            js.string("description")
            if js.get("strict") is not None and not isinstance(js.get("strict"), bool):
                raise _wrong_type("response_format.json_schema.strict", "a boolean", js.get("strict"))
            schema = js.require("schema")
            _schema(schema, "response_format.json_schema.schema")
            found.append(Constraint("json_schema", json.dumps(schema, sort_keys=True),
                                    "response_format.json_schema.schema"))
        elif kind != "text":
            raise _invalid("response_format.type", f"`response_format.type` {kind!r} is not supported; use text, "
                           "json_object or json_schema", "unsupported_value")
    for key, kind in (("grammar", "grammar"), ("regex", "regex"), ("guided_grammar", "grammar"),
                      ("guided_regex", "regex")):  # guided_*: vLLM's names
        text = f.string(key)
        if text is not None:
            if not text.strip():
                raise _invalid(key, f"`{key}` is empty")
            found.append(Constraint(kind, text, key))
    guided = f.get("guided_json")
    if guided is not None:
        if isinstance(guided, str):
            try:
                guided = json.loads(guided)
            except ValueError:
                raise _invalid("guided_json", "`guided_json` is a string but not JSON; send a JSON schema") from None
        _schema(guided, "guided_json")
        found.append(Constraint("json_schema", json.dumps(guided, sort_keys=True), "guided_json"))
    choices = f.get("guided_choice")
    if choices is not None:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise _wrong_type("guided_choice", "a non-empty array of non-empty strings", choices)
        found.append(Constraint("regex", "|".join(_regex_literal(c) for c in choices), "guided_choice"))
    if len(found) > 1:
        raise _invalid(found[1].param, f"`{found[0].param}` and `{found[1].param}` both constrain the output; send one")
    return found[0] if found else None


def _regex_literal(s: str) -> str:
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\/-" else c for c in s)


def _chat_unsupported(f: _Object) -> None:
    for key in ("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity", "moderation"):
        _reject(f, key, lambda v: False, "is not supported by ferrum; remove it")
    _reject(f, "modalities", lambda v: v == ["text"], "is not supported beyond [\"text\"]", "unsupported_value")
    _reject(f, "service_tier", lambda v: isinstance(v, str), "must be a string", "invalid_type")
    _reject(f, "service_tier", lambda v: v in ("auto", "default"),
            "is not supported: ferrum has one tier; send \"auto\" or \"default\" or leave it out", "unsupported_value")
    _reject(f, "store", lambda v: isinstance(v, bool), "must be a boolean", "invalid_type")
    _reject(f, "store", lambda v: v is False, "is not supported: ferrum stores nothing; send false or leave it out",
            "unsupported_value")
    f.obj("metadata")  # accepted, ignored
    _not_exposed(f)


def _messages(v: object) -> list[dict]:
    if not isinstance(v, list):
        raise _wrong_type("messages", "an array of messages", v)
    if not v:
        raise _invalid("messages", "`messages` is empty; send at least one message", "empty_array")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(v)]


def _message(m: object, path: str) -> dict:
    f = _Object(m, path, "a message object ({\"role\": ..., \"content\": ...})")
    role = f.string("role", required=True)
    if role not in CHAT_ROLES:
        raise _invalid(f"{path}.role", f"`{path}.role` {role!r} is not a role ferrum supports; use one of "
                       f"{', '.join(CHAT_ROLES)}")
    out: dict[str, Any] = {"role": role}
    tool_calls = _tool_calls(f.get("tool_calls"), f"{path}.tool_calls") if role == "assistant" else None
    content = f.get("content")
    if content is None and not tool_calls:
        raise _invalid(f"{path}.content", f"`{path}.content` is required"
                       + (" unless the message has tool_calls" if role == "assistant" else ""),
                       "missing_required_parameter")
    out["content"] = None if content is None else _content(content, f"{path}.content")
    name = f.string("name")
    if name is not None:
        out["name"] = name
    if tool_calls:
        out["tool_calls"] = tool_calls
    if role == "tool":
        out["tool_call_id"] = f.string("tool_call_id", required=True)
    if role == "assistant":
        reasoning = f.string("reasoning_content") or f.string("reasoning")
        if reasoning is not None:
            out["reasoning_content"] = reasoning
    return out


def _content(v: object, path: str) -> str:
    """A message's content: a string, or text parts joined with newlines (as vLLM joins them)."""
    if isinstance(v, str):
        return _unicode(path, v)
    if not isinstance(v, list):
        raise _wrong_type(path, "a string or an array of text parts", v)
    if not v:
        raise _invalid(path, f"`{path}` is an empty array; send a string or at least one text part", "empty_array")
    texts = []
    for j, part in enumerate(v):
        p = _Object(part, f"{path}[{j}]", "a content part ({\"type\": \"text\", \"text\": ...})")
        kind = p.string("type", required=True)
        if kind != "text":
            raise _invalid(f"{path}[{j}].type", f"`{path}[{j}].type` {kind!r} is not supported: ferrum serves "
                           "text-only models; send {\"type\": \"text\", \"text\": ...} parts", "unsupported_value")
        texts.append(p.string("text", required=True))
    return "\n".join(t for t in texts if t is not None)


def _tool_calls(v: object, path: str) -> list[dict]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _wrong_type(path, "an array of tool calls", v)
    out = []
    for i, call in enumerate(v):
        c = _Object(call, f"{path}[{i}]")
        kind = c.string("type", required=True)
        if kind != "function":
            raise _invalid(c.param("type"), f"`{c.param('type')}` must be \"function\"; got {_show(kind)}",
                           "unsupported_value")
        fn = _Object(c.require("function"), c.param("function"))
        args = fn.string("arguments", required=True)
        assert args is not None
        try:  # chat templates `tojson` the arguments: give them the object, as vLLM does
            parsed: Any = json.loads(args)
        except ValueError:
            parsed = None
        out.append({"id": c.string("id", required=True), "type": "function",
                    "function": {"name": fn.string("name", required=True),
                                 "arguments": parsed if isinstance(parsed, dict) else args}})
    return out


# ---------------------------------------------------------------------------------------------- completions

def parse_completion_request(body: object, *, vocab_size: int, max_model_len: int) -> CompletionRequest:
    """A POST /v1/completions body (parsed JSON) as a CompletionRequest; APIError(400) naming the field if wrong."""
    assert vocab_size > 0 and max_model_len > 1, (vocab_size, max_model_len)
    f = _Object(body, "")
    model = f.string("model", required=True)
    assert model is not None
    prompts = _prompts(f.require("prompt"), vocab_size)
    echo = f.boolean("echo", False)
    logprobs = f.opt_integer("logprobs", 0, MAX_COMPLETION_LOGPROBS)
    max_tokens = f.opt_integer("max_tokens", 0, max_model_len - 1)
    _reject(f, "suffix", lambda v: isinstance(v, str), "must be a string", "invalid_type")
    _reject(f, "suffix", lambda v: v == "", "is not supported: ferrum has no fill-in-the-middle; remove it")
    sampling = _sampling(f, vocab_size)
    best_of = f.opt_integer("best_of", 1, MAX_N)
    if best_of is not None and best_of != sampling["n"]:
        raise _invalid("best_of", f"`best_of` ({best_of}) must equal `n` ({sampling['n']}): ferrum returns every "
                       "sample and ranks none; leave best_of out", "unsupported_value")
    stream, include_usage = _stream(f)
    f.string("user")
    _not_exposed(f)
    constraint = _constraint(f)
    most = min(COMPLETION_DEFAULT_MAX_TOKENS, max_model_len - 1)
    params = SamplingParams(max_tokens=most if max_tokens is None else max_tokens, logprobs=logprobs,
                            prompt_logprobs=logprobs if echo else None, **sampling)
    return CompletionRequest(model, prompts, _validated(params, vocab_size), stream, include_usage, echo, logprobs,
                             max_tokens, max_model_len, constraint)


def _prompts(v: object, vocab_size: int) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids or a list of token-id lists -> one entry per prompt."""
    expected = "a string, an array of strings, an array of token ids or an array of token-id arrays"
    if isinstance(v, str):
        return [_unicode("prompt", v)]
    if not isinstance(v, list):
        raise _wrong_type("prompt", expected, v)
    if not v:
        raise _invalid("prompt", "`prompt` is an empty array; send at least one prompt", "empty_array")
    if all(isinstance(p, str) for p in v):
        return [_unicode(f"prompt[{i}]", p) for i, p in enumerate(v)]
    if all(isinstance(p, list) for p in v):
        return [_token_ids("prompt", p, vocab_size, f"prompt[{i}]") for i, p in enumerate(v)]
    if all(_is_int(p) or isinstance(p, (float, bool)) for p in v):  # one token list (bad entries named below)
        return [_token_ids("prompt", v, vocab_size, "prompt")]
    raise _invalid("prompt", f"`prompt` must be {expected}; got an array mixing "
                   f"{', '.join(sorted({_kind(p) for p in v}))}", "invalid_type")


# ---------------------------------------------------------------------------------------------- responses

class TokenLogprob(Protocol):
    """What the engine reports per token (sampler.SampleResult and sampler.PromptLogprob both fit)."""

    @property
    def token_id(self) -> int: ...

    @property
    def logprob(self) -> float: ...

    @property
    def top_logprobs(self) -> list[tuple[int, float]]: ...


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _reason(finish_reason: str | None) -> str | None:
    assert finish_reason is None or finish_reason in FINISH_REASONS, \
        f"{finish_reason!r} is not an OpenAI finish_reason; map the engine's ('abort' -> 'stop') first"
    return finish_reason


def chat_choice(index: int, content: str | None, finish_reason: str, logprobs: dict | None = None, *,
                reasoning: str | None = None, tool_calls: list[dict] | None = None) -> dict[str, Any]:
    """``tool_calls``: [{"id", "type": "function", "function": {"name", "arguments"}}]; content is None when
    the answer is only calls; ``reasoning_content`` appears when the model reasoned."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": _reason(finish_reason)}


def tool_call_deltas(index: int, call: dict) -> list[dict[str, Any]]:
    """A completed call as OpenAI streams it: index, id, type and name first, then the arguments."""
    return [{"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                             "function": {"name": call["function"]["name"], "arguments": ""}}]},
            {"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]}]


def chat_completion(id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict[str, Any]:
    """A non-streamed chat response; ``choices`` from ``chat_choice``."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage, "system_fingerprint": None}


def chat_chunk(id: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict[str, Any]:
    """One SSE event of a streamed chat response. ``delta``: {"role": "assistant", "content": ""} first, then
    {"content": text}; {} with the finish_reason."""
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": _reason(finish_reason)}]}


def chat_usage_chunk(id: str, created: int, model: str, usage: dict) -> dict[str, Any]:
    """The last event of a stream with ``stream_options.include_usage``: no choices, the request's usage."""
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": usage}


def completion_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict[str, Any]:
    """With echo, ``text`` is the prompt's text followed by the generated text."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _reason(finish_reason)}


def completion(id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict[str, Any]:
    """A non-streamed /v1/completions response; ``choices`` from ``completion_choice``."""
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage, "system_fingerprint": None}


def completion_chunk(id: str, created: int, model: str, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": _reason(finish_reason)}]}


def completion_usage_chunk(id: str, created: int, model: str, usage: dict) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": usage}


def _lp(x: float) -> float:
    return x if x >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps -inf and NaN


def chat_logprobs(entries: Iterable[TokenLogprob], token_text: Callable[[int], str],
                  token_bytes: Callable[[int], bytes] | None = None) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}.
    ``token_bytes`` gives a token's raw bytes (a byte-level token may be part of a character); default:
    the UTF-8 of ``token_text``."""
    as_bytes = token_bytes or (lambda t: token_text(t).encode("utf-8"))

    def one(tid: int, lp: float) -> dict[str, Any]:
        return {"token": token_text(tid), "logprob": _lp(lp), "bytes": list(as_bytes(tid))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top_logprobs]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str], *,
                        echo_prompt: Sequence[int] | None = None,
                        prompt_logprobs: Sequence[TokenLogprob | None] | None = None,
                        text_offset: int = 0) -> dict[str, Any]:
    """OpenAI's /v1/completions ``logprobs``: {tokens, token_logprobs, top_logprobs, text_offset}.

    With ``echo_prompt`` (the prompt's token ids) the prompt's tokens come first, scored by
    ``prompt_logprobs`` (the engine's, whose first entry is None: the first token has no logprob and gets
    null, as in OpenAI). ``top_logprobs`` dicts hold the k most likely tokens plus the chosen one (so up to
    k + 1 entries, as OpenAI documents). ``text_offset`` is where the first token's text starts in the
    choice's text (continue it across stream chunks); offsets add up ``token_text`` lengths."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    scored: list[tuple[int, TokenLogprob | None]] = []
    for i, tid in enumerate(echo_prompt or ()):
        e = prompt_logprobs[i] if prompt_logprobs is not None and i < len(prompt_logprobs) else None
        assert e is None or e.token_id == tid, (i, tid, e.token_id)
        scored.append((tid, e))
    scored.extend((e.token_id, e) for e in entries)
    for tid, e in scored:
        text = token_text(tid)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if e is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_lp(e.logprob))
        top = {token_text(t): _lp(lp) for t, lp in reversed(e.top_logprobs)}  # a shared text keeps the likelier
        top.setdefault(text, _lp(e.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def model_card(id: str, created: int, max_model_len: int) -> dict[str, Any]:
    """One entry of GET /v1/models."""
    return {"id": id, "object": "model", "created": created, "owned_by": "ferrum", "root": id, "parent": None,
            "max_model_len": max_model_len}


def model_list(cards: list[dict]) -> dict[str, Any]:
    return {"object": "list", "data": cards}


# ---------------------------------------------------------------------------------------------- OpenAPI

def _nullable(schema: dict) -> dict:
    """OpenAPI 3.0 honours ``nullable`` only beside ``type``: for a oneOf, the first branch takes the null."""
    if "oneOf" in schema:
        first, *rest = schema["oneOf"]
        return {**schema, "oneOf": [_nullable(first), *rest]}
    assert "type" in schema, schema
    return {**schema, "nullable": True}


def _int(lo: int | None = None, hi: int | None = None, **extra: Any) -> dict:
    s: dict[str, Any] = {"type": "integer", **extra}
    if lo is not None:
        s["minimum"] = lo
    if hi is not None:
        s["maximum"] = hi
    return s


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, **extra: Any) -> dict:
    s: dict[str, Any] = {"type": "number", **extra}
    if lo is not None:
        s["minimum"] = lo
        if lo_open:
            s["exclusiveMinimum"] = True
    if hi is not None:
        s["maximum"] = hi
    return s


def _only_null(description: str) -> dict:
    """A field ferrum rejects unless null (described so generators leave it out)."""
    return {"type": "object", "nullable": True, "enum": [None], "description": description}


def _sampling_schema(vocab_size: int | None) -> dict[str, Any]:
    token = _int(0, None if vocab_size is None else vocab_size - 1)
    return {
        "temperature": _nullable(_num(0, 2, default=1)),
        "top_p": _nullable(_num(0, 1, lo_open=True, default=1)),
        "presence_penalty": _nullable(_num(-2, 2, default=0)),
        "frequency_penalty": _nullable(_num(-2, 2, default=0)),
        "logit_bias": _nullable({"type": "object", "description": "token id (as a string) -> bias added to its logit",
                                 "additionalProperties": _num(-100, 100),
                                 "x-key-pattern": "^[0-9]+$"}),
        "seed": _nullable(_int(*_SEED_RANGE)),
        "stop": _nullable({"oneOf": [{"type": "string", "minLength": 1}, {
            "type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1}}]}),
        "n": _nullable(_int(1, MAX_N, default=1)),
        "stream": _nullable({"type": "boolean", "default": False}),
        "stream_options": _nullable({"type": "object", "description": "only with stream: true", "properties": {
            "include_usage": {"type": "boolean", "nullable": True}}}),
        "user": _nullable({"type": "string", "description": "accepted and ignored"}),
        "top_k": _nullable(_int(-1, None, default=0, description="extension (vLLM): 0 or -1 = off")),
        "min_p": _nullable(_num(0, 1, default=0, description="extension (vLLM): 0 = off")),
        "repetition_penalty": _nullable(_num(0, None, lo_open=True, default=1, description="extension (vLLM)")),
        "ignore_eos": _nullable({"type": "boolean", "default": False, "description": "extension (vLLM)"}),
        "stop_token_ids": _nullable({"type": "array", "items": token, "description": "extension (vLLM)"}),
        "prompt_logprobs": _only_null("not supported: use echo with logprobs on /v1/completions"),
    }


def _absent(field: str) -> dict:
    """JSON Schema for: ``field`` is left out or null."""
    return {"properties": {field: {"type": "object", "nullable": True, "enum": [None]}}}


def _requires(field: str, other: str, value: Any) -> dict:
    """JSON Schema for: when ``field`` is given (not null), ``other`` must be present and equal ``value``."""
    return {"anyOf": [_absent(field), {"required": [other], "properties": {other: {"enum": [value]}}}]}


_RESPONSE_FORMAT = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "required": ["name", "schema"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"}, "schema": {"type": "object"},
        "strict": {"type": "boolean"}}}}}
_CONSTRAINT_EXTENSIONS = {
    "grammar": _nullable({"type": "string", "description": "extension: EBNF/GBNF grammar the output follows"}),
    "regex": _nullable({"type": "string", "description": "extension: regular expression the output matches"}),
    "guided_json": _nullable({"oneOf": [{"type": "object"}, {"type": "string"}],
                              "description": "extension (vLLM): a JSON schema, as an object or JSON text"}),
    "guided_regex": _nullable({"type": "string", "description": "extension (vLLM)"}),
    "guided_grammar": _nullable({"type": "string", "description": "extension (vLLM)"}),
    "guided_choice": _nullable({"type": "array", "items": {"type": "string"}, "description": "extension (vLLM)"}),
}


def _request_schemas(vocab_size: int | None, max_model_len: int | None, models: list[str] | None) -> dict[str, Any]:
    max_gen = None if max_model_len is None else max_model_len - 1
    model = {"type": "string", **({"enum": models} if models else {})}
    token = _int(0, None if vocab_size is None else vocab_size - 1)
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    content = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": text_part}]}
    tool_call = {"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}

    def message(roles: list[str], **props: Any) -> dict:
        required = ["role", "content"] if "content" not in props else ["role"]
        return {"type": "object", "required": required + [k for k in props if k == "tool_call_id"], "properties": {
            "role": {"type": "string", "enum": roles}, "content": content, "name": {"type": "string"}, **props}}

    assistant = message(["assistant"], content=_nullable(content), tool_calls={"type": "array", "items": tool_call},
                        reasoning_content={"type": "string"})
    assistant["anyOf"] = [{"required": ["content"], "properties": {"content": content}},
                          {"required": ["tool_calls"], "properties": {"tool_calls": {"minItems": 1}}}]
    chat_props = {
        "model": model,
        "messages": {"type": "array", "minItems": 1, "items": {"oneOf": [
            message(["system", "developer", "user"]), assistant,
            message(["tool"], tool_call_id={"type": "string"})]}},
        **_sampling_schema(vocab_size),
        "max_tokens": _nullable(_int(1, max_gen, description="deprecated by OpenAI: prefer max_completion_tokens; "
                                     "default: as many as the context leaves")),
        "max_completion_tokens": _nullable(_int(1, max_gen, description="must equal max_tokens when both are sent")),
        "logprobs": _nullable({"type": "boolean", "default": False}),
        "top_logprobs": _nullable(_int(0, MAX_LOGPROBS, description="needs logprobs: true")),
        "chat_template_kwargs": _nullable({"type": "object", "description": "extension (vLLM): template variables; "
                                           f"not {', '.join(sorted(RESERVED_TEMPLATE_KWARGS))}"}),
        "add_generation_prompt": _nullable({"type": "boolean", "default": True, "description": "extension (vLLM)"}),
        "tools": _nullable({"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": {"type": "string"},
                "parameters": {"type": "object", "description": "a JSON schema"}, "strict": {"type": "boolean"}}}}}}),
        "tool_choice": _nullable({"oneOf": [
            {"type": "string", "enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["type", "function"], "properties": {
                "type": {"type": "string", "enum": ["function"]},
                "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}),
        "functions": _nullable({"type": "array", "maxItems": 0, "description": "deprecated: use tools"}),
        "function_call": _nullable({"type": "string", "enum": ["none"], "description": "deprecated: use tool_choice"}),
        "parallel_tool_calls": _nullable({"type": "boolean", "default": True}),
        "response_format": _nullable(_RESPONSE_FORMAT),
        **_CONSTRAINT_EXTENSIONS,
        "modalities": _nullable({"type": "array", "minItems": 1, "maxItems": 1,
                                 "items": {"type": "string", "enum": ["text"]}}),
        "service_tier": _nullable({"type": "string", "enum": ["auto", "default"]}),
        "store": _nullable({"type": "boolean", "enum": [False]}),
        "metadata": _nullable({"type": "object", "description": "accepted and ignored"}),
        "safety_identifier": _nullable({"type": "string", "description": "accepted and ignored"}),
        "prompt_cache_key": _nullable({"type": "string", "description": "accepted and ignored"}),
        **{k: _only_null("not supported") for k in ("audio", "prediction", "web_search_options", "reasoning_effort",
                                                      "verbosity", "moderation")},
    }
    completion_props = {
        "model": model,
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                             {"type": "array", "minItems": 1, "items": token},
                             {"type": "array", "minItems": 1,
                              "items": {"type": "array", "minItems": 1, "items": token}}]},
        **_sampling_schema(vocab_size),
        "max_tokens": _nullable(_int(0, max_gen, default=COMPLETION_DEFAULT_MAX_TOKENS if max_gen is None else
                                     min(COMPLETION_DEFAULT_MAX_TOKENS, max_gen),
                                     description="default: 16, or what the context leaves if less")),
        "echo": _nullable({"type": "boolean", "default": False}),
        "logprobs": _nullable(_int(0, MAX_COMPLETION_LOGPROBS)),
        "best_of": _nullable(_int(1, MAX_N, description="must equal n")),
        "suffix": _nullable({"type": "string", "maxLength": 0, "description": "not supported: only \"\" or null"}),
        "response_format": _nullable({**_RESPONSE_FORMAT, "description": "extension: constrains the completion"}),
        **_CONSTRAINT_EXTENSIONS,
    }
    unknown_ok = "Unknown fields are ignored. null means not given."
    one = {"type": "integer", "nullable": True, "enum": [1, None]}
    return {
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"], "properties": chat_props, "description": unknown_ok,
            "allOf": [_requires("top_logprobs", "logprobs", True), _requires("stream_options", "stream", True),
                      {"anyOf": [_absent("max_tokens"), _absent("max_completion_tokens")]}]},
        "CompletionRequest": {
            "type": "object", "required": ["model", "prompt"], "properties": completion_props,
            "description": unknown_ok,
            "allOf": [_requires("stream_options", "stream", True),  # best_of == n, said conservatively:
                      {"anyOf": [_absent("best_of"), {"properties": {"best_of": one, "n": one}}]}]},
        "TokenizeRequest": {"type": "object", "description": "send prompt (text) or messages (rendered with the "
                            "chat template)", "oneOf": [
                                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                                {"required": ["messages"], "properties": {
                                    "messages": chat_props["messages"],
                                    "add_generation_prompt": chat_props["add_generation_prompt"],
                                    "chat_template_kwargs": chat_props["chat_template_kwargs"]}}],
                            "properties": {"model": model}},
        "DetokenizeRequest": {"type": "object", "required": ["tokens"],
                              "properties": {"model": model, "tokens": {"type": "array", "items": token}}},
    }


def _response_schemas() -> dict[str, Any]:
    string, integer, number = {"type": "string"}, {"type": "integer"}, {"type": "number"}
    reason = {"type": "string", "enum": list(FINISH_REASONS), "nullable": True}
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {"prompt_tokens": integer, "completion_tokens": integer, "total_tokens": integer}}
    top: dict[str, Any] = {"type": "object", "required": ["token", "logprob", "bytes"],
           "properties": {"token": string, "logprob": number, "bytes": {"type": "array", "items": integer}}}
    chat_lp = _nullable({"type": "object", "properties": {"content": {"type": "array", "items": {
        **top, "required": ["token", "logprob", "bytes", "top_logprobs"],
        "properties": {**top["properties"], "top_logprobs": {"type": "array", "items": top}}}}}})
    completion_lp = _nullable({"type": "object", "properties": {
        "tokens": {"type": "array", "items": string},
        "token_logprobs": {"type": "array", "items": _nullable(number)},
        "top_logprobs": {"type": "array", "items": _nullable({"type": "object", "additionalProperties": number})},
        "text_offset": {"type": "array", "items": integer}}})

    def envelope(obj: str, choice: dict) -> dict:
        return {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
            "id": string, "object": {"type": "string", "enum": [obj]}, "created": integer, "model": string,
            "choices": {"type": "array", "items": choice}, "usage": _nullable(usage)}}

    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": string, "type": string, "param": _nullable(string), "code": _nullable(string)}}}},
        "Usage": usage,
        "ChatCompletion": envelope("chat.completion", {"type": "object", "properties": {
            "index": integer, "finish_reason": reason, "logprobs": chat_lp, "message": {
                "type": "object", "properties": {"role": {"type": "string", "enum": ["assistant"]},
                                                 "content": _nullable(string)}}}}),
        "ChatCompletionChunk": envelope("chat.completion.chunk", {"type": "object", "properties": {
            "index": integer, "finish_reason": reason, "logprobs": chat_lp, "delta": {
                "type": "object", "properties": {"role": string, "content": string}}}}),
        "Completion": envelope("text_completion", {"type": "object", "properties": {
            "index": integer, "text": string, "finish_reason": reason, "logprobs": completion_lp}}),
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": {
                "type": "object", "required": ["id", "object", "created", "owned_by", "max_model_len"],
                "properties": {"id": string, "object": {"type": "string", "enum": ["model"]}, "created": integer,
                               "owned_by": string, "max_model_len": integer}}}}},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string", "enum": ["ok", "loading", "error"]}, "error": _nullable(string),
            "model": string, "running": integer, "waiting": integer, "kv_cache_usage": number,
            "num_blocks": integer, "max_model_len": integer}},
        "TokenizeResponse": {"type": "object", "required": ["tokens", "count", "max_model_len"], "properties": {
            "tokens": {"type": "array", "items": integer}, "count": integer, "max_model_len": integer}},
        "DetokenizeResponse": {"type": "object", "required": ["prompt"], "properties": {"prompt": string}},
    }


def openapi_document(*, vocab_size: int | None = None, max_model_len: int | None = None,
                     models: list[str] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.0 description of the server. Given the served model's vocabulary size, context length and
    names, token ids, max_tokens and model are bounded too, so a generator (schemathesis) makes valid bodies."""
    def ref(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    def json_body(name: str) -> dict:
        return {"required": True, "content": {"application/json": {"schema": ref(name)}}}

    def ok(name: str, description: str, stream: bool = False) -> dict:
        content: dict[str, Any] = {"application/json": {"schema": ref(name)}}
        if stream:
            content["text/event-stream"] = {"schema": {"type": "string", "description": f"with stream: true, "
                                                       f"`data: <{name}Chunk JSON>` events, then `data: [DONE]`"}}
        return {"description": description, "content": content}

    def errors(*statuses: int) -> dict:
        return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}

    v1 = (400, 401, 404, 413, 429, 503)
    secured: dict[str, Any] = {"security": [{"bearerAuth": []}]}
    paths = {
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion", "summary": "Chat completion (streamed with stream: true)", **secured,
            "requestBody": json_body("ChatCompletionRequest"),
            "responses": {"200": ok("ChatCompletion", "the completion", stream=True), **errors(*v1)}}},
        "/v1/completions": {"post": {
            "operationId": "createCompletion", "summary": "Text completion (streamed with stream: true)", **secured,
            "requestBody": json_body("CompletionRequest"),
            "responses": {"200": ok("Completion", "the completion", stream=True), **errors(*v1)}}},
        "/v1/models": {"get": {
            "operationId": "listModels", "summary": "The served model", **secured,
            "responses": {"200": ok("ModelList", "the served model, with its context length"),
                          **errors(401, 503)}}},
        "/health": {"get": {
            "operationId": "health", "summary": "503 while the model loads, then 200 with the engine's state",
            "responses": {"200": ok("Health", "ready"),
                          "503": {"description": "loading (or failed to load)", "headers": _retry_after(),
                                  "content": {"application/json": {"schema": ref("Health")}}}}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics (`ferrum:` names mirroring vLLM's)",
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/tokenize": {"post": {
            "operationId": "tokenize", "summary": "Token ids of a prompt or of rendered chat messages",
            "requestBody": json_body("TokenizeRequest"),
            "responses": {"200": ok("TokenizeResponse", "the token ids"), **errors(400, 413, 503)}}},
        "/detokenize": {"post": {
            "operationId": "detokenize", "summary": "Text of token ids",
            "requestBody": json_body("DetokenizeRequest"),
            "responses": {"200": ok("DetokenizeResponse", "the text"), **errors(400, 413, 503)}}},
    }
    described = {400: "invalid request: `error.param` names the field", 401: "missing or wrong API key",
                 404: "unknown model", 413: "request body too large", 429: "too many queued requests",
                 503: "the model is still loading"}
    responses = {f"E{s}": {"description": d, "content": {"application/json": {"schema": ref("Error")}},
                           **({"headers": _retry_after()} if s in (429, 503) else {})} for s, d in described.items()}
    return {
        "openapi": "3.0.3",
        "info": {"title": "ferrum", "version": "1", "description": "OpenAI-compatible API of `ferrum serve`; "
                 "see docs/openai-api.md for every field's status."},
        "paths": paths,
        "components": {
            "schemas": {**_request_schemas(vocab_size, max_model_len, models), **_response_schemas()},
            "responses": responses,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "only when the server runs with an API key"}},
        },
    }


def _retry_after() -> dict:
    return {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}

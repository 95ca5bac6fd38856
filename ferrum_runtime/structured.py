"""Grammar-constrained decoding: JSON objects, JSON schemas, EBNF/GBNF grammars, regexes and tool calls,
guaranteed by masking the logits at every step with xgrammar (the engine vLLM, SGLang and MLC-LLM share).

A request's ``Constraint`` is compiled once per artifact (cached by its text) into an xgrammar grammar
over the artifact's vocabulary; each sequence gets its own matcher, which fills its row of a token
bitmask before sampling and accepts the sampled token after. Three fixes over xgrammar's defaults (DESIGN
§7): JSON never allows free whitespace (a weak model would emit it until max_tokens), length-bounded
strings are escape-only like every other JSON string (xgrammar's rule admits raw control characters,
which ``json.loads`` rejects), and no negated character class admits the UTF-16 surrogates U+D800-DFFF
(xgrammar matches their 3-byte encodings, which are not UTF-8: the text decodes to 3 replacement
characters each, so a 3-character string could come out 5 characters long).

Tool calls use xgrammar's structural tags in the model family's own syntax (``tool_format``): Qwen2.5/3
``<tool_call>{"name", "arguments"}</tool_call>`` blocks, Llama 3.x ``{"name", "parameters"}`` objects;
the generic fallback (templates without tool support) uses the ``<tool_call>`` blocks and says so in a
system message.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FerrumError

CONSTRAINT_KINDS = ("json_object", "json_schema", "grammar", "regex", "tools")
TOOL_FORMATS = ("qwen", "llama", "generic")
_XGR_MODEL = {"qwen": "qwen_3", "llama": "llama", "generic": "qwen_3"}
_MAX_WHITESPACE = 2  # inside tool-call JSON (structural tags allow bounded whitespace only)
# JSON-schema keywords xgrammar accepts but does not enforce: a schema using them is refused, not half-honoured
UNSUPPORTED_SCHEMA_KEYWORDS = frozenset({
    "not", "uniqueItems", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
    "patternProperties", "$dynamicRef", "$dynamicAnchor", "contentEncoding", "contentMediaType", "contentSchema"})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # keyword -> {name: schema}
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties")


class ConstraintError(FerrumError):
    """A constraint that cannot be compiled; ``param`` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of CONSTRAINT_KINDS
    spec: str  # JSON schema text / EBNF / regex / tools spec (JSON); also the cache key
    param: str  # the request field it came from, for errors

    @classmethod
    def tools(cls, fmt: str, tools: list[dict], tool_choice: str | dict, parallel: bool) -> "Constraint":
        assert fmt in TOOL_FORMATS, fmt
        spec = {"format": fmt, "tools": tools, "tool_choice": tool_choice, "parallel": parallel}
        return cls("tools", json.dumps(spec, sort_keys=True), "tools")


def tool_format(chat_template: str | None) -> str:
    """The tool-call syntax a chat template teaches its model."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return "qwen"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama"
    return "generic"


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and re.search(r"\btools\b", chat_template or "") is not None


def tools_system_prompt(tools: list[dict]) -> str:
    """For templates that ignore ``tools``: the tools and the ``<tool_call>`` syntax, as a system message."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call these functions:\n" + listing + "\nTo call one, answer with\n<tool_call>\n"
            '{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>')


def tool_messages_as_text(messages: list[dict]) -> list[dict]:
    """For templates that know no tools: assistant tool calls become ``<tool_call>`` blocks in the content and
    tool results user turns in ``<tool_response>`` tags, so any template can render the conversation."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = []
            for call in m["tool_calls"]:
                args = call["function"]["arguments"]
                args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                blocks.append('<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
                              % (call["function"]["name"], args_text))
            text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
            out.append({k: v for k, v in m.items() if k != "tool_calls"} | {"content": text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append(m)
    return out


def check_schema(schema: Any, param: str) -> None:
    """Refuse a JSON schema that is invalid, or uses a keyword the grammar engine would not enforce."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"`{param}` must be a JSON schema object", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise ConstraintError(f"`{param}` is not a valid JSON schema: {e.message}" + (f" (at {where})" if where else ""),
                              param) from None
    _walk_schema(schema, param)


def _walk_schema(node: Any, param: str) -> None:
    if not isinstance(node, dict):
        return
    bad = sorted(UNSUPPORTED_SCHEMA_KEYWORDS & set(node))
    if bad:
        raise ConstraintError(f"`{param}` uses `{bad[0]}`, which structured output cannot enforce; remove it "
                              f"(unsupported: {', '.join(sorted(UNSUPPORTED_SCHEMA_KEYWORDS))})", param)
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for sub in node[key].values():
                _walk_schema(sub, param)
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for sub in node[key]:
                _walk_schema(sub, param)
    for key in _SCHEMA_ONE:
        _walk_schema(node.get(key), param)


class StructuredOutput:
    """xgrammar over one artifact's vocabulary: compiles constraints (cached), makes matchers, masks logits."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int], cache_size: int = 64):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        self._xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(max_threads=2)  # fills a batch's masks on both cores
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # compiled on the server's thread, used on the engine's

    def compile(self, c: Constraint) -> Any:
        key = (c.kind, c.spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compiler.compile_grammar(self._grammar(c))
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, c: Constraint) -> Any:
        return self._xgr.GrammarMatcher(self.compile(c))

    def _grammar(self, c: Constraint) -> Any:
        xgr = self._xgr
        try:
            if c.kind == "json_object":
                g = xgr.Grammar.from_json_schema({"type": "object"}, any_whitespace=False)
            elif c.kind == "json_schema":
                g = xgr.Grammar.from_json_schema(c.spec, any_whitespace=False, strict_mode=True)
            elif c.kind == "grammar":
                g = xgr.Grammar.from_ebnf(c.spec)
            elif c.kind == "regex":
                g = xgr.Grammar.from_regex(c.spec)
            else:
                spec = json.loads(c.spec)
                tag = xgr.get_model_structural_tag(
                    _XGR_MODEL[spec["format"]], tools=spec["tools"], tool_choice=spec["tool_choice"],
                    reasoning="disabled", max_whitespace_cnt=_MAX_WHITESPACE, parallel_tool_calls=spec["parallel"])
                g = xgr.Grammar.from_structural_tag(tag)
            return xgr.Grammar.from_ebnf(_no_surrogates(_escape_only_strings(str(g))))
        except Exception as e:  # noqa: BLE001 - xgrammar reports bad grammars/regexes as RuntimeError/ValueError
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ConstraintError(f"`{c.param}` cannot be compiled into a grammar: {first}", c.param) from None

    def apply(self, logits: np.ndarray, rows: list[int], matchers: list[Any], extra_allowed: list[int | None]) -> None:
        """In place: for each ``rows[i]`` keep only the tokens ``matchers[i]`` allows (plus ``extra_allowed[i]``)."""
        import torch

        xgr = self._xgr
        assert logits.dtype == np.float32 and logits.flags.c_contiguous and logits.shape[1] == self.vocab_size
        mask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)  # all allowed
        self._batch.batch_fill_next_token_bitmask(matchers, mask, indices=rows)
        for r, tok in zip(rows, extra_allowed):
            if tok is not None:  # e.g. <think> as the first token of a reasoning model
                mask[r, tok // 32] |= _bit(tok % 32)
        xgr.apply_token_bitmask_inplace(torch.from_numpy(logits), mask, indices=rows)


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 bitmask word, as a Python int that fits int32."""
    return -(1 << 31) if i == 31 else 1 << i


# xgrammar's rule for maxLength/minLength strings: any character but quote, backslash, CR, LF
_LOOSE_STRING_CHARS = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHARS = '[^\\0-\\x1f\\"\\\\\\r\\n]'


def _escape_only_strings(ebnf: str) -> str:
    return ebnf.replace(_LOOSE_STRING_CHARS, _JSON_STRING_CHARS)


# a double-quoted EBNF literal (left alone), or a negated character class
_EBNF_LITERAL_OR_NEGATED_CLASS = re.compile(r'"(?:\\.|[^"\\])*"|\[\^((?:\\.|[^\]\\])*)\]')


def _no_surrogates(ebnf: str) -> str:
    """Every negated character class of ``ebnf`` also refuses U+D800-DFFF (code points that are not text)."""
    def fix(m: re.Match) -> str:
        return m.group(0) if m.group(1) is None else "[^" + m.group(1) + "\\uD800-\\uDFFF]"

    return _EBNF_LITERAL_OR_NEGATED_CLASS.sub(fix, ebnf)


"""Chat templates (rendered like ``transformers``' ``apply_chat_template``) and reasoning-tag parsing."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FerrumError


class ChatTemplateError(FerrumError):
    """The chat template failed to compile or render (a template's own ``raise_exception`` lands here too)."""


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names clients use for a message's reasoning


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                tools: list[dict] | None = None, special_tokens: dict[str, str] | None = None, **kwargs: Any) -> str:
    """The prompt text for ``messages``. ``special_tokens`` (bos_token, eos_token, ...) and ``kwargs``
    (e.g. enable_thinking) become template variables; kwargs win over special tokens, as in transformers."""
    compiled = _compile(template)
    # as transformers does: None-valued keys are dropped (templates test `'x' in message`), and reasoning
    # given under any of its names is visible under all of them
    msgs = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[f] for f in _REASONING_FIELDS if f in m), None)
        msgs.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    # tools and documents are always defined (None when absent): templates test `tools is not none`
    context = {"documents": None, **(special_tokens or {}), **kwargs}
    try:
        return compiled.render(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt, **context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}; fix the template or "
                                "the messages it rejects") from None


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}; fix the template's syntax") from None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters and sorts keys; templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(f"chat template rejected the conversation: {message}")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


# -- reasoning ("<think>...</think>") -------------------------------------------------------------------------

class ReasoningParser:
    """Splits streamed model text into (reasoning, content).

    The output may open with the start tag (leading whitespace allowed); if it does not, the text is content,
    or reasoning when ``starts_in_reasoning`` (the prompt already opened the tag). Reasoning runs to the first
    end tag; everything after is content, verbatim. Text that may be a split tag is held back.
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False):
        self.start, self.end = start, end
        self._fallback = "reasoning" if starts_in_reasoning else "content"
        self.state = "start"  # "start" (a leading start tag may still come) -> "reasoning" -> "content"
        self.saw_reasoning = starts_in_reasoning
        self._held = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta)."""
        text, self._held = self._held + delta, ""
        reasoning = ""
        if self.state == "start":
            head = text.lstrip()
            if head.startswith(self.start):
                self.state, self.saw_reasoning = "reasoning", True
                text = head[len(self.start):]
            elif self.start.startswith(head):  # whitespace or a partial start tag: wait
                self._held = text
                return "", ""
            else:
                self.state = self._fallback
        if self.state == "reasoning":
            i = text.find(self.end)
            if i < 0:
                keep = partial_suffix(text, self.end)
                self._held = text[len(text) - keep:]
                return text[:len(text) - keep], ""
            reasoning, text = text[:i], text[i + len(self.end):]
            self.state = "content"
        return reasoning, text

    def flush(self) -> tuple[str, str]:
        """Held text at the end of the stream (a partial tag is just text)."""
        held, self._held = self._held, ""
        in_reasoning = self.state == "reasoning" or (self.state == "start" and self._fallback == "reasoning")
        return (held, "") if in_reasoning else ("", held)


def split_reasoning(text: str, start: str = "<think>", end: str = "</think>") -> tuple[str | None, str]:
    """(reasoning or None when there is none, content) of a whole output. An end tag without a start tag
    means the prompt opened the reasoning. Agrees with ``ReasoningParser`` given the same opening."""
    parser = ReasoningParser(start, end, starts_in_reasoning=end in text)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.flush()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0

"""Tool calls out of model text, incrementally: content deltas pass through, completed calls come out whole.

Formats (``structured.tool_format``): ``qwen`` and ``generic`` wrap each call in ``<tool_call>…</tool_call>``
holding ``{"name": …, "arguments": {…}}``; ``llama`` writes ``{"name": …, "parameters": {…}}`` objects
(optionally after ``<|python_tag|>``). Text around calls stays content, except whitespace that only
separates calls (or follows the last one). Text that might be the start of a call, and trailing
whitespace, is held back until it is decided, as stop strings are; so any split of the stream into
pieces gives the same content and calls as the whole.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .chat_template import partial_suffix


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_TAG_OPEN, _TAG_CLOSE = "<tool_call>", "</tool_call>"
_LLAMA_OPEN = '{"name"'
_PYTHON_TAG = "<|python_tag|>"


class ToolCallParser:
    def __init__(self, fmt: str, tool_names: set[str]):
        self.fmt = fmt
        self.names = tool_names
        self._buf = ""
        self._in_call = False
        self._ws = ""  # trailing whitespace of the content so far: dropped if a call follows
        self._after_call = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content delta, calls completed by this text)."""
        self._buf += text
        return self._llama() if self.fmt == "llama" else self._tagged(final=False)

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end: what is still held is content (an unfinished call is returned as its text)."""
        if self.fmt == "llama":
            content, calls = self._llama(final=True)
        else:
            content, calls = self._tagged(final=True)
        rest, self._buf, self._in_call = self._buf, "", False
        tail = self._content([rest]) + ("" if self.calls else self._ws)
        self._ws = ""
        return content + tail, calls

    def _content(self, pieces: list[str]) -> str:
        """Content to emit now: held whitespace plus ``pieces``, minus (held again) trailing whitespace."""
        text = self._ws + "".join(pieces)
        body = text.rstrip()
        self._ws = text[len(body):]
        return body

    # -------------------------------------------------------------- <tool_call> blocks
    def _tagged(self, final: bool) -> tuple[str, list[ToolCall]]:
        content, calls = [], []
        while True:
            if not self._in_call:
                i = self._buf.find(_TAG_OPEN)
                if i < 0:
                    keep = 0 if final else partial_suffix(self._buf, _TAG_OPEN)
                    content.append(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:i])
                self._buf, self._in_call = self._buf[i:], True
            j = self._buf.find(_TAG_CLOSE)
            if j < 0:
                break
            block, self._buf, self._in_call = self._buf[:j + len(_TAG_CLOSE)], self._buf[j + len(_TAG_CLOSE):], False
            call = self._call(block[len(_TAG_OPEN):-len(_TAG_CLOSE)], "arguments")
            if call is None:
                content.append(block)  # not a well-formed call: the model's text, verbatim
            else:
                self._emit_before_call(content)
                calls.append(call)
        return self._content(content), calls

    def _emit_before_call(self, content: list[str]) -> None:
        """A call follows ``content``: its trailing whitespace separates, it is not content."""
        text = self._ws + "".join(content)
        self._ws = ""
        content[:] = [text.rstrip()]

    # -------------------------------------------------------------- Llama 3.x JSON objects
    def _llama(self, final: bool = False) -> tuple[str, list[ToolCall]]:
        content, calls = [], []
        decoder = json.JSONDecoder()
        while self._buf:
            if self._after_call:  # Llama separates parallel calls with ";"
                stripped = self._buf.lstrip()
                if not stripped and not final:
                    break
                self._after_call = False
                if stripped.startswith(";"):
                    self._buf = stripped[1:]
                    continue
            buf = self._buf
            i = buf.find(_LLAMA_OPEN)
            tag = buf.find(_PYTHON_TAG)
            if tag >= 0 and (i < 0 or tag < i):
                content.append(buf[:tag])
                self._buf = buf[tag + len(_PYTHON_TAG):]
                continue
            if i < 0:
                keep = 0 if final else max(partial_suffix(buf, _LLAMA_OPEN), partial_suffix(buf, _PYTHON_TAG))
                content.append(buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                break
            content.append(buf[:i])
            try:
                obj, end = decoder.raw_decode(buf, i)
            except ValueError:
                if final:
                    content.append(buf[i:])
                    self._buf = ""
                else:
                    self._buf = buf[i:]  # the object is still arriving
                break
            call = self._call(buf[i:end], "parameters") if isinstance(obj, dict) else None
            if call is None:
                content.append(buf[i:end])
            else:
                self._emit_before_call(content)
                calls.append(call)
            self._buf = buf[end:]
            self._after_call = call is not None
        return self._content(content), calls

    def _call(self, text: str, args_key: str) -> ToolCall | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
        if obj["name"] not in self.names or not isinstance(args, dict):
            return None
        call = ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))
        self.calls.append(call)
        return call


def parse_tool_calls(text: str, fmt: str, tool_names: set[str]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole output."""
    parser = ToolCallParser(fmt, tool_names)
    c1, calls1 = parser.feed(text)
    c2, calls2 = parser.flush()
    return c1 + c2, calls1 + calls2

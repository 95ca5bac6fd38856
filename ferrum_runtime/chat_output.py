"""One chat choice's streamed text, split the way OpenAI clients expect: reasoning (``<think>…</think>``)
to ``reasoning_content``, tool calls to ``tool_calls``, the rest to ``content``."""

from __future__ import annotations

from typing import Any

from .chat_template import ReasoningParser
from .openai_protocol import tool_call_deltas
from .tool_calls import ToolCall, ToolCallParser


class ChatOutput:
    def __init__(self, reasoning: bool, opened: bool = False, tool_format: str | None = None,
                 tool_names: frozenset[str] = frozenset()):
        self._reasoning = ReasoningParser(starts_in_reasoning=opened) if reasoning else None
        self._tools = ToolCallParser(tool_format, set(tool_names)) if tool_format else None
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Stream deltas (``{"reasoning_content"}``, ``{"content"}``, tool-call deltas) for this text."""
        r, c = self._reasoning.feed(text) if self._reasoning else ("", text)
        return self._emit(r, *self._split(c))

    def flush(self) -> list[dict[str, Any]]:
        r, c = self._reasoning.flush() if self._reasoning else ("", "")
        content, calls = self._split(c)
        if self._tools is not None:
            rest, more = self._tools.flush()
            content, calls = content + rest, calls + more
        return self._emit(r, content, calls)

    def _split(self, content: str) -> tuple[str, list[ToolCall]]:
        if self._tools is None or not content:
            return content, []
        return self._tools.feed(content)

    def _emit(self, reasoning: str, content: str, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if reasoning:
            self.reasoning.append(reasoning)
            out.append({"reasoning_content": reasoning})
        if content:
            self.content.append(content)
            out.append({"content": content})
        for call in calls:
            out.extend(tool_call_deltas(len(self.calls), call.to_openai()))
            self.calls.append(call)
        return out

    def message(self) -> tuple[str | None, str | None, list[dict] | None]:
        """(content, reasoning_content, tool_calls) of the whole answer."""
        content = "".join(self.content)
        reasoning = "".join(self.reasoning) if self._reasoning and self._reasoning.saw_reasoning else None
        calls = [c.to_openai() for c in self.calls] or None
        return (content if content or not calls else None), reasoning, calls

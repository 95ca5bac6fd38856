"""Tool calls out of model text, per family format, whole and streamed in arbitrary pieces."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrum_runtime.chat_output import ChatOutput
from ferrum_runtime.structured import tool_format, tool_messages_as_text
from ferrum_runtime.tool_calls import ToolCallParser, parse_tool_calls

pytestmark = pytest.mark.unit

NAMES = {"get_weather", "get_time"}
QWEN_TWO = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>')
LLAMA_TWO = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
             '{"name": "get_time", "parameters": {"city": "Lima"}}')


def _summary(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt,text", [("qwen", QWEN_TWO), ("generic", QWEN_TWO), ("llama", LLAMA_TWO)])
def test_parallel_calls_and_surrounding_text(fmt, text):
    content, calls = parse_tool_calls(text, fmt, NAMES)
    assert _summary(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Lima"})]
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == 2
    assert content.strip() == ("Let me check." if fmt != "llama" else "")


@pytest.mark.parametrize("fmt,text", [("qwen", QWEN_TWO), ("llama", LLAMA_TWO),
                                      ("qwen", "no calls here, just <tool text and a < sign"),
                                      ("llama", "The answer is {\"x\": 1} in JSON.")])
@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=12))
def test_streaming_in_any_pieces_equals_the_whole(fmt, text, cuts):
    whole_content, whole_calls = parse_tool_calls(text, fmt, NAMES)
    parser = ToolCallParser(fmt, NAMES)
    content, calls = "", []
    bounds = sorted({0, len(text), *[c % (len(text) + 1) for c in cuts]})
    for a, b in zip(bounds, bounds[1:]):
        c, got = parser.feed(text[a:b])
        content += c
        calls += got
    c, got = parser.flush()
    assert content + c == whole_content and _summary(calls + got) == _summary(whole_calls)


def test_unknown_function_or_broken_json_stays_content():
    text = '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call> and <tool_call>{oops</tool_call>'
    content, calls = parse_tool_calls(text, "qwen", NAMES)
    assert calls == [] and content == text
    content, calls = parse_tool_calls("<tool_call>\n{\"name\": \"get_time\", \"argu", "qwen", NAMES)
    assert calls == [] and content.startswith("<tool_call>")  # cut by max_tokens: the text, as it came


def test_chat_output_streams_reasoning_content_and_calls():
    out = ChatOutput(reasoning=True, tool_format="qwen", tool_names=frozenset(NAMES))
    deltas = []
    for piece in ["<th", "ink>plan", " it</th", "ink>\n\n", QWEN_TWO[:30], QWEN_TWO[30:]]:
        deltas += out.feed(piece)
    deltas += out.flush()
    content, reasoning, calls = out.message()
    assert reasoning == "plan it" and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "plan it"
    tool_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [t["index"] for t in tool_deltas] == [0, 0, 1, 1]
    assert tool_deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and "id" in tool_deltas[0]
    assert json.loads(tool_deltas[1]["function"]["arguments"]) == {"city": "Paris"}
    assert content.strip() == "Let me check."


def test_formats_from_templates_and_history_as_text():
    assert tool_format("... <tool_call> ...") == "qwen"
    assert tool_format("... <|python_tag|> ...") == "llama"
    assert tool_format("{{ messages }}") == "generic" and tool_format(None) == "generic"
    history = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": {"city": "Lima"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "10:42"}]
    text = tool_messages_as_text(history)
    assert text[0] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_time", "arguments": '
                                                       '{"city": "Lima"}}\n</tool_call>'}
    assert text[1] == {"role": "user", "content": "<tool_response>\n10:42\n</tool_response>"}

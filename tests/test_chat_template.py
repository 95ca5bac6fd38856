"""Chat templates rendered byte for byte like ``transformers``' ``apply_chat_template`` (SmolLM2's own template
and a Qwen3-style template with tools, tool calls and thinking), and reasoning-tag parsing."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrum_runtime.chat_template import ChatTemplateError, ReasoningParser, render_chat, split_reasoning
from ferrum_runtime.errors import FerrumError

# A Qwen3-style template: tools in the system turn (tojson, non-ASCII kept), assistant tool calls with
# arguments as dict or string, tool results grouped into one user turn, reasoning shown only after the last
# user query, enable_thinking, loop.last, namespace, loopcontrols and raise_exception.
QWEN3_STYLE = """\
{%- set ns = namespace(last_query=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call functions. Signatures:\\n<tools>" }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\nAnswer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role == 'system' %}
        {%- if not loop.first %}{{ raise_exception('system message must come first') }}{% endif %}
        {%- continue %}
    {%- elif m.role == 'user' %}
        {{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set content = m.content if m.content is defined else '' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if m.reasoning_content is defined and loop.index0 > ns.last_query %}
            {{- '<think>\\n' + m.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {% generation %}{{ content }}{% endgeneration %}
        {%- if m.tool_calls is defined %}
            {%- for call in m.tool_calls %}
                {%- set f = call.function if call.function is defined else call %}
                {%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{% endif %}
                {{- '<tool_call>\\n{"name": "' + f.name + '", "arguments": ' }}
                {%- if f.arguments is string %}{{- f.arguments }}{% else %}{{- f.arguments | tojson }}{% endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{% endif %}
        {{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{% endif %}
    {%- else %}
        {{- raise_exception('unknown role ' + m.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{% endif %}
{%- endif %}
"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city — °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                              "parameters": {"type": "object", "properties": {}}}}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    "multi_turn": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "Tell me a joke 🙂"},
        {"role": "assistant", "content": "Why did the chicken…"}, {"role": "user", "content": "Another one"}],
    "tools": [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Zürich and the time in 東京?"},
        {"role": "assistant", "content": None, "reasoning_content": "\nNeed two tools.\n", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}},
            {"type": "function", "function": {"name": "get_time", "arguments": '{"city": "東京"}'}}]},
        {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "09:30"},
        {"role": "assistant", "content": "It is 21 °C in Zürich; 09:30 in Tokyo.", "reasoning": "Both answered."},
        {"role": "user", "content": "Thanks"}],
    "reasoning_history": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "old"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "new"}],
    "reasoning_alias": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "why"}],
}


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from ferrum_compiler.frontend import open_source

    d = tmp_path_factory.mktemp("smollm2-tok")
    open_source("smollm2").write_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.mark.model
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(hf_tok, name, add_generation_prompt):
    messages = [m for m in CONVERSATIONS[name] if m["role"] in ("system", "user", "assistant")]
    messages = [{**m, "content": m["content"] or ""} for m in messages]  # SmolLM2's template concatenates content
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = render_chat(hf_tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      special_tokens=hf_tok.special_tokens_map)
    assert got == want


@pytest.mark.model
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL, TIME_TOOL]])
def test_qwen3_style_template_matches_transformers(hf_tok, name, add_generation_prompt, thinking, tools):
    messages = CONVERSATIONS[name]
    extra = {} if thinking is None else {"enable_thinking": thinking}
    want = hf_tok.apply_chat_template(messages, chat_template=QWEN3_STYLE, tokenize=False, tools=tools,
                                      add_generation_prompt=add_generation_prompt, **extra)
    got = render_chat(QWEN3_STYLE, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                      special_tokens=hf_tok.special_tokens_map, **extra)
    assert got == want
    # the render is really exercising what the test claims to
    if tools:
        assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in got
    if name == "tools":
        assert '"Zürich"' in got and "<tool_response>\n09:30" in got
    if name in ("reasoning_history", "reasoning_alias"):
        assert "<think>\nnew\n</think>" in got or "<think>\nwhy\n</think>" in got
    if add_generation_prompt and thinking is False:
        assert got.endswith("<think>\n\n</think>\n\n")


@pytest.mark.unit
def test_caller_messages_are_not_modified():
    messages = json.loads(json.dumps(CONVERSATIONS["tools"]))
    render_chat(QWEN3_STYLE, messages)
    assert messages == CONVERSATIONS["tools"]


@pytest.mark.unit
def test_template_errors_are_ferrum_errors():
    with pytest.raises(ChatTemplateError, match="unknown role robot") as err:
        render_chat(QWEN3_STYLE, [{"role": "robot", "content": "beep"}])
    assert isinstance(err.value, FerrumError)
    with pytest.raises(ChatTemplateError, match="line 1"):
        render_chat("{% for m in messages %}{{ m.content }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="SecurityError"):  # the sandbox blocks dunder access
        render_chat("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(ChatTemplateError, match="SecurityError"):  # and mutation of the inputs
        render_chat("{{ messages.append(1) }}", [])


@pytest.mark.unit
def test_template_helpers():
    t = ("{{ strftime_now('%Y-%m-%d') }}|{{ x | tojson }}|{{ x | tojson(indent=2, sort_keys=true) }}|"
         "{{ bos_token }}|{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}")
    x = {"b": "é<&>", "a": [1, None]}
    got = render_chat(t, [], x=x, special_tokens={"bos_token": "<s>"})
    date, plain, pretty, bos, loop = got.split("|")
    assert date in {datetime.now().strftime("%Y-%m-%d"), datetime.now().date().isoformat()}
    assert plain == '{"b": "é<&>", "a": [1, null]}'
    assert pretty == json.dumps(x, indent=2, sort_keys=True, ensure_ascii=False)
    assert bos == "<s>" and loop == "012"
    # kwargs win over special tokens, as in transformers
    assert render_chat("{{ bos_token }}", [], special_tokens={"bos_token": "<s>"}, bos_token="B") == "B"


@pytest.mark.unit
def test_templates_compile_once():
    from ferrum_runtime.chat_template import _compile

    assert _compile(QWEN3_STYLE) is _compile(QWEN3_STYLE)


# -- reasoning -------------------------------------------------------------------------------------------------

def _parse_stream(deltas: list[str], starts_in_reasoning: bool = False) -> tuple[str, str]:
    p = ReasoningParser(starts_in_reasoning=starts_in_reasoning)
    r, c = "", ""
    for d in deltas:
        dr, dc = p.feed(d)
        r, c = r + dr, c + dc
    dr, dc = p.flush()
    return r + dr, c + dc


REASONING_CASES = [
    # (text, starts_in_reasoning, reasoning, content)
    ("<think>\nLet me add.\n</think>\n\nIt is 4.", False, "\nLet me add.\n", "\n\nIt is 4."),
    ("\n <think>a<b</think>c</think>d", False, "a<b", "c</think>d"),
    ("Plain answer with <think> later", False, None, "Plain answer with <think> later"),
    ("still thinking </think>answer", True, "still thinking ", "answer"),
    ("<think>re-opened</think>x", True, "re-opened", "x"),
    ("<think>cut off mid thought </thi", False, "cut off mid thought </thi", ""),
    ("<thi", False, None, "<thi"),
    ("\n<thi", True, "\n<thi", ""),  # the prompt opened reasoning and the output ended inside a would-be tag
    ("", False, None, ""),
    ("<think></think>", False, "", ""),
]


@pytest.mark.unit
@pytest.mark.parametrize("text,starts,reasoning,content", REASONING_CASES)
def test_reasoning_split_at_every_position(text, starts, reasoning, content):
    want = (reasoning or "", content)
    assert _parse_stream([text], starts) == want
    for i in range(len(text) + 1):  # one cut anywhere, tags included
        assert _parse_stream([text[:i], text[i:]], starts) == want, i
    for i in range(len(text) + 1):  # and two cuts
        for j in range(i, len(text) + 1):
            assert _parse_stream([text[:i], text[i:j], text[j:]], starts) == want, (i, j)
    assert _parse_stream(list(text), starts) == want  # one character at a time
    if starts == ("</think>" in text):  # split_reasoning infers the opening from the end tag
        assert split_reasoning(text) == (reasoning, content)


@pytest.mark.unit
def test_reasoning_parser_holds_only_what_could_be_a_tag():
    p = ReasoningParser()
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>abc</") == ("abc", "")
    assert p.feed("th") == ("", "")
    assert p.feed("ink>\n\nHi") == ("", "\n\nHi")
    assert p.feed(" <think>") == ("", " <think>")  # after the block, tags are plain content
    q = ReasoningParser()
    assert q.feed("Hello") == ("", "Hello")  # no leading tag: content streams at once


@pytest.mark.unit
def test_split_reasoning_custom_tags():
    assert split_reasoning("[R]why[/R]what", "[R]", "[/R]") == ("why", "what")
    assert split_reasoning("no tags") == (None, "no tags")


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(reasoning=st.text(alphabet="<>/thinkab \n", max_size=20).filter(lambda s: "</think>" not in s),
       content=st.text(alphabet="<>/thinkab \n", max_size=20), opened=st.booleans(),
       cuts=st.lists(st.integers(0, 60), max_size=6))
def test_reasoning_stream_equals_whole(reasoning, content, opened, cuts):
    text = ("" if opened else "<think>") + reasoning + "</think>" + content
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    got = _parse_stream([text[a:b] for a, b in zip(bounds, bounds[1:])], starts_in_reasoning=opened)
    if opened and reasoning.lstrip().startswith("<think>"):
        return  # the model re-opened the tag: the parser drops it, covered by REASONING_CASES
    assert got == (reasoning, content)
    assert split_reasoning(text) == (reasoning, content)

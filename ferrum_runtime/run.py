"""``ferrum run``: one prompt, or a multi-turn chat in the terminal, streamed through the engine.

The REPL keeps the conversation, has ``/reset`` and ``/exit``; Ctrl-C stops the current answer (the
request is aborted and its KV blocks freed) without leaving. Prompt and generation speed are reported
after each answer. Qwen3-style ``<think>`` reasoning is shown dimmed and kept out of the history.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from .engine import Engine, EngineConfig
from .sampler import SamplingParams


def _style(text: str, dim: bool) -> str:
    return f"\033[2m{text}\033[0m" if dim and text and sys.stdout.isatty() else text


async def _answer(engine: Engine, prompt_ids: list[int], params: SamplingParams, reasoning: bool) -> str:
    from .chat_template import ReasoningParser

    parser = ReasoningParser(starts_in_reasoning=False) if reasoning else None
    content: list[str] = []
    t0 = time.perf_counter()
    first = None
    n_out = 0
    drafted, kept = engine.counters["draft_tokens"], engine.counters["accepted_tokens"]
    async for delta in engine.generate(prompt_ids, params):
        if first is None:
            first = time.perf_counter()
        n_out = delta.completion_tokens
        think, text = parser.feed(delta.text) if parser else ("", delta.text)
        print(_style(think, True) + text, end="", flush=True)
        content.append(text)
        if delta.finish_reason is not None and parser:
            think, text = parser.flush()
            print(_style(think, True) + text, end="", flush=True)
            content.append(text)
    end = time.perf_counter()
    print()
    prefill = (first or end) - t0
    decode = end - (first or end)
    print(f"[prompt {len(prompt_ids)} tok, {len(prompt_ids) / max(prefill, 1e-9):.1f} tok/s; generated {n_out} tok, "
          f"{max(n_out - 1, 0) / max(decode, 1e-9):.1f} tok/s" + _drafts(engine, drafted, kept) + "]", file=sys.stderr)
    return "".join(content)


def _drafts(engine: Engine, drafted: int, kept: int) -> str:
    """``; drafts kept K of D`` since the counters read ``drafted`` and ``kept`` (speculative decoding)."""
    if engine.config.speculative is None:
        return ""
    return (f"; drafts kept {engine.counters['accepted_tokens'] - kept} of "
            f"{engine.counters['draft_tokens'] - drafted}")


def run_cli(args) -> int:
    artifact = Path(args.artifact)
    t0 = time.perf_counter()
    from .artifact import read_manifest
    from .cli import speculative_config

    spec = speculative_config(args.speculative_tokens, read_manifest(artifact).target["device"])
    engine = Engine.from_artifact(artifact, EngineConfig(max_num_seqs=4, speculative=spec))
    print(f"loaded {artifact} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    tok = engine.tokenizer
    if tok is None:
        raise SystemExit("ferrum: error: this artifact has no tokenizer; `ferrum run` needs one")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    reasoning = bool(tok.chat_template and "<think>" in tok.chat_template)
    loop = asyncio.new_event_loop()

    def answer(messages: list[dict]) -> str:
        thinking: dict[str, Any] = {"enable_thinking": False} if args.disable_thinking else {}
        text = messages[-1]["content"] if args.raw or not tok.chat_template else tok.render_chat(messages, **thinking)
        ids = tok.encode(text)
        engine.check(ids, params)
        task = loop.create_task(_answer(engine, ids, params, reasoning))
        try:
            return loop.run_until_complete(task)
        except KeyboardInterrupt:
            task.cancel()  # closing the stream aborts the request and frees its blocks
            loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
            raise

    try:
        if args.prompt is not None:
            answer([{"role": "user", "content": args.prompt}])
            return 0
        history: list[dict] = []
        print("chat: /reset clears the conversation, /exit quits, Ctrl-C stops an answer", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                return 0
            if line.strip() == "/exit":
                return 0
            if line.strip() == "/reset":
                history = []
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            try:
                history.append({"role": "assistant", "content": answer(history)})
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr)
                history.pop()
    finally:
        loop.run_until_complete(engine.close())
        loop.close()

"""Single-sequence generation for ``ferrum run``: tokenizer, chat template, prefill, decode, streaming.

A deliberately small loop over ``CompiledModel``: one sequence owning a contiguous run of KV blocks.
The continuous-batching engine (scheduler, block manager, full sampler) replaces it as the way
requests are served; this stays the simplest end-to-end path through an artifact.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import FerrumError
from .model import CompiledModel, RaggedBatch

PREFILL_CHUNK = 512


class TokenizerFiles:
    """tokenizer.json + tokenizer_config.json + generation_config.json of an artifact."""

    def __init__(self, artifact: Path):
        from tokenizers import Tokenizer

        path = artifact / "tokenizer.json"
        if not path.is_file():
            raise FerrumError(f"{artifact} has no tokenizer.json; compile from a source that ships one")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.config = _read_json(artifact / "tokenizer_config.json")
        gen = _read_json(artifact / "generation_config.json")
        eos = gen.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.config.get("eos_token"):
            tid = self.tokenizer.token_to_id(_token_text(self.config["eos_token"]))
            if tid is not None:
                ids.add(tid)
        self.eos_ids = ids
        template = self.config.get("chat_template")
        if template is None and (artifact / "chat_template.jinja").is_file():
            template = (artifact / "chat_template.jinja").read_text()
        self.chat_template = template

    def render_chat(self, messages: list[dict]) -> str:
        if not self.chat_template:
            return "".join(m["content"] for m in messages)
        import jinja2

        def raise_exception(msg):
            raise FerrumError(f"chat template: {msg}")

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        tmpl = env.from_string(self.chat_template)
        special = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token") and v}
        return tmpl.render(messages=messages, add_generation_prompt=True, **special)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.config.get("bos_token")
        bos_id = self.tokenizer.token_to_id(_token_text(bos)) if bos else None
        return [bos_id] + ids if self.config.get("add_bos_token") and bos_id is not None else ids


def _token_text(tok) -> str:
    return tok["content"] if isinstance(tok, dict) else str(tok)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0


def generate(model: CompiledModel, prompt_ids: list[int], max_tokens: int, temperature: float,
             eos_ids: set[int], rng: np.random.Generator, stats: Stats) -> Iterator[int]:
    """Yield generated token ids for one sequence, stopping at EOS or ``max_tokens``."""
    capacity = min(model.max_model_len, model.num_blocks * model.block_size)
    if len(prompt_ids) >= capacity:
        raise FerrumError(f"the prompt has {len(prompt_ids)} tokens; this model and KV cache hold {capacity}")
    max_tokens = min(max_tokens, capacity - len(prompt_ids))
    table = np.arange(-(-capacity // model.block_size), dtype=np.int32)[None, :]

    def step(ids: list[int], start: int) -> np.ndarray:
        pos = np.arange(start, start + len(ids), dtype=np.int32)
        batch = RaggedBatch(np.asarray(ids, np.int32), pos, np.array([0, len(ids)], np.int32), table,
                            pos.copy(), np.array([len(ids) - 1], np.int32))
        return model.forward(batch)[0]

    t0 = time.perf_counter()
    for s in range(0, len(prompt_ids), PREFILL_CHUNK):
        logits = step(prompt_ids[s:s + PREFILL_CHUNK], s)
    stats.prompt_tokens += len(prompt_ids)
    stats.prompt_seconds += time.perf_counter() - t0
    pos = len(prompt_ids)
    t0 = time.perf_counter()
    for _ in range(max_tokens):
        if temperature <= 0:
            tok = int(np.argmax(logits))
        else:
            z = logits.astype(np.float64) / temperature
            p = np.exp(z - z.max())
            tok = int(rng.choice(len(p), p=p / p.sum()))
        stats.generated_tokens += 1
        if tok in eos_ids:
            break
        yield tok
        logits = step([tok], pos)
        pos += 1
    stats.generate_seconds += time.perf_counter() - t0


def stream_text(tok: TokenizerFiles, ids: Iterator[int]) -> Iterator[str]:
    """Incremental detokenization that holds back incomplete UTF-8 sequences."""
    out: list[int] = []
    shown = ""
    for i in ids:
        out.append(i)
        text = tok.tokenizer.decode(out, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text


def run_cli(args) -> int:
    artifact = Path(args.artifact)
    t0 = time.perf_counter()
    model = CompiledModel.load(artifact)
    tok = TokenizerFiles(artifact)
    print(f"loaded {artifact} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rng = np.random.default_rng(args.seed)

    def answer(messages: list[dict]) -> str:
        text = messages[-1]["content"] if args.raw else tok.render_chat(messages)
        stats = Stats()
        pieces = []
        for piece in stream_text(tok, generate(model, tok.encode(text), args.max_tokens, args.temperature,
                                               tok.eos_ids, rng, stats)):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        print(f"[prompt {stats.prompt_tokens} tok, {stats.prompt_tokens / max(stats.prompt_seconds, 1e-9):.1f} tok/s; "
              f"generated {stats.generated_tokens} tok, "
              f"{stats.generated_tokens / max(stats.generate_seconds, 1e-9):.1f} tok/s]", file=sys.stderr)
        return "".join(pieces)

    if args.prompt is not None:
        answer([{"role": "user", "content": args.prompt}])
        return 0
    history: list[dict] = []
    print("chat: /reset clears the conversation, /exit quits", file=sys.stderr)
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
        history.append({"role": "user", "content": line})
        try:
            history.append({"role": "assistant", "content": answer(history)})
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
            history.pop()

"""An artifact's tokenizer files: tokenizer.json, tokenizer_config.json (chat template, BOS/EOS),
generation_config.json (EOS ids)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FerrumError


class TokenizerFiles:
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
            tid = self.tokenizer.token_to_id(token_text(self.config["eos_token"]))
            if tid is not None:
                ids.add(tid)
        self.eos_ids = ids
        template = self.config.get("chat_template")
        if template is None and (artifact / "chat_template.jinja").is_file():
            template = (artifact / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = template

    @classmethod
    def of(cls, artifact: Path) -> "TokenizerFiles | None":
        """The artifact's tokenizer, or None when it has none (it then runs token ids only)."""
        return cls(artifact) if (artifact / "tokenizer.json").is_file() else None

    @property
    def special_tokens(self) -> dict[str, str]:
        return {k: token_text(v) for k, v in self.config.items() if k.endswith("_token") and v}

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **kwargs) -> str:
        from .chat_template import render_chat

        if not self.chat_template:
            raise FerrumError("this model has no chat template; send a plain prompt (completions) instead")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           special_tokens=self.special_tokens, **kwargs)

    def encode(self, text: str) -> list[int]:
        """Token ids as llama.cpp / transformers would feed the model: BOS first when the model wants it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.config.get("bos_token")
        bos_id = self.tokenizer.token_to_id(token_text(bos)) if bos else None
        if self.config.get("add_bos_token") and bos_id is not None and ids[:1] != [bos_id]:
            return [bos_id] + ids
        return ids


def token_text(tok) -> str:
    return tok["content"] if isinstance(tok, dict) else str(tok)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}

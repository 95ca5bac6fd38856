"""Rebuild a ``tokenizers.Tokenizer`` (and a tokenizer_config) from a GGUF file's ``tokenizer.*`` metadata.

- ``gpt2`` (byte-level BPE: SmolLM2, Qwen, Llama 3): a BPE model over the stored vocabulary and merges
  with a byte-level pre-tokenizer; the split regex follows ``tokenizer.ggml.pre`` where the vocabulary
  was trained with a known one, else the GPT-2 default.
- ``llama`` (SentencePiece: Llama 2, TinyLlama, Mistral): a BPE model with byte fallback whose merges
  are derived from the token scores (best-scored merged token first), ``▁`` for spaces, a prefix space
  on the first word unless ``add_space_prefix`` is false.

Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens, so
``<|im_start|>`` or ``<think>`` stay whole. The result must encode exactly as the ``transformers`` GGUF
loader does; tests compare the two.
"""

from __future__ import annotations

from . import SourceError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# tokenizer.ggml.pre → the split pattern its merges were learned with
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PATTERNS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3,
                  "dbrx": _LLAMA3, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer(meta):
    """``(tokenizers.Tokenizer, tokenizer_config dict)`` for the GGUF whose metadata is ``meta``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.need("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if kind == "gpt2":
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        vocab = {}
        for i, tok in enumerate(tokens):
            # tokens outside the byte alphabet (mislabelled specials) are respelled byte by byte
            vocab[tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))] = i
        merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
        split = SPLIT_PATTERNS.get(meta.get("tokenizer.ggml.pre") or "")
        if split is None:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        usable = lambda t: set(t) <= alphabet  # noqa: E731
    elif kind == "llama":
        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges = meta.get("tokenizer.ggml.merges")
        merges = ([tuple(m.split(" ", 1)) for m in merges] if merges
                  else merges_from_scores(tokens, list(meta.need("tokenizer.ggml.scores"))))
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        prefix = meta.get("tokenizer.ggml.add_space_prefix")
        prefix = True if prefix is None else bool(prefix)
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                    split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tk.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
        add_bos = True if add_bos is None else add_bos  # llama.cpp adds BOS unless the file says otherwise
        usable = lambda t: True  # noqa: E731
    else:
        raise SourceError(f"GGUF tokenizer type {kind!r} is not supported (supported: gpt2, llama); "
                          "compile the original Hugging Face checkpoint instead")
    control = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL and usable(t)]
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED and t in vocab]
    if user:
        tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token(key: str):
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tk, {k: v for k, v in config.items() if v is not None}


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens of the
    vocabulary is a merge, ranked by the merged token's score (highest first), then by longer left,
    then longer right piece, then by file order (merged token, then the pieces' ids)."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for order, (tok, score) in enumerate(zip(tokens, scores)):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                ranked.append((-score, -len(left), -len(right), order, ids[left], ids[right], left, right))
    ranked.sort()
    return [(r[6], r[7]) for r in ranked]

"""Streaming detokenization against ``Tokenizer.decode`` of the whole output (the real SmolLM2 byte-level
tokenizer and a SentencePiece-style byte-fallback tokenizer built here), and stop-string cutting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from ferrum_runtime.detokenizer import IncrementalDetokenizer, StopChecker

pytestmark = pytest.mark.unit

MULTIBYTE = ("naïve café — déjà vu. 日本語のテキストと中文字符。 🙂👍🏽🇫🇷 👨‍👩‍👧 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Ελληνικά русский "
             "\u00a0tab\there ½ ∑x² ß")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Tokenizer:
    from ferrum_compiler.frontend import open_source

    d = tmp_path_factory.mktemp("smollm2-tok")
    open_source("smollm2").write_tokenizer(d)
    return Tokenizer.from_file(str(d / "tokenizer.json"))


def _sentencepiece_like(decoder: str) -> Tokenizer:
    """A tiny Llama-style tokenizer: Metaspace pre-tokenizer (prefix space on the first word), BPE over a few
    merges, byte fallback for everything else, <s>/</s> special."""
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("▁", "c"), ("a", "f"), ("▁c", "af")]
    vocab: dict[str, int] = {"<unk>": 0}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz.,!?", *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    if decoder == "metaspace":
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                     prepend_scheme="first")])
    else:  # what ferrum's GGUF frontend builds for llama vocabularies
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok


SP_TOKENIZERS = {name: _sentencepiece_like(name) for name in ("metaspace", "strip")}


class _CountingTokenizer:
    """The real tokenizer, recording the longest id list it was asked to decode."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.longest = tok, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream(tok, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    return [detok.push(t) for t in ids] + [detok.flush()]


# -- byte-level BPE (SmolLM2) --------------------------------------------------------------------------------------

def test_multibyte_characters_never_stream_half_decoded(smollm2):
    ids = smollm2.encode(MULTIBYTE).ids
    # the text really does split characters across tokens
    assert any("\ufffd" in smollm2.decode([t]) for t in ids)
    deltas = _stream(smollm2, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == smollm2.decode(ids) == MULTIBYTE
    assert deltas[-1] == ""  # nothing held back at the end of complete text


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\ufffd"), max_size=60))
def test_random_unicode_streams_exactly(smollm2, text):
    ids = smollm2.encode(text).ids
    deltas = _stream(smollm2, ids)
    assert "".join(deltas) == smollm2.decode(ids)
    # SmolLM2's vocabulary lacks a few bytes (e.g. 0xF1), so some characters cannot round-trip and decode to
    # U+FFFD; everything that does round-trip streams without one
    if smollm2.decode(ids) == text:
        assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=40), skip=st.booleans())
def test_random_token_ids_concatenate_to_decode(smollm2, ids, skip):
    # arbitrary ids include stray continuation bytes and special tokens: the text may hold U+FFFD, but the
    # stream still adds up to decode() of the whole list
    assert "".join(_stream(smollm2, ids, skip)) == smollm2.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(smollm2, skip):
    ids = smollm2.encode("<|im_start|>assistant\nHi 🙂 there<|im_end|>\n<|im_start|>user\n日本").ids
    assert smollm2.token_to_id("<|im_end|>") in ids
    deltas = _stream(smollm2, ids, skip)
    assert "".join(deltas) == smollm2.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in "".join(deltas)) == (not skip)


def test_window_stays_short(smollm2):
    ids = smollm2.encode(MULTIBYTE * 8).ids
    counting = _CountingTokenizer(smollm2)
    assert "".join(_stream(counting, ids)) == MULTIBYTE * 8
    assert len(ids) > 300 and counting.longest <= 12


def test_incomplete_character_at_the_end_comes_out_of_flush(smollm2):
    ids = smollm2.encode("ok 🙂").ids
    detok = IncrementalDetokenizer(smollm2)
    cut = ids[:-1] + [b for b in smollm2.encode("🙂").ids[:1]]  # stop inside the emoji's bytes
    text = "".join(detok.push(t) for t in cut)
    assert "\ufffd" not in text
    assert text + detok.flush() == smollm2.decode(cut)


# -- SentencePiece style (Metaspace, byte fallback) ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SP_TOKENIZERS))
def test_sentencepiece_leading_space_and_byte_fallback(name):
    tok = SP_TOKENIZERS[name]
    text = "the cafe in a café, 中文 and 🙂 the end!"
    enc = tok.encode(text)
    assert enc.tokens[0] == "▁the" and "<0xF0>" in enc.tokens  # prefix space merged; emoji as bytes
    ids = enc.ids
    deltas = _stream(tok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    # with <s> first and special tokens kept or skipped, the first word's space is still handled as decode() does
    bos = tok.token_to_id("<s>")
    for skip in (True, False):
        assert "".join(_stream(tok, [bos, *ids, tok.token_to_id("</s>"), *ids], skip)) == tok.decode(
            [bos, *ids, tok.token_to_id("</s>"), *ids], skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\ufffd"), max_size=40),
       name=st.sampled_from(sorted(SP_TOKENIZERS)))
def test_sentencepiece_random_text(text, name):
    tok = SP_TOKENIZERS[name]
    ids = tok.encode(text).ids
    deltas = _stream(tok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


# -- stop strings ----------------------------------------------------------------------------------------------

def _check_stop_stream(deltas: list[str], stop: list[str]) -> tuple[str, bool]:
    """Feed deltas; assert nothing past the first stop string ever leaks; return (emitted, stopped)."""
    full = "".join(deltas)
    hits = [i for i in (full.find(s) for s in stop) if i >= 0]
    expected = full[:min(hits)] if hits else full
    checker, out, stopped = StopChecker(stop), "", False
    for d in deltas:
        safe, stopped = checker.feed(d)
        out += safe
        assert expected.startswith(out), (out, expected)  # never ahead of the cut
        if stopped:
            break
    if not stopped:
        out += checker.flush()  # may still find a stop string it held, waiting for a longer one
        stopped = checker.stopped
    assert out == expected and stopped == bool(hits)
    return out, stopped


def test_stop_string_spanning_tokens_is_cut_exactly(smollm2):
    text = "Answer: 42.\n\nUser: next question 日本"
    ids = smollm2.encode(text).ids
    detok = IncrementalDetokenizer(smollm2)
    deltas = [detok.push(t) for t in ids]
    assert "\n\nUser:" not in deltas and sum("\n" in d for d in deltas) >= 1  # really split over tokens
    out, stopped = _check_stop_stream(deltas, ["\n\nUser:"])
    assert (out, stopped) == ("Answer: 42.", True)


def test_earliest_stop_wins_and_later_feeds_are_empty():
    checker = StopChecker(["END", "ND!", "x"])
    assert checker.feed("abE") == ("ab", False)
    assert checker.feed("N") == ("", False)
    assert checker.feed("D! x") == ("", True)
    assert checker.feed("more") == ("", True)


def test_held_prefix_is_released_by_flush_or_by_mismatch():
    checker = StopChecker(["</answer>"])
    assert checker.feed("done </ans") == ("done ", False)
    assert checker.flush() == "</ans"
    checker = StopChecker(["</answer>"])
    assert checker.feed("a </ans") == ("a ", False)
    assert checker.feed("wer is") == ("</answer is", False)


def test_no_stop_strings_pass_everything_through():
    checker = StopChecker([])
    assert checker.feed("anything") == ("anything", False) and checker.flush() == ""


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\n日🙂", max_size=30), stops=st.lists(st.text(alphabet="ab\n日🙂", min_size=1,
                                                                             max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=10))
def test_stop_checker_random(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    _check_stop_stream([text[a:b] for a, b in zip(bounds, bounds[1:])], stops)


def test_an_earlier_starting_stop_string_is_awaited():
    """'aba' starts before 'b': nothing is emitted until it is known whether 'aba' completes."""
    checker = StopChecker(["b", "aba"])
    assert checker.feed("ab") == ("", False)
    assert checker.feed("a") == ("", True)  # 'aba' completed: cut before it
    checker = StopChecker(["b", "aba"])
    assert checker.feed("ab") == ("", False)
    assert checker.feed("c") == ("a", True)  # 'aba' cannot complete: the cut is at 'b'
    checker = StopChecker(["b", "aba"])
    assert checker.feed("ab") == ("", False)
    assert checker.flush() == "a" and checker.stopped  # the end: the held 'b' still stops

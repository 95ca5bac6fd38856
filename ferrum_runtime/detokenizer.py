"""Streaming text: token ids -> text deltas, and stop strings cut out of the stream.

``IncrementalDetokenizer`` decodes only a short window of recent tokens per step (vLLM's prefix/read
offsets): ``ids[prefix:read]`` is text already emitted, ``ids[read:]`` is not yet emitted. The delta is
``decode(ids[prefix:]) - decode(ids[prefix:read])``. Both decodes start at the same token, so decoders
that treat the first token specially (SentencePiece's leading-space strip) agree, and since ``read``
only advances when the text ends on a whole character, the window never starts inside a UTF-8 sequence.
The concatenated deltas (plus ``flush()``) equal ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"  # what decode() makes of an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to the tail of the text already emitted
        self._read = 0
        self._prefix_text = ""  # decode(ids[prefix:read])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text, or "" while it ends in an incomplete character."""
        self.ids.append(token_id)
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""  # no new text yet (a skipped special token, or bytes of a character still to come)
        return self._advance(text)

    def flush(self) -> str:
        """Text held back at the end of generation (an incomplete character decodes as U+FFFD, as in decode())."""
        if self._read == len(self.ids):
            return ""
        return self._advance(self._decode(self.ids[self._prefix:]))

    def _advance(self, text: str) -> str:
        assert text.startswith(self._prefix_text), (text, self._prefix_text)  # decoders here are left-to-right
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        return delta


class StopChecker:
    """Cuts the stream at the first stop string. Text that may be the start of a stop string is held back
    until it is known not to be; the stop string and everything after it are never emitted."""

    def __init__(self, stop: tuple[str, ...] | list[str]):
        assert all(stop), "stop strings are validated non-empty by SamplingParams.validate"
        self.stop = tuple(stop)
        self.stopped = False
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stop:  # nothing to look for (most requests): every token's text goes out as it is
            return delta, False
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        first = min(hits) if hits else len(text)
        wait = self._partial_start(text, first)  # a stop string starting earlier may still complete
        if wait is not None:
            self._held = text[wait:]
            return text[:wait], False
        if hits:
            self.stopped, self._held = True, ""
            return text[:first], True
        self._held = ""
        return text, False

    def flush(self) -> str:
        """Held text, for when generation ends: cut at a complete stop string it holds, if any."""
        held, self._held = self._held, ""
        hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return held[:min(hits)]
        return held

    def _partial_start(self, text: str, limit: int) -> int | None:
        """The first position p < limit where text[p:] is a proper prefix of some stop string."""
        longest = max((len(s) for s in self.stop), default=1)
        for p in range(max(0, len(text) - longest + 1), limit):
            tail = text[p:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                return p
        return None

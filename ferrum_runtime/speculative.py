"""Speculative decoding by prompt lookup: draft tokens copied from the sequence's own text, verified by
one forward call (pure Python + numpy, no TVM, no model).

A decoding sequence's last ``n`` tokens (``n`` from ``ngram_max`` down to ``ngram_min``) are looked up
earlier in its prompt and output; the tokens that followed the latest match become up to
``num_tokens`` drafts. The engine then computes the sequence's next token and its drafts in one step
(K/V and a logits row each) and keeps the drafts while each equals the token its row picks: row ``j``
sees the drafts before it, so a kept draft is exactly the token plain decoding would have produced.
The first row that disagrees gives the next token itself, so a step yields 1 to ``num_tokens + 1``
tokens, the same tokens, with the same random draws, as decoding one at a time. Text that repeats its
context (code edits, quoting, extraction, structured output) gains; text that does not costs the
rejected rows' compute. vLLM's ``ngram`` method and llama.cpp's lookup decoding work the same way.

Whether drafts pay depends on the batch. A step of T tokens costs about ``a + b T`` (a: reading the
weights, b: a token's compute); d drafts kept with probability p add ``b d`` and ``p d`` tokens, which
beats the step's own rate ``T / (a + b T)`` when ``p > T / (T + a / b)`` (``worth_drafting``). One
sequence on a 2-core CPU (a / b ~ 4) breaks even at p ~ 0.2, 16 sequences at ~ 0.8. Each sequence keeps
an estimate of p from its own drafts and is drafted only while it clears the bar of the step's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpeculativeConfig:
    """Server-time: prompt-lookup drafts per step (``num_tokens``) and the n-gram sizes matched."""

    num_tokens: int
    ngram_min: int = 2
    ngram_max: int = 4
    fixed_cost: float | None = None  # a / b above, in tokens; None: the device's (FIXED_COST)

    def __post_init__(self) -> None:
        assert self.num_tokens >= 1 and 1 <= self.ngram_min <= self.ngram_max, self


# a / b by device kind: measured for CPUs (SmolLM2, 2 cores: a step of 1 token 6.4 ms, of 4 tokens 10.5 ms,
# of 8 14.2 ms); a GPU's decode reads its weights at the same cost up to tens of tokens (not measured yet)
FIXED_COST = {"cpu": 4.0, "gpu": 64.0}
PRIOR = 0.6  # a new sequence's estimated share of kept drafts
KEEP = 0.5  # weight of the estimate against a step's share


def worth_drafting(kept: float, tokens: int, fixed_cost: float) -> bool:
    """Whether drafts kept at rate ``kept`` speed up a step of ``tokens`` sequences (see the module doc)."""
    return kept * (tokens + fixed_cost) > tokens


def propose(tokens: np.ndarray, config: SpeculativeConfig, limit: int) -> list[int]:
    """Up to ``min(config.num_tokens, limit)`` drafts to follow ``tokens`` [N] (int32): the tokens after
    the latest earlier occurrence of its longest suffix of ``ngram_min..ngram_max`` tokens; [] when
    none occurs."""
    k = min(config.num_tokens, limit)
    N = tokens.shape[0]
    if k <= 0:
        return []
    for n in range(min(config.ngram_max, N - 1), config.ngram_min - 1, -1):
        # starts i < N - n of earlier windows tokens[i:i+n] equal to the suffix tokens[N-n:]
        m = N - n  # windows starting before the suffix itself
        hit = tokens[:m] == tokens[N - n]
        for j in range(1, n):
            hit &= tokens[j:m + j] == tokens[N - n + j]
        starts = np.flatnonzero(hit)
        if starts.size:
            follow = int(starts[-1]) + n  # first token after the match (< N: the match ends before the suffix does)
            return tokens[follow:follow + k].tolist()
    return []


class History:
    """A sequence's tokens (prompt, then output) as an int32 array that grows with it: the proposer
    reads the array instead of converting the token list every step."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, np.int32)
        self._n = 0

    def of(self, seq) -> np.ndarray:
        """``seq.tokens`` [N] as int32 (``seq``: a scheduler Sequence; its tokens only ever grow)."""
        n = seq.num_tokens
        if n > self._buf.shape[0]:
            grown = np.zeros(max(2 * self._buf.shape[0], n, 64), np.int32)
            grown[:self._n] = self._buf[:self._n]
            self._buf = grown
        if n > self._n:
            self._buf[self._n:n] = seq.tokens_between(self._n, n)
        self._n = n
        return self._buf[:n]

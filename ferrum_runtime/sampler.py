"""Per-request sampling: parameters, per-sequence state and the batched sampler (numpy, no TVM).

Order of operations follows vLLM: logit_bias -> repetition penalty (prompt + output tokens) -> presence and
frequency penalties (output tokens) -> greedy argmax when temperature is 0, else temperature -> top_k ->
top_p -> min_p -> a draw with the sequence's own generator. Reported logprobs are of the raw model logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FerrumError

_GREEDY_EPS = 1e-5  # temperatures below this are greedy, as in vLLM (dividing by ~0 would overflow)
MAX_LOGPROBS = 20  # the OpenAI API limit on top_logprobs


class SamplingError(FerrumError):
    """A sampling parameter is out of range; ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # 0 scores the prompt only
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k = the chosen token's logprob plus the k most likely
    prompt_logprobs: int | None = None
    n: int = 1

    def validate(self, vocab_size: int) -> None:
        def check(ok: bool, param: str, fix: str) -> None:
            if not ok:
                raise SamplingError(param, f"got {getattr(self, param)!r}; {fix}")

        # `not (a <= x)` style comparisons also reject NaN
        check(self.max_tokens >= 0, "max_tokens", "pass an integer >= 0 (0 scores the prompt only)")
        check(self.temperature >= 0, "temperature", "pass a value >= 0 (0 = greedy)")
        check(self.top_k >= -1, "top_k", "pass a positive integer, or 0 / -1 to turn top-k off")
        check(0 < self.top_p <= 1, "top_p", "pass a value in (0, 1] (1 = off)")
        check(0 <= self.min_p <= 1, "min_p", "pass a value in [0, 1] (0 = off)")
        check(self.repetition_penalty > 0, "repetition_penalty", "pass a value > 0 (1 = off)")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", "pass a value in [-2, 2] (0 = off)")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "pass a value in [-2, 2] (0 = off)")
        check(all(0 <= t < vocab_size for t, _ in self.logit_bias), "logit_bias",
              f"token ids must be in [0, {vocab_size})")
        check(all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias", "biases must be in [-100, 100]")
        check(all(0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids",
              f"token ids must be in [0, {vocab_size})")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty")
        check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
              f"pass an integer in [0, {MAX_LOGPROBS}] or leave it unset")
        check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
              f"pass an integer in [0, {MAX_LOGPROBS}] or leave it unset")
        check(self.n >= 1, "n", "pass an integer >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float  # of token_id under log_softmax(raw logits); NaN when the request did not ask for logprobs
    top_logprobs: list[tuple[int, float]]  # the params.logprobs most likely (id, logprob), best first


@dataclass(frozen=True)
class PromptLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


class SequenceSampler:
    """Sampling state of one sequence: its generator and the token statistics the penalties need.

    ``sample_index`` is the sequence's place among a request's ``n`` samples: with a seed, sample i draws
    from ``seed + i`` so the n samples differ but each is reproducible (vLLM does the same).
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int], vocab_size: int, sample_index: int = 0):
        params.validate(vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.output_ids: list[int] = []
        seed = None if params.seed is None else (params.seed + sample_index) % 2**64
        self.rng = np.random.default_rng(seed)
        # dense per-vocab statistics, allocated only when a penalty needs them
        self._seen: np.ndarray | None = None  # [V] bool: in prompt or output (repetition penalty)
        self._counts: np.ndarray | None = None  # [V] int32: occurrences in the output (presence/frequency)
        if params.repetition_penalty != 1.0:
            self._seen = np.zeros(vocab_size, dtype=bool)
            self._seen[np.asarray(prompt_token_ids, dtype=np.int64)] = True
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self._counts = np.zeros(vocab_size, dtype=np.int32)
        self._bias: tuple[np.ndarray, np.ndarray] | None = None  # (ids, values) of logit_bias
        if params.logit_bias:
            ids, vals = zip(*params.logit_bias)
            self._bias = np.asarray(ids, dtype=np.int64), np.asarray(vals, dtype=np.float64)

    def append(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        if self._seen is not None:
            self._seen[token_id] = True
        if self._counts is not None:
            self._counts[token_id] += 1

    @property
    def adjusts(self) -> bool:
        """Whether logit_bias or a penalty changes the logits before sampling."""
        return self._bias is not None or self._seen is not None or self._counts is not None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to adjust: the token is the argmax of the raw logits (the fast path)."""
        return self.params.greedy and not self.adjusts

    def adjust(self, row: np.ndarray) -> np.ndarray:
        """Logits [V] after logit_bias and the penalties (a new float64 array; ``row`` is not modified)."""
        p = self.params
        x = np.array(row, dtype=np.float64)
        if self._bias is not None:
            np.add.at(x, self._bias[0], self._bias[1])  # add.at: a repeated id adds twice
        if self._seen is not None:
            s = x[self._seen]
            x[self._seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
        if self._counts is not None:
            x -= p.frequency_penalty * self._counts + p.presence_penalty * (self._counts > 0)
        return x


def sample(logits: np.ndarray, seqs: list[SequenceSampler]) -> list[SampleResult]:
    """One token for each sequence; ``logits`` [B, V] float32, row i belongs to ``seqs[i]``."""
    assert logits.ndim == 2 and logits.shape[0] == len(seqs), (logits.shape, len(seqs))
    assert all(s.vocab_size == logits.shape[1] for s in seqs), (logits.shape, [s.vocab_size for s in seqs])
    B, V = logits.shape
    tokens = np.zeros(B, dtype=np.int64)
    fast = [i for i, s in enumerate(seqs) if s.plain_greedy]
    if fast:  # float32 argmax: the same token as float64, ties to the lowest id; no copy of the row
        tokens[fast] = np.argmax(logits[fast], axis=1)
    general = [i for i, s in enumerate(seqs) if not s.plain_greedy]
    # rows with nothing to adjust stay float32 (exp and the filters in SIMD float32; sums in float64); every
    # row general (all sampled, the API's default temperature 1): the logits as they are, no copy
    if all(not seqs[i].adjusts for i in general):
        x = logits if len(general) == B else logits[general]
    else:
        x = np.stack([seqs[i].adjust(logits[i]) for i in general])  # float64
    greedy = [j for j, i in enumerate(general) if seqs[i].params.greedy]  # rows of x
    if greedy:  # adjusted greedy rows: ties go to the lowest id
        tokens[[general[j] for j in greedy]] = np.argmax(x[greedy], axis=1)
    sampled = [j for j, i in enumerate(general) if not seqs[i].params.greedy]  # rows of x
    if sampled:
        rows = np.array([general[j] for j in sampled], dtype=np.int64)
        ps = [seqs[i].params for i in rows]
        temps = np.array([p.temperature for p in ps], dtype=x.dtype)
        mine = x if len(sampled) == x.shape[0] else x[sampled]
        z = mine if (temps == 1).all() else mine / temps[:, None]
        for j, (r, p) in enumerate(zip(rows, ps)):
            ids, probs = _kept(z[j], p.top_k if 0 < p.top_k < V else V, p.top_p, p.min_p)
            pick = _inverse_cdf(probs, seqs[r].rng.random())  # one draw per sequence per step, its own generator
            tokens[r] = pick if ids is None else ids[pick]
    out = []
    for i, s in enumerate(seqs):
        t = int(tokens[i])
        if s.params.logprobs is None:  # nobody reads it: skip the [V] float64 pass
            out.append(SampleResult(t, float("nan"), []))
            continue
        raw = logits[i].astype(np.float64)
        lse = float(_logsumexp(raw[None, :])[0])
        out.append(SampleResult(t, float(raw[t] - lse), _top(raw, lse, s.params.logprobs)))
    return out


def prompt_logprobs(logits: np.ndarray, prompt_ids: list[int], k: int) -> list[PromptLogprob | None]:
    """Logprob of each prompt token given the ones before it. ``logits`` [P, V] (P >= len(prompt_ids) - 1):
    row i predicts token i + 1, so the first token has no entry (None)."""
    assert logits.ndim == 2 and logits.shape[0] >= len(prompt_ids) - 1, (logits.shape, len(prompt_ids))
    n = max(len(prompt_ids) - 1, 0)
    raw = logits[:n].astype(np.float64)
    lse = _logsumexp(raw)
    out: list[PromptLogprob | None] = [None] if prompt_ids else []
    for i in range(n):
        t = prompt_ids[i + 1]
        out.append(PromptLogprob(t, float(raw[i, t] - lse[i]), _top(raw[i], lse[i], k)))
    return out


_FIRST_CANDIDATES = 256  # top-k/top-p sort the likeliest tokens first; 4x more each time the nucleus runs past
_STRIDE = 16  # the candidates' threshold is estimated from every 16th logit


def _kept(z: np.ndarray, k: int, top_p: float, min_p: float) -> tuple[np.ndarray | None, np.ndarray]:
    """What a row's filters keep of temperature-scaled logits z [V], with unnormalised probabilities (the
    likeliest token 1): ``(None, p [V])`` (0 where min_p drops) when no top-k/top-p applies (``k >= V``,
    ``top_p >= 1``), else ``(ids, p)``, ``ids`` ascending. top-k keeps the k largest, ties to the lowest id;
    top-p then the smallest prefix of them, most likely first, whose probability renormalised over the k
    reaches ``top_p`` (the token that crosses it included; vLLM's and HF's order); min_p compares with the
    likeliest token, which every filter keeps."""
    V = z.shape[0]
    zmax = z.max()
    if k >= V and top_p >= 1:
        kept, p = None, z - zmax
        np.exp(p, out=p)
    else:
        kept = _nucleus(z, zmax, k, top_p)
        p = np.exp(z[kept] - zmax)
    if min_p > 0:
        p[p < min_p] = 0.0
    return kept, p


def _nucleus(z: np.ndarray, zmax: np.floating, k: int, top_p: float) -> np.ndarray:
    """Ascending ids of the tokens top-k then top-p keep (see ``_kept``). Sorts the values of candidates
    only: every token at or above a threshold (ties all in), so their order is a full sort's; a full
    49k-token sort per row per step would cost more than the model step at 16 sequences. The threshold
    comes from every 16th logit, for about twice the tokens wanted; a miss only costs another round."""
    V = z.shape[0]
    # top-p renormalises over the top-k, or over the whole row (summed pairwise in the row's dtype: float32
    # to a relative error near 1e-7)
    total = None
    if k >= V:
        e = z - zmax
        total = float(np.exp(e, out=e).sum())
    m = max(k if k < V else 0, _FIRST_CANDIDATES)
    while True:
        ids = np.flatnonzero(z >= _threshold(z, m)) if 2 * m < V else np.arange(V)
        if ids.size < k < V:  # the estimate fell short of the top-k
            m *= 4
            continue
        zi = z[ids]
        s = np.sort(zi)[::-1][:k]  # the candidates' logits, largest first (the top k)
        ps = np.exp(s - zmax)
        mass_before = (np.cumsum(ps, dtype=np.float64) - ps) / (ps.sum(dtype=np.float64) if total is None else total)
        c = int(np.count_nonzero(mass_before < top_p))  # a prefix (mass_before grows); rank 0 always kept
        if c == s.size and s.size < min(k, V):  # the nucleus may go on past the candidates
            m *= 4
            continue
        cut = s[c - 1]
        keep = zi >= cut
        extra = int(np.count_nonzero(keep)) - c
        if extra:  # tokens tied at the cut: the lowest ids go first, the highest are dropped
            keep[np.flatnonzero(zi == cut)[-extra:]] = False
        return ids[keep]


def _threshold(z: np.ndarray, m: int) -> np.floating:
    """A logit that about 2m of z's tokens reach, read off every 16th one (exact where z is short)."""
    sample = z[::_STRIDE] if z.shape[0] >= 64 * _STRIDE else z
    scale = z.shape[0] / sample.shape[0]
    r = min(sample.shape[0], int(2 * m / scale) + 1)
    return np.partition(sample, sample.shape[0] - r)[sample.shape[0] - r]


_CDF_BLOCK = 1024


def _inverse_cdf(p: np.ndarray, u: float) -> int:
    """The first token whose cumulative probability exceeds ``u * total`` (it always has p > 0; the rounding
    case ``u * total == total`` takes the last token with p > 0). Over more than 1024 tokens: sums blocks
    of 1024 (SIMD, in p's dtype), accumulates the block sums in float64, then one block, instead of a
    float64 cumulative sum over the whole vocabulary."""
    V = p.shape[0]
    start = 0
    if V <= _CDF_BLOCK:
        cdf = np.cumsum(p, dtype=np.float64)
        target = u * cdf[-1]
    else:
        n = V // _CDF_BLOCK
        sums = np.einsum("ij->i", p[:n * _CDF_BLOCK].reshape(n, _CDF_BLOCK))  # float32: ~1e-6 relative
        if V % _CDF_BLOCK:
            sums = np.append(sums, p[n * _CDF_BLOCK:].sum())
        block_cdf = np.cumsum(sums, dtype=np.float64)
        target = u * block_cdf[-1]
        b = min(int(np.searchsorted(block_cdf, target, side="right")), block_cdf.size - 1)
        start = b * _CDF_BLOCK
        cdf = np.cumsum(p[start:start + _CDF_BLOCK], dtype=np.float64) + (block_cdf[b - 1] if b else 0.0)
    pick = min(start + int(np.searchsorted(cdf, target, side="right")), V - 1)
    return pick if p[pick] > 0 else int(np.flatnonzero(p[:pick])[-1])


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


def _top(raw: np.ndarray, lse: float, k: int) -> list[tuple[int, float]]:
    """The k largest of raw [V] as (id, logprob), best first, ties to the lowest id; O(V) for small k."""
    if k <= 0:
        return []
    k = min(k, raw.shape[0])
    threshold = np.partition(raw, raw.shape[0] - k)[raw.shape[0] - k]
    cand = np.flatnonzero(raw >= threshold)  # ascending ids, ties at the threshold included
    cand = cand[np.argsort(-raw[cand], kind="stable")[:k]]
    return [(int(t), float(raw[t] - lse)) for t in cand]

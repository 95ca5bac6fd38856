"""The sampler against straightforward numpy references: each knob alone, their combined distribution,
per-sequence seeding, raw logprobs and parameter validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrum_runtime.errors import FerrumError
from ferrum_runtime.sampler import (SamplingError, SamplingParams, SequenceSampler, prompt_logprobs, sample)

from .conftest import log_softmax

pytestmark = pytest.mark.unit

DRAWS = settings(max_examples=25, deadline=None)


def _logits(seed: int, shape: tuple[int, ...], scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _draws(row: np.ndarray, params: SamplingParams, n: int = 400) -> np.ndarray:
    """n independent draws for one logits row [V]: a batch of n sequences seeded 0..n-1."""
    seqs = [SequenceSampler(dataclasses.replace(params, seed=i), [], row.shape[0]) for i in range(n)]
    return np.array([r.token_id for r in sample(np.tile(row, (n, 1)), seqs)])


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


# -- greedy -------------------------------------------------------------------------------------------------------

@DRAWS
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 6), v=st.integers(2, 300))
def test_greedy_is_argmax(seed, b, v):
    logits = _logits(seed, (b, v))
    seqs = [SequenceSampler(SamplingParams(temperature=0.0), [], v) for _ in range(b)]
    assert [r.token_id for r in sample(logits, seqs)] == list(logits.argmax(1))


def test_greedy_ties_go_to_lowest_id():
    row = np.array([[0.0, 3.0, 1.0, 3.0, 3.0]], dtype=np.float32)
    assert sample(row, [SequenceSampler(SamplingParams(temperature=0.0), [], 5)])[0].token_id == 1


# -- each filter alone: draws never leave the set the reference keeps -----------------------------------------------

@DRAWS
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 12), temperature=st.floats(0.3, 3.0))
def test_top_k_only_returns_the_k_largest(seed, k, temperature):
    row = _logits(seed, (40,))
    allowed = set(np.argsort(-row)[:k].tolist())
    drawn = set(_draws(row, SamplingParams(temperature=temperature, top_k=k)).tolist())
    assert drawn <= allowed
    if k == 1:
        assert drawn == allowed


def _nucleus(row: np.ndarray, top_p: float) -> set[int]:
    """Smallest set of most likely tokens whose probability reaches top_p."""
    p = _softmax(row)
    order = np.argsort(-p)
    m = int(np.searchsorted(np.cumsum(p[order]), top_p - 1e-12)) + 1
    return set(order[:m].tolist())


@DRAWS
@given(seed=st.integers(0, 2**32 - 1), top_p=st.floats(0.05, 1.0))
def test_top_p_never_leaves_the_nucleus(seed, top_p):
    row = _logits(seed, (30,))
    nucleus = _nucleus(row, top_p)
    drawn = set(_draws(row, SamplingParams(top_p=top_p)).tolist())
    assert drawn <= nucleus
    if len(nucleus) == 1:
        assert drawn == nucleus


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    # p = [0.5, 0.3, 0.2]: top_p=0.6 needs the first two (0.5 < 0.6 <= 0.8); top_p=0.5 needs only the first
    row = np.log(np.array([0.5, 0.3, 0.2])).astype(np.float32)
    assert set(_draws(row, SamplingParams(top_p=0.6)).tolist()) == {0, 1}
    assert set(_draws(row, SamplingParams(top_p=0.45)).tolist()) == {0}


@DRAWS
@given(seed=st.integers(0, 2**32 - 1), min_p=st.floats(0.0, 1.0))
def test_min_p_drops_unlikely_tokens(seed, min_p):
    row = _logits(seed, (30,))
    p = _softmax(row)
    allowed = set(np.flatnonzero(p >= min_p * p.max() * (1 - 1e-9)).tolist())
    drawn = set(_draws(row, SamplingParams(min_p=min_p)).tolist())
    assert drawn <= allowed
    assert int(p.argmax()) in allowed


# -- distributions ---------------------------------------------------------------------------------------------

def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token the reference gives probability 0"
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum())


# chi-square critical values at p = 1e-4 for df = 1..7 (the draws are seeded, so the test is deterministic)
_CHI2_CRIT = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9, 7: 29.9}


def test_temperature_one_matches_softmax():
    row = np.array([1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 1.2, 0.7], dtype=np.float32)
    counts = np.bincount(_draws(row, SamplingParams(temperature=1.0), n=20000), minlength=8)
    assert _chi2(counts, _softmax(row)) < _CHI2_CRIT[7]


def test_one_sequence_sequential_draws_match_softmax():
    row = np.array([[0.3, -0.2, 1.1, 0.0, 0.8]], dtype=np.float32)
    s = SequenceSampler(SamplingParams(seed=123), [], 5)
    counts = np.bincount([sample(row, [s])[0].token_id for _ in range(6000)], minlength=5)
    assert _chi2(counts, _softmax(row[0])) < _CHI2_CRIT[4]


def _reference_probs(row: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Written out one step at a time, on a sorted copy."""
    z = row.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    p = np.exp(z[order] - z.max())
    if top_k > 0:
        p[top_k:] = 0.0
    p /= p.sum()
    acc, keep = 0.0, 0
    while acc < top_p and keep < len(p):
        acc += p[keep]
        keep += 1
    p[keep:] = 0.0
    p /= p.sum()
    p[p < min_p * p.max()] = 0.0
    p /= p.sum()
    out = np.zeros_like(p)
    out[order] = p
    return out


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 5, 0.9, 0.05), (1.5, 0, 0.8, 0.0),
                                                           (1.0, 3, 1.0, 0.0), (1.3, 6, 0.95, 0.2)])
def test_combined_filters_match_reference_distribution(temperature, top_k, top_p, min_p):
    row = np.array([1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 1.2, 0.7], dtype=np.float32)
    ref = _reference_probs(row, temperature, top_k, top_p, min_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    counts = np.bincount(_draws(row, params, n=20000), minlength=8)
    assert _chi2(counts, ref) < _CHI2_CRIT[int((ref > 0).sum()) - 1]


@pytest.mark.parametrize("shape,temperature,top_k,top_p", [
    ("peaked", 0.7, 0, 0.9), ("flat", 1.0, 0, 0.99), ("flat", 1.0, 3000, 0.999), ("ties", 1.0, 0, 0.5),
    ("peaked", 0.8, 40, 0.95), ("flat", 0.5, 0, 1.0), ("strided", 1.0, 4000, 0.999)])
def test_filters_over_a_real_vocabulary_keep_the_full_sorts_tokens(shape, temperature, top_k, top_p):
    """At a real vocabulary (49152) top-k/top-p sort only the likeliest candidates, growing them while the
    nucleus runs past (flat logits at top_p 0.99 need most of the vocabulary); ties at the candidates' edge
    go to the lowest id as in a full stable sort. The candidates' threshold is estimated from every 16th
    logit: "strided" puts 3072 tied top logits exactly there, so the estimate for the top 4000 falls short
    and the candidates must grow. Same kept tokens and probabilities as the reference."""
    from ferrum_runtime.sampler import _kept

    rng = np.random.default_rng(7)
    row = rng.standard_normal(49152).astype(np.float32)
    if shape == "peaked":
        row[rng.choice(49152, 30, replace=False)] += 9
    if shape == "ties":  # 3000 tokens share the top logit: the nucleus is the 1500 lowest ids among them
        row[rng.choice(49152, 3000, replace=False)] = 5.0
    if shape == "strided":
        row[::16] = 5.0
    ref = _reference_probs(row, temperature, top_k, top_p, 0.0)
    z = row.astype(np.float64)[None] / temperature
    ids, p = _kept(z[0], top_k or 49152, top_p, 0.0)
    got = p if ids is None else np.zeros(49152)
    if ids is not None:
        got[ids] = p
    assert np.array_equal(got > 0, ref > 0)
    np.testing.assert_allclose(got / got.sum(), ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("vocab", [5, 1024, 1500, 49152])
def test_inverse_cdf_by_blocks_picks_what_a_full_cumulative_sum_picks(vocab):
    """The draw sums blocks of 1024 then accumulates one block; it lands on the token a float64 cumulative
    sum over the whole row gives (sparse rows, u at both ends), and never on a zero-probability token."""
    from ferrum_runtime.sampler import _inverse_cdf

    rng = np.random.default_rng(vocab)
    for _ in range(100):
        p = rng.random(vocab) * (rng.random(vocab) < 0.3)
        p[rng.integers(vocab)] += 1.0
        for u in (0.0, float(rng.random()), 0.5, 1.0 - 2**-53):
            c = np.cumsum(p)
            ref = min(int(np.searchsorted(c, u * c[-1], side="right")), vocab - 1)
            ref = ref if p[ref] > 0 else int(np.flatnonzero(p[:ref])[-1])
            got = _inverse_cdf(p, u)
            assert p[got] > 0
            assert got == ref or abs(c[min(got, ref)] - u * c[-1]) < 1e-9  # a boundary within rounding


# -- penalties and bias ----------------------------------------------------------------------------------------

def test_penalties_match_hand_computed_logits():
    row = np.array([2.0, -1.0, 0.5, 3.0, 1.0, -2.0], dtype=np.float32)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias=((5, 4.0), (4, -1.0)))
    s = SequenceSampler(params, prompt_token_ids=[0, 1, 1], vocab_size=6)
    for t in [3, 3, 2]:
        s.append(t)
    expected = [
        2.0 / 2,  # prompt token, positive: divided
        -1.0 * 2,  # prompt token, negative: multiplied
        0.5 / 2 - 0.5 - 0.25 * 1,  # output once
        3.0 / 2 - 0.5 - 0.25 * 2,  # output twice
        1.0 - 1.0,  # bias only
        -2.0 + 4.0,  # bias only
    ]
    np.testing.assert_allclose(s.adjust(row), expected, rtol=0, atol=1e-12)
    assert s.output_ids == [3, 3, 2]
    # greedy sees the adjusted logits: token 3 (raw argmax) falls behind token 5
    greedy = SequenceSampler(dataclasses.replace(params, temperature=0.0), [0, 1, 1], 6)
    for t in [3, 3, 2]:
        greedy.append(t)
    assert sample(row[None], [greedy])[0].token_id == 5


def test_repetition_penalty_below_one_rewards_seen_tokens():
    row = np.array([1.0, -1.0, 0.5], dtype=np.float32)
    s = SequenceSampler(SamplingParams(repetition_penalty=0.5), [1], 3)
    s.append(2)
    np.testing.assert_allclose(s.adjust(row), [1.0, -0.5, 1.0])


@DRAWS
@given(seed=st.integers(0, 2**32 - 1), token=st.integers(0, 49))
def test_logit_bias_forces_and_bans(seed, token):
    row = _logits(seed, (50,), scale=3.0)
    forced = _draws(row, SamplingParams(logit_bias=((token, 100.0),)), n=50)
    assert set(forced.tolist()) == {token}
    best = int(row.argmax())
    banned = SamplingParams(temperature=0.0, logit_bias=((best, -100.0),))
    second = int(np.argsort(-row, kind="stable")[1])
    assert sample(row[None], [SequenceSampler(banned, [], 50)])[0].token_id == second


def test_no_penalty_leaves_logits_untouched():
    row = _logits(0, (20,))
    s = SequenceSampler(SamplingParams(), [1, 2, 3], 20)
    s.append(4)
    np.testing.assert_array_equal(s.adjust(row), row.astype(np.float64))


# -- seeding ---------------------------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), others=st.integers(0, 6), data=st.data())
def test_same_seed_same_tokens_whatever_the_batch(seed, others, data):
    V, steps = 64, 12
    params = SamplingParams(seed=seed, temperature=0.9, top_p=0.95, repetition_penalty=1.3)
    steps_logits = _logits(seed % 1000, (steps, V))

    def run(batch_others: int, shuffle: bool) -> list[int]:
        me = SequenceSampler(params, [1, 2], V)
        rest = [SequenceSampler(SamplingParams(temperature=1.0 + 0.1 * j, seed=None if j % 2 else j), [3], V)
                for j in range(batch_others)]
        out = []
        for t in range(steps):
            seqs = [me, *rest]
            order = data.draw(st.permutations(range(len(seqs)))) if shuffle else list(range(len(seqs)))
            batch = [seqs[i] for i in order]
            logits = np.stack([steps_logits[t] if s is me else _logits(t + 7 * j, (V,)) for j, s in enumerate(batch)])
            results = sample(logits, batch)
            for s, r in zip(batch, results):
                s.append(r.token_id)
            out.append(results[batch.index(me)].token_id)
        return out

    alone = run(0, shuffle=False)
    assert run(others, shuffle=True) == alone


def test_n_samples_differ_but_each_reproduces():
    row = _logits(3, (1, 1000), scale=0.1)  # nearly flat: 20 draws from two streams are never all equal
    params = SamplingParams(seed=42)

    def stream(index: int) -> list[int]:
        s = SequenceSampler(params, [], 1000, sample_index=index)
        return [sample(row, [s])[0].token_id for _ in range(20)]

    assert stream(0) == stream(0)
    assert stream(1) == stream(1)
    assert stream(0) != stream(1)


# -- logprobs --------------------------------------------------------------------------------------------------

@DRAWS
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(0, 20), temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
def test_logprobs_are_raw_log_softmax(seed, k, temperature):
    logits = _logits(seed, (3, 100))
    params = SamplingParams(temperature=temperature, logprobs=k, repetition_penalty=1.5, logit_bias=((7, 5.0),))
    seqs = [SequenceSampler(params, [7, 8], 100) for _ in range(3)]
    ref = log_softmax(logits)
    for i, r in enumerate(sample(logits, seqs)):
        assert r.logprob == pytest.approx(ref[i, r.token_id], abs=1e-6)
        top = np.argsort(-ref[i], kind="stable")[:k]
        assert [t for t, _ in r.top_logprobs] == top.tolist()
        np.testing.assert_allclose([lp for _, lp in r.top_logprobs], ref[i, top], atol=1e-6)


def test_top_logprobs_off_and_ties():
    row = np.array([[1.0, 2.0, 2.0, 0.0, 2.0]], dtype=np.float32)
    off = sample(row, [SequenceSampler(SamplingParams(temperature=0.0), [], 5)])[0]
    assert off.top_logprobs == [] and off.token_id == 1
    two = sample(row, [SequenceSampler(SamplingParams(temperature=0.0, logprobs=2), [], 5)])[0]
    assert [t for t, _ in two.top_logprobs] == [1, 2]


def test_prompt_logprobs_match_log_softmax():
    logits = _logits(5, (6, 40))
    ids = [3, 17, 0, 39, 22, 5]
    out = prompt_logprobs(logits, ids, k=3)
    ref = log_softmax(logits)
    assert out[0] is None and len(out) == len(ids)
    for i in range(1, len(ids)):
        entry = out[i]
        assert entry is not None and entry.token_id == ids[i]
        assert entry.logprob == pytest.approx(ref[i - 1, ids[i]], abs=1e-6)
        assert [t for t, _ in entry.top_logprobs] == np.argsort(-ref[i - 1])[:3].tolist()
    # the row after the last prompt token is optional; k=0 reports no alternatives
    short = prompt_logprobs(logits[:5], ids, k=0)
    assert [(e.token_id, e.logprob, e.top_logprobs) for e in short[1:] if e] == [
        (e.token_id, e.logprob, []) for e in out[1:] if e]
    assert prompt_logprobs(logits[:0], [9], k=2) == [None]


# -- validation ------------------------------------------------------------------------------------------------

BAD = [
    ("max_tokens", -1), ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -2), ("top_p", 0.0),
    ("top_p", 1.01), ("min_p", -0.01), ("min_p", 1.5), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", 3.0), ("frequency_penalty", -3.0),
    ("logit_bias", ((100, 1.0),)), ("logit_bias", ((-1, 1.0),)), ("logit_bias", ((3, 101.0),)),
    ("logit_bias", ((3, -100.5),)), ("stop", ("",)), ("stop", ("ok", "")), ("stop_token_ids", (100,)),
    ("logprobs", -1), ("logprobs", 21), ("prompt_logprobs", 21), ("prompt_logprobs", -1), ("n", 0),
]


@pytest.mark.parametrize("field,value", BAD)
def test_validate_names_the_bad_field(field, value):
    params = dataclasses.replace(SamplingParams(), **{field: value})
    with pytest.raises(SamplingError) as err:
        params.validate(vocab_size=100)
    assert err.value.param == field
    assert isinstance(err.value, FerrumError)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)
    with pytest.raises(SamplingError):
        SequenceSampler(params, [], 100)


GOOD = [("max_tokens", 0), ("temperature", 0.0), ("top_k", -1), ("top_k", 0), ("top_k", 1000), ("top_p", 1.0),
        ("min_p", 1.0), ("presence_penalty", -2.0), ("frequency_penalty", 2.0), ("logit_bias", ((99, -100.0),)),
        ("logprobs", 0), ("logprobs", 20), ("prompt_logprobs", 0), ("seed", -5), ("stop", ("\n",))]


@pytest.mark.parametrize("field,value", GOOD)
def test_validate_accepts_boundaries(field, value):
    dataclasses.replace(SamplingParams(), **{field: value}).validate(vocab_size=100)


@pytest.mark.unit
def test_greedy_fast_path_picks_the_same_tokens_as_the_general_path():
    """Plain greedy rows take a float32 argmax; a no-op logit_bias forces the float64 general path."""
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((64, 300)).astype(np.float32)
    logits[3, [7, 9]] = logits[3].max() + 1  # an exact tie: both paths pick the lowest id
    fast = [SequenceSampler(SamplingParams(temperature=0), [], 300) for _ in range(64)]
    general = [SequenceSampler(SamplingParams(temperature=0, logit_bias=((0, 0.0),)), [], 300) for _ in range(64)]
    assert all(s.plain_greedy for s in fast) and not any(s.plain_greedy for s in general)
    a, b = sample(logits, fast), sample(logits, general)
    assert [r.token_id for r in a] == [r.token_id for r in b] and a[3].token_id == 7
    mixed = sample(logits[:2], [fast[0], SequenceSampler(SamplingParams(temperature=0, logprobs=2), [], 300)])
    assert np.isnan(mixed[0].logprob) and mixed[1].logprob <= 0 and len(mixed[1].top_logprobs) == 2

"""Scheduler and block manager with a fake runner.

The fake model keeps a fake paged KV cache that stores token ids: each step writes the scheduled
tokens into the slots their block tables give, and "predicts" the next token from what it reads back
through the block table. Outputs are therefore right only if block tables, prefix reuse, preemption
and chunking are right; the reference is the same function applied to the plain token history.
Draft tokens (speculative decoding) are written and predicted from like any other: a rejected draft
the scheduler counted as computed would be read back by a later step and change its output.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ferrum_runtime.kv_cache import BlockManager
from ferrum_runtime.scheduler import Scheduler, SchedulerConfig, Sequence, SeqStatus

pytestmark = pytest.mark.unit

VOCAB = 50


def next_token(history: list[int]) -> int:
    h = 17
    for t in history:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


class FakeRunner:
    def __init__(self, blocks: BlockManager):
        self.bs = blocks.block_size
        self.cache = np.full((blocks.num_blocks, self.bs), -1, dtype=np.int64)
        self.tokens_computed = 0

    def step(self, sched: Scheduler, max_tokens: dict[str, int]) -> list[Sequence]:
        chunks = sched.schedule()
        assert sum(c.length for c in chunks) <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        sampled = []
        for c in chunks:
            seq = c.seq
            assert len(seq.blocks) * self.bs >= c.start + c.length
            real = c.start + c.length - len(c.drafts)  # drafts ride only with a decode: one real token
            assert not c.drafts or (real - c.start == 1 and real == seq.num_tokens)
            for p, t in zip(range(c.start, c.start + c.length), seq.tokens_between(c.start, real) + list(c.drafts)):
                self.cache[seq.blocks[p // self.bs], p % self.bs] = t
            self.tokens_computed += c.length
            if c.samples:  # a row for the last token, then one per draft
                seen = [int(self.cache[seq.blocks[p // self.bs], p % self.bs]) for p in range(c.start + c.length)]
                sampled.append((c, [next_token(seen[:p + 1]) for p in range(real - 1, c.start + c.length)]))
        finished = []
        for c, tokens in sampled:  # as the engine: row j + 1 counts while row j's token is draft j
            seq = c.seq
            for j, tok in enumerate(tokens):
                seq.output_ids.append(tok)
                if len(seq.output_ids) >= max_tokens[seq.seq_id]:
                    finished.append(seq)
                    break
                if j == len(c.drafts) or tok != c.drafts[j]:
                    break
        sched.commit(chunks)  # after the tokens are appended, as the engine does
        for seq in finished:
            sched.finish(seq)
        return finished


def reference(prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(prompt + out))
    return out


def run_all(prompts, max_tokens, num_blocks, block_size=4, cfg=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
            caching=True):
    blocks = BlockManager(num_blocks, block_size, caching)
    sched = Scheduler(cfg, blocks)
    runner = FakeRunner(blocks)
    seqs = [Sequence(f"r{i}", list(p)) for i, p in enumerate(prompts)]
    limits = {s.seq_id: m for s, m in zip(seqs, max_tokens)}
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work:
        runner.step(sched, limits)
        blocks.check_invariants()
        steps += 1
        assert steps < 10_000
    assert blocks.num_free == num_blocks
    return seqs, sched, runner


def test_outputs_match_reference_under_pressure():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, VOCAB, n)) for n in (3, 17, 9, 30, 1, 12)]
    seqs, sched, _ = run_all(prompts, [10, 5, 12, 7, 20, 9], num_blocks=14)
    for s, p, m in zip(seqs, prompts, [10, 5, 12, 7, 20, 9]):
        assert s.output_ids == reference(p, m)
    assert sched.num_preemptions > 0  # the cache was really too small


def test_prefix_reuse_saves_tokens_and_keeps_outputs():
    shared = list(range(20))
    prompts = [shared + [40 + i] for i in range(4)]
    cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64)  # one at a time: later ones hit the cache
    with_cache, _, r1 = run_all(prompts, [3] * 4, num_blocks=40, cfg=cfg, caching=True)
    without, _, r2 = run_all(prompts, [3] * 4, num_blocks=40, cfg=cfg, caching=False)
    assert [s.output_ids for s in with_cache] == [s.output_ids for s in without]
    assert r1.tokens_computed == r2.tokens_computed - 3 * 20  # 5 full blocks of 4 reused by 3 requests


def test_fcfs_no_starvation():
    """A long request at the head is not overtaken by short ones arriving later."""
    blocks = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8), blocks)
    big = Sequence("big", list(range(28)))
    sched.add(Sequence("small0", [1, 2]))
    sched.add(big)
    for i in range(1, 5):
        sched.add(Sequence(f"small{i}", [1, 2]))
    chunks = sched.schedule()
    assert [c.seq.seq_id for c in chunks] == ["small0", "big"]  # budget 8: 2 + 6 of big's 28
    assert [s.seq_id for s in sched.waiting][:1] == ["small1"]


def test_cancel_frees_blocks_at_once():
    blocks = BlockManager(10, 4)
    sched = Scheduler(SchedulerConfig(), blocks)
    seqs = [Sequence(f"r{i}", list(range(10))) for i in range(2)]
    for s in seqs:
        sched.add(s)
    sched.commit(sched.schedule())
    assert blocks.num_free < 10
    for s in seqs:
        sched.finish(s)
        assert s.status is SeqStatus.FINISHED
    assert blocks.num_free == 10
    blocks.check_invariants()


def test_drafts_that_match_save_steps_and_keep_outputs():
    """Right drafts: the same outputs in fewer steps; the tokens a step computes include its drafts."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    limits = {"r0": 13, "r1": 9}

    def run(k):
        blocks = BlockManager(16, 4)
        sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), blocks)
        runner = FakeRunner(blocks)
        seqs = [Sequence(f"r{i}", list(p)) for i, p in enumerate(prompts)]
        for s in seqs:
            sched.add(s)
        steps = 0
        while sched.has_work:
            for s in sched.running:
                if s.output_ids and s.num_computed == s.num_tokens - 1:
                    room = limits[s.seq_id] - len(s.output_ids) - 1
                    s.draft_ids = reference(s.prompt_ids, limits[s.seq_id])[len(s.output_ids):][:min(k, room)]
            runner.step(sched, limits)
            blocks.check_invariants()
            steps += 1
        assert blocks.num_free == 16
        return [s.output_ids for s in seqs], steps

    plain, plain_steps = run(0)
    assert plain == [reference(p, limits[f"r{i}"]) for i, p in enumerate(prompts)]
    drafted, steps = run(3)
    assert drafted == plain
    assert steps == 1 + -(-(13 - 1) // 4)  # the prefill, then 4 tokens a step (3 drafts + 1)
    assert plain_steps == 13


def test_drafts_never_cost_a_preemption():
    """Drafts take the budget admissions leave and blocks nobody else needs; a full cache drops them."""
    blocks = BlockManager(2, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8), blocks)
    a, b = Sequence("a", [1, 2, 3]), Sequence("b", [4, 5, 6])
    sched.add(a)
    sched.add(b)
    sched.schedule()
    a.output_ids.append(7)
    b.output_ids.append(8)
    sched.commit([])
    a.num_computed = b.num_computed = 3  # both decode position 3, the last of their one block
    a.draft_ids = [9, 9, 9]
    chunks = sched.schedule()
    assert [(c.seq.seq_id, c.length, c.drafts) for c in chunks] == [("a", 1, ()), ("b", 1, ())]
    assert sched.num_preemptions == 0 and blocks.num_free == 0
    blocks2 = BlockManager(4, 4)
    sched2 = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=3), blocks2)
    c = Sequence("c", [1, 2, 3])
    sched2.add(c)
    sched2.commit(sched2.schedule())  # its prompt
    c.output_ids.append(5)  # decode next
    c.draft_ids = [6, 7, 8, 9]
    late = Sequence("late", [1])
    sched2.add(late)
    chunks = sched2.schedule()  # budget 3: c's token, late's prompt, then one draft
    assert [(x.seq.seq_id, x.length, x.drafts) for x in chunks] == [("c", 2, (6,)), ("late", 1, ())]


@given(st.integers(0, 6), st.integers(0, 6), st.data())
def test_tokens_between_is_the_slice_of_tokens(n_prompt, n_out, data):
    seq = Sequence("r", list(range(100, 100 + n_prompt)), output_ids=list(range(200, 200 + n_out)))
    start = data.draw(st.integers(0, n_prompt + n_out))
    end = data.draw(st.integers(start, n_prompt + n_out))
    assert seq.tokens_between(start, end) == seq.tokens[start:end]


class SchedulerMachine(RuleBasedStateMachine):
    """Random admit / step / cancel sequences keep the block accounting exact and outputs right."""

    @initialize(num_blocks=st.integers(6, 24), block_size=st.sampled_from([1, 2, 4, 8]),
                max_seqs=st.integers(1, 6), budget=st.integers(1, 24), caching=st.booleans())
    def setup(self, num_blocks, block_size, max_seqs, budget, caching):
        self.blocks = BlockManager(num_blocks, block_size, caching)
        self.sched = Scheduler(SchedulerConfig(max_seqs, budget), self.blocks)
        self.runner = FakeRunner(self.blocks)
        self.limits: dict[str, int] = {}
        self.live: list[Sequence] = []
        self.done: list[Sequence] = []
        self.capacity = num_blocks * block_size

    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=20), max_tokens=st.integers(1, 8))
    def add(self, prompt, max_tokens):
        if len(prompt) + max_tokens > self.capacity:
            return  # the engine rejects requests that cannot fit the cache alone
        seq = Sequence(f"r{len(self.limits)}", prompt)
        self.limits[seq.seq_id] = max_tokens
        self.live.append(seq)
        self.sched.add(seq)

    @precondition(lambda self: self.sched.has_work)
    @rule()
    def step(self):
        for seq in self.runner.step(self.sched, self.limits):
            self.live.remove(seq)
            self.done.append(seq)

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def propose(self, data):
        """Drafts for the decoding sequences: their true continuation, some tokens changed."""
        for seq in self.sched.running:
            if seq.num_computed != seq.num_tokens - 1 or not seq.output_ids:
                continue
            room = self.limits[seq.seq_id] - len(seq.output_ids) - 1
            truth = reference(seq.prompt_ids, self.limits[seq.seq_id])[len(seq.output_ids):][:max(room, 0)]
            wrong = data.draw(st.lists(st.booleans(), min_size=len(truth), max_size=len(truth)))
            seq.draft_ids = [(t + 1) % VOCAB if w else t for t, w in zip(truth, wrong)]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cancel(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.sched.finish(seq)
        self.live.remove(seq)

    @invariant()
    def accounting(self):
        if not hasattr(self, "blocks"):
            return
        self.blocks.check_invariants()
        held = {}
        for s in self.sched.running:
            for b in s.blocks:
                held[b] = held.get(b, 0) + 1
        assert all(self.blocks.refcount[b] == held.get(b, 0) for b in range(self.blocks.num_blocks))
        assert all(not s.blocks for s in self.sched.waiting)

    @invariant()
    def outputs_right(self):
        for s in getattr(self, "done", []):
            assert s.output_ids == reference(s.prompt_ids, self.limits[s.seq_id])

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        for _ in range(5000):
            if not self.sched.has_work:
                break
            self.runner.step(self.sched, self.limits)
        assert not self.sched.has_work
        assert self.blocks.num_free == self.blocks.num_blocks


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)

"""Continuous-batching scheduler, pure Python over queue and block state (no TVM, no model).

Every step gets a token budget. Running sequences are served first, oldest first: a decode costs one
token, an unfinished prefill continues in chunks, so prefill chunks and decodes share one forward call.
Then waiting sequences are admitted in arrival order (FCFS: a request that does not fit blocks those
behind it, so nobody starves), reusing cached prefix blocks, while the budget, the running-sequence
limit and the free blocks allow. When a running sequence needs a block and none is free, the newest
running sequence is preempted: its blocks are freed and it goes back to the queue to be recomputed
later (its tokens so far become its prompt), which yields the same output.

A decoding sequence may carry draft tokens (speculative decoding, ``speculative.py``): they ride along
with its next token when the budget and the free blocks allow (never at the price of a preemption),
and after the step only the drafts that became output count as computed.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager, chain_hash


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrivals = itertools.count()


@dataclass(eq=False)
class Sequence:
    seq_id: str
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    needs_all_rows: bool = False  # prompt logprobs: every prompt row must be computed (no prefix reuse)
    after: "Sequence | None" = None  # a sibling (n > 1) whose prompt blocks this one waits to share
    status: SeqStatus = SeqStatus.WAITING
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the full blocks, in order
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_preemptions: int = 0
    arrival: int = -1  # set when the scheduler first sees it; FCFS order
    draft_ids: list[int] = field(default_factory=list)  # proposed for the next step (speculative decoding)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens_between(self, start: int, end: int) -> list[int]:
        """``tokens[start:end]`` without building ``tokens`` (a step needs a token or a chunk of them)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step
    length: int  # tokens computed in this step, drafts included
    drafts: tuple[int, ...] = ()  # draft tokens after the sequence's last one: its last len(drafts) positions

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so its logits give the next token (and
        each draft's row the token after it)."""
        return self.start + self.length - len(self.drafts) == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per forward call (prefill chunks + decodes)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()  # ordered by arrival
        self.running: list[Sequence] = []  # ordered by arrival
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(_arrivals)
        self._enqueue(seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or no budget left this step
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._reserve(seq, seq.num_computed + n):
                victim = self.running[-1]  # the newest; not scheduled yet in this step (or seq itself)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                chunks.append(ScheduledChunk(seq, seq.num_computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.after is not None and seq.after.status is not SeqStatus.FINISHED \
                    and seq.after.num_computed < len(seq.after.prompt_ids):
                break  # its sibling's prompt blocks are not computed yet; share them next step
            if not seq.blocks and not seq.needs_all_rows:
                # reuse cached full blocks, but always compute at least the last token (for its logits)
                seq.blocks, seq.block_hashes = self.blocks.match_prefix(seq.tokens, (seq.num_tokens - 1) // self.blocks.block_size)
                seq.num_computed = len(seq.blocks) * self.blocks.block_size
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                self._drop_blocks(seq)
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        # drafts last: with the budget admissions left, and blocks nobody else needed this step
        for i, c in enumerate(chunks):
            drafts = self._drafts(c, budget)
            if drafts:
                chunks[i] = ScheduledChunk(c.seq, c.start, c.length + len(drafts), drafts)
                budget -= len(drafts)
        return chunks

    def commit(self, chunks: list[ScheduledChunk]) -> None:
        """After the forward call, once its tokens are appended: the chunks' K/V are in the cache, a
        draft's only if it and the drafts before it became output; full blocks become reusable."""
        bs = self.blocks.block_size
        for c in chunks:
            seq = c.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            real = c.start + c.length - len(c.drafts)  # the first draft's position
            kept = 0
            while kept < len(c.drafts) and real + kept < seq.num_tokens and \
                    seq.tokens_between(real + kept, real + kept + 1)[0] == c.drafts[kept]:
                kept += 1
            seq.num_computed = real + kept
            while (len(seq.block_hashes) + 1) * bs <= seq.num_computed:
                j = len(seq.block_hashes)
                h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None,
                               seq.tokens_between(j * bs, (j + 1) * bs))
                self.blocks.register(seq.blocks[j], h)
                seq.block_hashes.append(h)

    def finish(self, seq: Sequence) -> None:
        """Done or cancelled: its blocks are freed at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_blocks(seq)
        seq.status = SeqStatus.FINISHED

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._drop_blocks(seq)
        seq.draft_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        arrivals = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(arrivals, seq.arrival), seq)

    def _drop_blocks(self, seq: Sequence) -> None:
        self.blocks.release_all(seq.blocks)
        seq.blocks, seq.block_hashes, seq.num_computed = [], [], 0

    def _drafts(self, c: ScheduledChunk, budget: int) -> tuple[int, ...]:
        """The drafts that may ride with chunk ``c`` if it is a decode (its sequence's last token): as many
        as ``budget`` and the free blocks allow."""
        seq = c.seq
        if not seq.draft_ids or seq.status is not SeqStatus.RUNNING or c.length != 1 or not c.samples:
            return ()
        room = (len(seq.blocks) + self.blocks.num_free) * self.blocks.block_size - seq.num_tokens
        d = max(min(len(seq.draft_ids), budget, room), 0)
        reserved = self._reserve(seq, seq.num_tokens + d)
        assert reserved, (room, d)
        return tuple(seq.draft_ids[:d])

    def _reserve(self, seq: Sequence, upto: int) -> bool:
        """Give ``seq`` blocks for positions ``< upto``; False (and nothing taken) if too few are free."""
        need = -(-upto // self.blocks.block_size) - len(seq.blocks)
        if need > self.blocks.num_free:
            return False
        seq.blocks.extend(self.blocks.allocate() for _ in range(max(need, 0)))
        return True

"""A hand-driven ragged batch for tests: sequences own shuffled KV blocks; each step feeds some
tokens of each sequence and asks for the logits of its last one."""

from __future__ import annotations

import numpy as np

from ferrum_runtime.model import CompiledModel, RaggedBatch


class RaggedDriver:
    def __init__(self, model: CompiledModel, num_seqs: int, max_len: int, rng: np.random.Generator):
        self.model = model
        per_seq = -(-max_len // model.block_size)
        assert per_seq * num_seqs <= model.num_blocks, "test needs more KV blocks"
        blocks = rng.permutation(model.num_blocks)[: per_seq * num_seqs].astype(np.int32)
        self.tables = blocks.reshape(num_seqs, per_seq)
        self.lens = [0] * num_seqs  # tokens already in the cache

    def step(self, chunks: list[list[int]], all_rows: bool = False) -> np.ndarray:
        """Feed ``chunks[i]`` to sequence i (empty = not in this step); returns logits of each fed
        sequence's last token, or of every fed token with ``all_rows``."""
        ids, pos, slots, starts, rows = [], [], [], [0], []
        seqs = [i for i, c in enumerate(chunks) if c]
        bs = self.model.block_size
        for i in seqs:
            for j, tok in enumerate(chunks[i]):
                p = self.lens[i] + j
                ids.append(tok)
                pos.append(p)
                slots.append(int(self.tables[i, p // bs]) * bs + p % bs)
            starts.append(len(ids))
            rows.extend(range(starts[-2], starts[-1]) if all_rows else [starts[-1] - 1])
            self.lens[i] += len(chunks[i])
        batch = RaggedBatch(np.array(ids, np.int32), np.array(pos, np.int32), np.array(starts, np.int32),
                            self.tables[seqs], np.array(slots, np.int32), np.array(rows, np.int32))
        return self.model.forward(batch)


def chunked_prefill_then_decode(model: CompiledModel, prompts: list[list[int]], max_len: int, rng: np.random.Generator,
                                steps: int, chunk: int, first: int | None = None) -> list[tuple[list[int], np.ndarray]]:
    """Every sequence is fed its prompt ``chunk`` tokens per step (``first`` in step one), then its own
    greedy token, all in one ragged batch per step; returns ``[(tokens so far, logits of the last one)]``
    for every sequence and step."""
    drv = RaggedDriver(model, len(prompts), max_len, rng)
    seqs: list[list[int]] = [[] for _ in prompts]
    fed = [0] * len(prompts)
    checks: list[tuple[list[int], np.ndarray]] = []
    for step in range(steps):
        size = first if step == 0 and first is not None else chunk
        chunks = []
        for i, p in enumerate(prompts):
            if fed[i] < len(p):
                piece = list(p[fed[i]:fed[i] + size])
                fed[i] += len(piece)
            else:
                piece = [int(checks[-len(prompts) + i][1].argmax())]
            seqs[i].extend(piece)
            chunks.append(piece)
        out = drv.step(chunks)
        checks += [(list(s), out[i]) for i, s in enumerate(seqs)]
    return checks

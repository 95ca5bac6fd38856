"""The engine: requests in, streamed deltas out, over one compiled model.

``Engine.from_artifact(path)`` then ``async for delta in engine.generate(prompt, params)``, many
requests at once. A background task wakes a worker thread that runs engine steps back to back while
there is work; each step is the ordered list of actions in ``Engine.STEP`` (admit/abort → collect the
step launched last time → propose drafts → schedule → launch the model → emit), so a new batching mode
is a new action, not an edit to a loop. Launching returns as soon as the step is queued on the device
and its tokens are collected at the start of the next engine step; on a GPU the text work of a step's
tokens (detokenizing, stop strings, deltas) runs after the next launch, while the device computes
(``OVERLAP_STEP``), on a CPU before it (``SERIAL_STEP``). The event loop (and a server on it) stays
responsive and is not a hop between steps; requests and cancellations reach the step through a locked
inbox and take effect at the start of the next step, and a step's deltas reach their requests' queues in
one callback per event loop (``_deliver``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import numpy as np

from .detokenizer import IncrementalDetokenizer, StopChecker
from .errors import FerrumError
from .tokenizer import TokenizerFiles
from .kv_cache import BlockManager
from .model import CompiledModel, RaggedBatch, StepOutput
from .sampler import SampleResult, SamplingParams, SequenceSampler, prompt_logprobs, sample
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig, Sequence
from .speculative import FIXED_COST, KEEP, PRIOR, History, SpeculativeConfig, propose, worth_drafting
from .structured import Constraint, ConstraintError, StructuredOutput


log = logging.getLogger("ferrum")


class RequestError(FerrumError):
    """A request the engine cannot serve (too long, bad token ids, bad sampling parameters)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class StepFailed(RuntimeError):
    """An engine step raised (the model call on a broken device, a bug): every request the engine held
    ends with this instead of hanging; the engine goes on with new requests. Not a FerrumError: the
    server answers it with a 500, not a 400."""


@dataclass(frozen=True)
class EngineConfig:
    """Server-time options: memory budget and batching limits."""

    kv_cache_bytes: int | None = None  # None: sized to the device (model.auto_kv_cache_bytes)
    num_blocks: int | None = None  # overrides kv_cache_bytes
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: 2048 on GPUs, 512 on CPUs (``batch_budget``)
    enable_prefix_caching: bool = True
    device: str | None = None  # None: the device the artifact was compiled for
    verify_hashes: bool = True
    speculative: SpeculativeConfig | None = None  # None: no drafts (speculative decoding off)


@dataclass
class Delta:
    """New output of one choice of one request since its previous delta."""

    request_id: str
    index: int  # choice index (n > 1)
    text: str
    token_ids: list[int]
    logprobs: list[SampleResult] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list | None = None  # with the first delta of choice 0, when asked for
    queue_time: float | None = None  # seconds from submission to the first engine step, on the first delta


@dataclass(frozen=True)
class ThinkTokens:
    """A reasoning model's tags as token ids: a constraint applies only after the reasoning block."""

    start: int
    end: int
    opened: bool = False  # the prompt already opened the block: the answer starts inside it


@dataclass(eq=False)
class _Choice:
    index: int
    seq: Sequence
    sampler: SequenceSampler
    detok: IncrementalDetokenizer | None  # None: the artifact has no tokenizer (token ids only)
    stops: StopChecker
    finished: bool = False
    sent_prompt_logprobs: bool = False
    matcher: object | None = None  # xgrammar GrammarMatcher of a constrained request
    # "first": the first token may open a reasoning block instead; "thinking": inside it (unconstrained);
    # "on": every token is constrained
    gate: str = "on"
    ended: bool = False  # its last delta is queued (``finished`` comes first: at once, that one may wait for _emit)
    history: History = field(default_factory=History)  # its tokens as an array, for the draft proposer
    kept: float = PRIOR  # estimated share of its drafts that become output


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    think: ThinkTokens | None
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    choices: list[_Choice] = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    sent_queue_time: bool = False

    def emit(self, delta: Delta | StepFailed, outbox: dict) -> None:
        """Queue ``delta`` (or a failed step's error) in the step's ``outbox`` (loop -> [(queue, delta)]),
        delivered when the step ends."""
        outbox.setdefault(self.loop, []).append((self.queue, delta))


_Row = tuple[ScheduledChunk, str, _Request, _Choice]  # a logits row's chunk, "sample" | "prompt", owner


@dataclass(eq=False)
class _Launched:
    """A step on the device: what ``_collect`` needs to take its tokens."""

    chunks: list[ScheduledChunk]
    rows: list[_Row]
    picked: list[int]  # rows whose token the device picked
    output: StepOutput
    rewinds: dict = field(default_factory=dict)  # _Choice -> its generator's state before the step's draws


class Engine:
    # A step's actions in order. Where the device runs kernels beside the host (GPUs), a step is launched
    # before the previous step's tokens become text and deltas, so that work runs while the device
    # computes. On a CPU launching runs the step: the text work goes first, so that deltas do not wait
    # for the next step.
    OVERLAP_STEP = ("_take_inbox", "_collect", "_propose", "_schedule", "_launch", "_emit")
    SERIAL_STEP = ("_take_inbox", "_collect", "_emit", "_propose", "_schedule", "_launch")

    def __init__(self, model: CompiledModel, tokenizer: TokenizerFiles | None, config: EngineConfig = EngineConfig()):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        device = model.manifest.target["device"]  # the one it runs on (CompiledModel.load refuses others)
        self.STEP = self.SERIAL_STEP if device == "cpu" else self.OVERLAP_STEP
        # a / b of speculative.worth_drafting: the configured one, or this device's
        given = config.speculative.fixed_cost if config.speculative else None
        self._draft_cost = given if given is not None else FIXED_COST["cpu" if device == "cpu" else "gpu"]
        self.blocks = BlockManager(model.num_blocks, model.block_size, config.enable_prefix_caching)
        budget = config.max_num_batched_tokens or batch_budget(device)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, budget), self.blocks)
        self.capacity = min(model.max_model_len, model.num_blocks * model.block_size)
        self.eos_ids = tokenizer.eos_ids if tokenizer else set()
        self._inbox: list[_Request] = []
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[Sequence, tuple[_Request, _Choice]] = {}
        self._ids = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferrum-engine")
        self._loop_task: asyncio.Task | None = None
        self._closing = False  # close(): the worker thread stops after its current step
        # this step's deltas (or a failed step's error) by event loop, delivered when the step ends
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta | StepFailed]]] = {}
        self._wakeup: asyncio.Event | None = None
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "computed_tokens": 0, "steps": 0, "aborted": 0,
                         "drafts": 0, "draft_tokens": 0, "accepted_tokens": 0}  # speculative decoding
        # wall seconds per step action, and within them the compiled model's: launching a step (on a CPU,
        # running it) in _launch, waiting for its results in _collect, and both (ferrum bench)
        self.seconds: dict[str, float] = dict.fromkeys((*self.OVERLAP_STEP, "model_launch", "model_wait", "model_call"),
                                                       0.0)
        self._launched: _Launched | None = None  # the step on the device, collected by the next engine step
        self._structured: StructuredOutput | None = None
        self._structured_lock = threading.Lock()

    @classmethod
    def from_artifact(cls, path: str | Path, config: EngineConfig = EngineConfig()) -> "Engine":
        model = CompiledModel.load(path, device=config.device, num_blocks=config.num_blocks,
                                   kv_cache_bytes=config.kv_cache_bytes, verify_hashes=config.verify_hashes)
        tokenizer = TokenizerFiles.of(Path(path))
        return cls(model, tokenizer, config)

    # ------------------------------------------------------------------ public API
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this artifact has no tokenizer; send token ids", param="prompt")
            return self.tokenizer.encode(prompt)
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.model.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.model.vocab_size})",
                               param="prompt")
        return list(prompt)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError for a request the engine must refuse (nothing reaches the model)."""
        params.validate(self.model.vocab_size)
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if len(prompt_ids) + params.max_tokens > self.capacity:
            raise RequestError(f"this model's context holds {self.capacity} tokens; the prompt has {len(prompt_ids)} "
                               f"and max_tokens asks for {params.max_tokens} more", param="max_tokens" if
                               len(prompt_ids) < self.capacity else "prompt", code="context_length_exceeded")

    @property
    def structured(self) -> StructuredOutput:
        """The grammar engine over this artifact's vocabulary (built on first use: ~2 s)."""
        with self._structured_lock:
            if self._structured is None:
                if self.tokenizer is None:
                    raise ConstraintError("structured output needs the artifact's tokenizer", "response_format")
                self._structured = StructuredOutput(self.tokenizer.tokenizer, self.model.vocab_size, self.eos_ids)
            return self._structured

    def compile_constraint(self, constraint: Constraint) -> None:
        """Raise ConstraintError (naming the request field) if ``constraint`` cannot be compiled."""
        self.structured.compile(constraint)

    async def generate(self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
                       request_id: str | None = None, constraint: Constraint | None = None,
                       think: ThinkTokens | None = None) -> AsyncIterator[Delta]:
        """Stream deltas until every choice has finished. Leaving the loop early aborts the request.
        ``constraint`` masks every sampled token (after the reasoning block when ``think`` is given)."""
        prompt_ids = self.encode(prompt)
        self.check(prompt_ids, params)
        loop = asyncio.get_running_loop()
        req = _Request(request_id or f"req-{next(self._ids)}", prompt_ids, params, think, asyncio.Queue(), loop)
        first: Sequence | None = None
        for i in range(params.n):
            seq = Sequence(f"{req.request_id}/{i}", list(prompt_ids), needs_all_rows=params.prompt_logprobs is not None
                           and i == 0, after=first)
            first = first or seq
            sampler = SequenceSampler(params, prompt_ids, self.model.vocab_size, sample_index=i)
            detok = IncrementalDetokenizer(self.tokenizer.tokenizer) if self.tokenizer else None
            ch = _Choice(i, seq, sampler, detok, StopChecker(list(params.stop)))
            if constraint is not None:
                ch.matcher = self.structured.matcher(constraint)
                ch.gate = "on" if think is None else "thinking" if think.opened else "first"
            req.choices.append(ch)
        with self._lock:
            self._inbox.append(req)
        self._kick(loop)
        remaining = params.n
        try:
            while remaining:
                delta = await req.queue.get()
                if isinstance(delta, StepFailed):
                    remaining = 0  # its choices are finished already
                    raise delta
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            if remaining:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its KV blocks are freed at the start of the next step."""
        with self._lock:
            self._aborts.append(request_id)

    def stats(self) -> dict:
        with self._lock:
            arrived = sum(len(r.choices) for r in self._inbox)  # submitted, not yet seen by a step
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting) + arrived,
                "in_flight": int(self._launched is not None),  # a launched step not collected yet
                "kv_usage": self.blocks.usage, "num_blocks": self.blocks.num_blocks,
                "prefix_queries": self.blocks.queries, "prefix_hits": self.blocks.hits,
                "prefix_saved_tokens": self.blocks.saved_tokens, "preemptions": self.scheduler.num_preemptions,
                **self.counters}

    async def close(self) -> None:
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ the loop
    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._run())
        assert self._wakeup is not None
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await loop.run_in_executor(self._executor, self._steps)

    def _steps(self) -> None:
        """Steps until there is no work (or the engine closes), in the worker thread: a step's Python
        work is time the device waits, and a trip through the event loop between steps would add to it."""
        while not self._closing:
            try:
                if not self.step():
                    return
            except Exception as exc:  # noqa: BLE001 - the requests get it, the engine goes on
                log.exception("ferrum: an engine step failed; the requests it held end with an error")
                self._fail_all(StepFailed(f"the engine step failed: {type(exc).__name__}: {exc}"))

    def _fail_all(self, error: StepFailed) -> None:
        """End every request taken in (their state may be half-updated by the failed step) with ``error``,
        freeing their blocks; a step still on the device is dropped."""
        self._launched = None
        for req in list(self._requests.values()):
            for ch in req.choices:
                if not ch.finished:
                    self._retire(ch)
            req.emit(error, self._outbox)
        self._requests.clear()
        self._deliver()

    def step(self) -> bool:
        """One engine step; returns whether there is (still) work: a step on the device to collect."""
        state: dict = {}
        try:
            for action in self.STEP:
                t0 = time.perf_counter()
                getattr(self, action)(state)
                self.seconds[action] += time.perf_counter() - t0
                if state.get("idle"):
                    return False
        finally:
            self._deliver()
        return self._launched is not None

    def _deliver(self) -> None:
        """Hand the step's deltas to their requests' queues: one callback per event loop, not one per
        delta (each wakes the loop through its self-pipe: ~10 us a call on a 2-core box)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is waiting for these deltas any more
                pass

    # ------------------------------------------------------------------ step actions
    def _take_inbox(self, state: dict) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for req in inbox:
            self._requests[req.request_id] = req
            self.counters["prompt_tokens"] += len(req.prompt_ids)
            for ch in req.choices:
                self._by_seq[ch.seq] = (req, ch)
                self.scheduler.add(ch.seq)
        for rid in aborts:
            aborted = self._requests.get(rid)
            if aborted is None:
                continue  # finished already
            self.counters["aborted"] += 1
            for ch in aborted.choices:
                if not ch.finished:  # its blocks are freed now, though the step on the device may still
                    # write its next row into them: no later step is queued before that one is collected
                    self._finish(aborted, ch, "abort")
        state["idle"] = not self.scheduler.has_work and self._launched is None

    def _collect(self, state: dict) -> None:
        """The step launched last time: its tokens (picked on the device, or sampled here from its logits)
        become the sequences' next tokens (a draft's row adds a token while the drafts before it were
        kept) and the scheduler commits its KV rows. A token that ends its choice by id (EOS, a stop
        token, max_tokens) retires it now, so the next step leaves it out; the text of every token waits
        for ``_emit``. Rows of choices that ended meanwhile (an abort, a stop string found by the last
        ``_emit``) are dropped."""
        state["emit"] = []
        launched, self._launched = self._launched, None
        if launched is None:
            return
        t0 = time.perf_counter()
        ids, logits = launched.output.result()
        self._model_seconds("model_wait", t0)
        picked = {r: int(ids[r]) for r in launched.picked} if ids is not None else {}
        taken, scored = self._take(launched.rows, picked, logits)
        self.scheduler.commit(launched.chunks)  # after the tokens are appended: it keeps the drafts they match
        for ch, (rng_state, draws) in launched.rewinds.items():  # the device drew a uniform for every row
            used = sum(1 for t in taken if t[1] is ch)
            if used < draws:  # rows after a rejected draft: their draws are taken again by the next steps
                ch.sampler.rng.bit_generator.state = rng_state
                ch.sampler.rng.random(used)
        for req, ch in scored:  # max_tokens == 0: prompt scoring only
            self._finish(req, ch, "length")
        for req, ch, res, end in taken:
            if end is not None:
                self._retire(ch)
        state["emit"] = taken

    def _propose(self, state: dict) -> None:
        """Draft tokens for the decoding sequences (speculative decoding, when configured)."""
        spec = self.config.speculative
        if spec is None:
            return
        decoding = [seq for seq in self.scheduler.running if seq.num_computed == seq.num_tokens - 1]
        for seq in self.scheduler.running:
            seq.draft_ids = []
        for seq in decoding:
            req, ch = self._by_seq[seq]
            if not seq.output_ids:
                continue  # its prompt's last token (after a prefix hit or a chunked prefill): no drafts yet
            if not worth_drafting(ch.kept, len(decoding), self._draft_cost):
                ch.kept += 0.1 * (PRIOR - ch.kept)  # drifts back, so it is tried again some steps later
                continue
            seq.draft_ids = propose(ch.history.of(seq), spec, req.params.max_tokens - len(seq.output_ids) - 1)

    def _schedule(self, state: dict) -> None:
        state["chunks"] = self.scheduler.schedule()
        now = time.monotonic()
        for c in state["chunks"]:
            req = self._by_seq[c.seq][0]
            if req.scheduled_at is None:
                req.scheduled_at = now

    def _launch(self, state: dict) -> None:
        """Build the step's batch from the scheduled chunks and start it on the device."""
        chunks: list[ScheduledChunk] = state["chunks"]
        if not chunks:
            return
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        starts = [0]
        tables: list[list[int]] = []
        row_owner: list[_Row] = []  # per logits row: its chunk, "sample" | "prompt", request and choice
        bs = self.model.block_size
        for c in chunks:
            seq = c.seq
            req, ch = self._by_seq[seq]
            base = len(ids)
            end = c.start + c.length
            ids.extend(seq.tokens_between(c.start, end - len(c.drafts)))
            ids.extend(c.drafts)
            pos.extend(range(c.start, end))
            blocks = seq.blocks
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(c.start, end))
            starts.append(len(ids))
            tables.append(seq.blocks)
            if seq.needs_all_rows and c.start < len(seq.prompt_ids):
                rows.extend(range(base, len(ids)))
                row_owner.extend((c, "prompt", req, ch) for _ in range(c.length))
            elif c.samples:  # the last token's row, then each draft's
                rows.extend(range(len(ids) - 1 - len(c.drafts), len(ids)))
                row_owner.extend((c, "sample", req, ch) for _ in range(len(c.drafts) + 1))
            if c.drafts:
                self.counters["drafts"] += 1
                self.counters["draft_tokens"] += len(c.drafts)
        if not rows:  # every chunk is a partial prefill: the call only fills the cache
            rows = [0]
        width = max(len(t) for t in tables)
        table = np.zeros((len(tables), width), np.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = t
        batch = RaggedBatch(np.array(ids, np.int32), np.array(pos, np.int32), np.array(starts, np.int32), table,
                            np.array(slots, np.int32), np.array(rows, np.int32))
        # rows whose request lets the device pick the token (no logprobs, grammar, bias or penalty): greedy
        # ones by the artifact's argmax, sampled ones by its sampler (GPU artifacts); only their ids come
        # back, and the logits too when another row needs them. Decided per request, never per step, so a
        # request's tokens do not depend on what it is batched with.
        picked = [r for r, (_, kind, req, ch) in enumerate(row_owner)
                  if kind == "sample" and self._picked_on_device(req, ch)]
        rewinds: dict = {}
        sampling = self._device_sampling(row_owner, picked, rewinds) if picked else None
        t0 = time.perf_counter()
        if picked:
            output = self.model.launch(batch, True, sampling, len(picked) < len(row_owner), check=False)
        else:
            output = self.model.launch(batch, False, check=False)
        self._model_seconds("model_launch", t0)
        self._launched = _Launched(chunks, row_owner, picked, output, rewinds)
        self.counters["computed_tokens"] += len(ids)
        self.counters["steps"] += 1

    def _model_seconds(self, part: str, t0: float) -> None:
        spent = time.perf_counter() - t0
        self.seconds[part] += spent
        self.seconds["model_call"] += spent

    def _emit(self, state: dict) -> None:
        """The collected tokens' text and deltas, handed to the event loops at once."""
        taken = state.get("emit", ())
        left = Counter(ch for _, ch, _, _ in taken)  # per choice, its tokens of this step not emitted yet
        for req, ch, res, end in taken:
            left[ch] -= 1
            if not ch.ended:  # else a stop string ended it at an earlier token of this step
                self._emit_token(req, ch, res, end, left[ch])
        self._deliver()

    def _picked_on_device(self, req: _Request, ch: _Choice) -> bool:
        params = req.params
        if ch.sampler.adjusts or params.logprobs is not None or ch.matcher is not None or params.max_tokens == 0:
            return False
        return self.model.has_device_argmax if params.greedy else self.model.has_device_sampler

    def _device_sampling(self, row_owner: list[_Row], picked: list[int], rewinds: dict):
        """None when every picked row is greedy (the argmax does); else ``(params [L, 4], uniform [L])`` for
        the device sampler, one draw from each sampled sequence's generator as the host sampler takes. A
        choice with drafts draws for each of its rows; ``rewinds`` keeps its generator's state before them
        (``_collect`` gives back the draws of the rows after a rejected draft)."""
        if all(row_owner[r][2].params.greedy for r in picked):
            return None
        params = np.zeros((len(row_owner), 4), np.float32)  # other rows: greedy, their result unused
        params[:, 2] = 1.0
        uniform = np.zeros(len(row_owner), np.float32)
        for r in picked:
            _, _, req, ch = row_owner[r]
            p = req.params
            if not p.greedy:
                params[r] = (p.temperature, p.top_k, p.top_p, p.min_p)
                if ch not in rewinds and row_owner[r][0].drafts:
                    rewinds[ch] = [ch.sampler.rng.bit_generator.state, 0]
                if ch in rewinds:
                    rewinds[ch][1] += 1
                uniform[r] = ch.sampler.rng.random()
        return params, uniform

    def _take(self, row_owner: list[_Row], picked: dict[int, int], logits: np.ndarray | None):
        """The step's tokens ``[(request, choice, result, end)]`` in order, appended to their choices (see
        ``_accept``), picked on the device or sampled from the logits, and the prompt-scoring choices
        (max_tokens 0) whose prompt is done; prompt logprobs are added to their requests. A choice with
        drafts takes its rows in turn: row j + 1 only if row j's token is draft j, and sampled only then,
        so a choice draws (and its penalties count) exactly the tokens it outputs."""
        chains: dict[_Choice, tuple[ScheduledChunk, _Request, list[int]]] = {}  # its rows: next token, drafts'
        prompt_rows: dict[ScheduledChunk, list[int]] = {}
        for r, (c, kind, req, ch) in enumerate(row_owner):
            if ch.finished:
                continue  # ended while the step ran: its row is dropped
            if kind == "prompt":
                prompt_rows.setdefault(c, []).append(r)
                if c.samples and len(prompt_rows[c]) == c.length:
                    chains[ch] = (c, req, [r])
            else:
                chains.setdefault(ch, (c, req, []))[2].append(r)
        for c, rs in prompt_rows.items():  # prompt logprobs of the tokens after each computed row
            req = row_owner[rs[0]][2]
            if len(req.prompt_logprobs) != (c.start + 1 if c.start else 0):
                continue  # recomputed after a preemption: these positions are scored already
            span = req.prompt_ids[c.start:c.start + c.length + 1]
            assert logits is not None
            got = prompt_logprobs(logits[rs], span, req.params.prompt_logprobs or 0)
            req.prompt_logprobs.extend(got if c.start == 0 else got[1:])
        scored = [(req, ch) for ch, (_, req, _) in chains.items() if req.params.max_tokens == 0]
        live = [ch for ch, (_, req, _) in chains.items() if req.params.max_tokens > 0]
        taken: list[tuple[_Request, _Choice, SampleResult, str | None]] = []
        j = 0
        while live:
            wanted = [(chains[ch][2][j], chains[ch][1], ch) for ch in live if chains[ch][2][j] not in picked]
            results: dict[_Choice, SampleResult] = {}
            if wanted:
                assert logits is not None
                rows = logits[[r for r, _, _ in wanted]]
                self._mask(rows, [(req, ch) for _, req, ch in wanted])
                results = dict(zip((ch for _, _, ch in wanted), sample(rows, [ch.sampler for _, _, ch in wanted])))
            going = []  # choices whose row j took draft j: row j + 1 counts
            for ch in live:
                c, req, rs = chains[ch]
                res = results[ch] if ch in results else SampleResult(picked[rs[j]], float("nan"), [])
                end = self._accept(req, ch, res)
                taken.append((req, ch, res, end))
                if end is None and j < len(c.drafts) and res.token_id == c.drafts[j]:
                    going.append(ch)
                    self.counters["accepted_tokens"] += 1
                elif c.drafts:  # the chain ends: j of its drafts kept
                    ch.kept = KEEP * ch.kept + (1 - KEEP) * j / len(c.drafts)
            live, j = going, j + 1
        return taken, scored

    def _mask(self, rows: np.ndarray, owners: list[tuple[_Request, _Choice]]) -> None:
        """Constrained rows keep only the tokens their grammar allows next (plus an opening think tag)."""
        picked = [(i, req, ch) for i, (req, ch) in enumerate(owners) if ch.matcher is not None and ch.gate != "thinking"]
        if picked:
            self.structured.apply(rows, [i for i, _, _ in picked], [ch.matcher for _, _, ch in picked],
                                  [req.think.start if ch.gate == "first" and req.think else None for _, req, ch in picked])

    # ------------------------------------------------------------------ helpers
    def _accept(self, req: _Request, ch: _Choice, res: SampleResult) -> str | None:
        """Append a sampled token to its choice; "stop" (EOS or a stop token id: not output) or "length"
        (max_tokens reached) when it ends the choice (``_collect`` retires it), else None."""
        params = req.params
        tok = res.token_id
        if ch.matcher is not None:
            self._advance_grammar(req, ch, tok)
        self.counters["generation_tokens"] += 1
        ch.seq.output_ids.append(tok)
        ch.sampler.append(tok)
        end = None
        if (tok in self.eos_ids and not params.ignore_eos) or tok in params.stop_token_ids:
            end = "stop"
        elif len(ch.seq.output_ids) >= params.max_tokens:
            end = "length"
        return end

    def _emit_token(self, req: _Request, ch: _Choice, res: SampleResult, end: str | None, later: int = 0) -> None:
        """A collected token's delta: its text, held back while it may start a stop string; a stop string it
        completes ends the choice (its row in the step now running is dropped, and the ``later`` tokens
        this step added after it are taken back)."""
        tok = res.token_id
        logprobs = [res] if req.params.logprobs is not None else None
        if end == "stop":  # the stop token itself is not output
            self._end(req, ch, "stop", self._drain(ch), [], None)
            return
        safe, hit = ch.stops.feed(ch.detok.push(tok) if ch.detok else "")
        if hit:
            if not ch.finished:
                self._retire(ch)
            if later:
                del ch.seq.output_ids[-later:]
                self.counters["generation_tokens"] -= later
            self._end(req, ch, "stop", safe, [tok], logprobs)
        elif end == "length":
            self._end(req, ch, "length", safe + self._drain(ch), [tok], logprobs)
        else:
            req.emit(self._delta(req, ch, safe, [tok], logprobs, None), self._outbox)

    @staticmethod
    def _advance_grammar(req: _Request, ch: _Choice, tok: int) -> None:
        if ch.gate == "first" and req.think is not None and tok == req.think.start:
            ch.gate = "thinking"
        elif ch.gate == "thinking":
            if req.think is not None and tok == req.think.end:
                ch.gate = "on"
        else:
            ch.gate = "on"
            if not ch.matcher.accept_token(tok):  # type: ignore[attr-defined]
                # unreachable while masks are applied (a user stop token the grammar forbids cannot be
                # sampled); never take the engine down over it
                log.warning("ferrum: %s: token %d does not continue its grammar; unconstraining it",
                            req.request_id, tok)
                ch.matcher = None

    @staticmethod
    def _drain(ch: _Choice) -> str:
        """Text still held back (partial characters, possible stop-string starts) at the end."""
        safe, hit = ch.stops.feed(ch.detok.flush() if ch.detok else "")
        return safe if hit else safe + ch.stops.flush()

    def _finish(self, req: _Request, ch: _Choice, reason: str, text: str = "", token_ids: list[int] | None = None,
                logprobs: list | None = None) -> None:
        self._retire(ch)
        self._end(req, ch, reason, text, token_ids, logprobs)

    def _end(self, req: _Request, ch: _Choice, reason: str, text: str, token_ids: list[int] | None,
             logprobs: list | None) -> None:
        """The retired choice's last delta; the request leaves the engine with its last choice's."""
        ch.ended = True
        req.emit(self._delta(req, ch, text, token_ids or [], logprobs, reason), self._outbox)
        if all(c.ended for c in req.choices):
            self._requests.pop(req.request_id, None)

    def _retire(self, ch: _Choice) -> None:
        """The choice is done: its sequence leaves the scheduler (blocks freed) and the engine's index."""
        ch.finished = True
        self.scheduler.finish(ch.seq)
        self._by_seq.pop(ch.seq, None)

    def _delta(self, req: _Request, ch: _Choice, text: str, token_ids: list[int], logprobs, reason) -> Delta:
        prompt_lp = None
        if ch.index == 0 and req.prompt_logprobs and not ch.sent_prompt_logprobs:
            prompt_lp, ch.sent_prompt_logprobs = req.prompt_logprobs, True
        queue_time = None
        if not req.sent_queue_time and req.scheduled_at is not None:
            queue_time, req.sent_queue_time = req.scheduled_at - req.arrival, True
        return Delta(req.request_id, ch.index, text, token_ids, logprobs, reason, len(req.prompt_ids),
                     len(ch.seq.output_ids), prompt_lp, queue_time)


def batch_budget(device: str) -> int:
    """Tokens per step when none is configured: 512 on CPUs (a step's time grows with its tokens, so
    longer prompt chunks delay the decodes batched with them for little gain), 2048 on GPUs, whose GEMMs
    are more efficient on longer chunks (vLLM's chunked-prefill default of 2048)."""
    return 512 if device == "cpu" else 2048


def _put_all(items: list[tuple[asyncio.Queue, Delta | StepFailed]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)

"""The scheduler: which sequences run in the next step and how many tokens each computes, and the
bookkeeping of a step's output (it owns the requests, their KV blocks and the step counters).

One step computes, for every scheduled sequence, the next ``n`` tokens whose K/V are not in
the cache yet (``all_token_ids[num_computed:num_computed + n]``). A decoding sequence has
exactly one such token (the one sampled last step); a new or preempted sequence has its whole
prompt, which is cut into chunks so that one step never computes more than
``max_num_batched_tokens`` tokens (chunked prefill). Running sequences are served first, in
arrival order, so a long prompt never stalls the decodes of others; waiting sequences are
admitted with what is left of the token budget, up to ``max_num_seqs`` running.

When the KV cache runs out of blocks the most recently admitted running sequence is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be recomputed
later (its generated tokens are kept; prefix caching usually makes the recompute cheap).

After the forward pass, ``update_from_output`` (vLLM's name; nano-vllm's ``postprocess``) advances
the computed tokens, registers full blocks in the prefix cache, appends the sampled tokens, asks
the detokenizer for each token's event and frees the sequences it finished.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from berth.server.engine.kv_cache import BlockManager
from berth.server.engine.sequence import SeqStatus, Sequence
from berth.server.engine.types import SampleResult, TokenEvent

logger = logging.getLogger(__name__)


class OutputProcessor(Protocol):
    """Turns a sequence's newest token into its event (the detokenizer)."""

    def process(
        self, seq: Sequence, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> TokenEvent: ...


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed_tokens)
    num_tokens: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # The scheduled sequences that sample a token this step, in batch order (set by ``schedule``).
    sampling: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass
class StepCounters:
    steps: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    num_aborted: int = 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.requests: dict[str, Sequence] = {}  # every sequence not finished, by request id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.counters = StepCounters()

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request at once (its blocks are freed); None when it is not here (any more)."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self.finish(seq, "abort")
        self.counters.num_aborted += 1
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished or aborted) and free its blocks at once."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.bm.free(seq)
        self.requests.pop(seq.request_id, None)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    # ------------------------------------------------------------------ schedule
    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (%d tokens computed)", seq.request_id, seq.num_computed_tokens)
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.counters.num_preemptions += 1

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Running sequences, oldest first: decodes (1 token) and unfinished prefill chunks."""
        scheduled_ids: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:  # nothing to compute (should not happen: finished ones are removed)
                i += 1
                continue
            while not self.bm.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                if id(victim) in scheduled_ids:  # never preempt what is already in this step
                    victim = seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                scheduled_ids.add(id(seq))
                budget -= n
                i += 1
            # else ``seq`` itself was preempted: the list shifted, do not advance ``i``.
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting sequences with what is left, unless memory was short this step."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0 and not seq.block_table:
                cached = self.bm.lookup_prefix(seq)
                seq.num_computed_tokens = cached
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = cached
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.allocate(seq, seq.num_computed_tokens + n):
                # Not enough memory for the first chunk: give back the prefix hits and wait.
                self.bm.free(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        self._admit_waiting(out, budget)
        out.sampling = [s.seq for s in out.scheduled if s.samples]
        return out

    # ------------------------------------------------------------------- output
    def update_from_output(
        self, out: SchedulerOutput, results: Seq[SampleResult], outputs: OutputProcessor
    ) -> list[tuple[str, TokenEvent]]:
        """Advance the scheduler's state by one executed step; the step's token events by request id.

        ``results`` holds one sampled token per sequence of ``out.sampling``, in that order.
        """
        c = self.counters
        c.steps += 1
        for s in out.scheduled:
            seq = s.seq
            if s.num_tokens == 1 and s.start >= seq.num_prompt_tokens:
                c.num_decode_tokens += 1
            else:
                c.num_prefill_tokens += s.num_tokens
            seq.num_computed_tokens += s.num_tokens
            self.bm.cache_full_blocks(seq, seq.num_computed_tokens)
        events: list[tuple[str, TokenEvent]] = []
        for seq, res in zip(out.sampling, results, strict=True):
            if seq.num_output_tokens == 0:
                c.num_cached_prompt_tokens += seq.num_cached_prompt_tokens
            seq.append_token(res.token_id)
            if seq.guide is not None:
                seq.guide.accept(res.token_id)
            event = outputs.process(seq, res.token_id, res.logprob, res.top_logprobs)
            if event.finish_reason is not None:
                self.finish(seq, event.finish_reason)
                c.num_finished += 1
            events.append((seq.request_id, event))
        return events

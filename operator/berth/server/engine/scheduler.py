"""The scheduler: which sequences run in the next step and how many tokens each computes.

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
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

from berth.server.engine.kv_cache import BlockManager
from berth.server.engine.sequence import SeqStatus, Sequence

logger = logging.getLogger(__name__)


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

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (%d tokens computed)", seq.request_id, seq.num_computed_tokens)
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()

        # 1. Running sequences, oldest first: decodes (1 token) and unfinished prefill chunks.
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
                continue
            # ``seq`` itself was preempted: the list shifted, do not advance ``i``.

        # 2. Admit waiting sequences with what is left, unless memory was short this step.
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
            scheduled_ids.add(id(seq))
            budget -= n
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished or aborted) and free its blocks at once."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

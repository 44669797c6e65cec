"""The block manager and the scheduler, pure Python, without a model (runs with only the test extra)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from berth.server.engine.kv_cache import BlockManager
from berth.server.engine.scheduler import Scheduler, SchedulerOutput
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import SampleResult, SamplingParams, TokenEvent


def seq(rid: str, tokens: list[int], adapter: str | None = None) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), adapter=adapter)


def test_blocks_are_allocated_freed_and_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = seq("a", list(range(10)))
    assert bm.allocate(a, 10) and len(a.block_table) == 3
    assert bm.usage == 0.75
    b = seq("b", list(range(8)))
    assert not bm.allocate(b, 8)  # all or nothing
    assert b.block_table == [] and bm.num_free_blocks == 1
    used = set(a.block_table)
    bm.free(a)
    assert bm.usage == 0.0 and a.block_table == []
    assert bm.allocate(b, 8) and set(b.block_table) <= used | {0, 1, 2, 3}


def test_prefix_cache_hits_refcounts_and_eviction() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = seq("a", prompt)
    assert bm.lookup_prefix(a) == 0
    assert bm.allocate(a, 10)
    bm.cache_full_blocks(a, 10)
    b = seq("b", [*prompt[:8], 7, 7, 7])
    assert bm.lookup_prefix(b) == 8  # shares both full blocks with a
    assert b.block_table == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # the same prompt under another adapter does not share KV
    c = seq("c", prompt, adapter="x")
    assert bm.lookup_prefix(c) == 0
    # a prompt that is exactly 2 full blocks reuses only 1: its last token is recomputed
    d = seq("d", prompt[:8])
    assert bm.lookup_prefix(d) == 4
    for s in (a, b, d):
        bm.free(s)
    assert bm.usage == 0.0
    # freed cached blocks survive until memory is needed...
    e = seq("e", prompt)
    assert bm.lookup_prefix(e) == 8
    bm.free(e)
    # ...and are evicted (tail first) when it is
    f = seq("f", list(range(24)))
    assert bm.allocate(f, 24)
    g = seq("g", prompt)
    assert bm.lookup_prefix(g) == 0


def test_scheduler_chunks_prefill_and_serves_running_first() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8)
    a, b, c = seq("a", list(range(20))), seq("b", list(range(50, 53))), seq("c", [1, 2])
    for s in (a, b, c):
        sch.add(s)
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_tokens, s.samples) for s in out.scheduled] == [("a", 8, False)]
    a.num_computed_tokens += 8
    out = sch.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 8)]
    a.num_computed_tokens += 8
    out = sch.schedule()  # a's last 4 tokens, then b is admitted with the rest of the budget
    assert [(s.seq.request_id, s.start, s.num_tokens, s.samples) for s in out.scheduled] == [
        ("a", 16, 4, True),
        ("b", 0, 3, True),
    ]
    assert len(sch.running) == 2 and list(sch.waiting) == [c]  # max_num_seqs
    sch.finish(a, "stop")
    assert bm.usage == pytest.approx(1 / 32)  # only b's block is held


@dataclass
class Finisher:
    """An output processor that ends a sequence after ``n`` output tokens ("length")."""

    n: int

    def process(
        self, seq: Sequence, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> TokenEvent:
        done = seq.num_output_tokens >= self.n
        return TokenEvent(
            token_id,
            "",
            finish_reason="length" if done else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_output_tokens,
        )


def step(
    sch: Scheduler, out: SchedulerOutput, token: int, finisher: Finisher
) -> list[tuple[str, TokenEvent]]:
    return sch.update_from_output(out, [SampleResult(token) for _ in out.sampling], finisher)


def test_update_from_output_advances_caches_and_finishes() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = seq("a", list(range(8)))
    sch.add(a)
    out = sch.schedule()
    assert [s.seq for s in out.scheduled] == [a] and out.sampling == [a]
    events = step(sch, out, 42, Finisher(2))
    assert [(rid, ev.token_id, ev.finish_reason) for rid, ev in events] == [("a", 42, None)]
    assert a.num_computed_tokens == 8 and a.all_token_ids[-1] == 42
    assert sch.counters.num_prefill_tokens == 8 and sch.counters.steps == 1
    assert sum(b.hash is not None for b in bm.blocks) == 2  # both full prompt blocks are in the prefix cache
    out = sch.schedule()
    assert [(s.start, s.num_tokens) for s in out.scheduled] == [(8, 1)]
    events = step(sch, out, 43, Finisher(2))
    assert events[0][1].finish_reason == "length"
    assert a.is_finished and not sch.has_work() and "a" not in sch.requests
    assert sch.counters.num_decode_tokens == 1 and sch.counters.num_finished == 1
    assert bm.usage == 0.0  # freed at once; the cached blocks stay evictable
    assert bm.num_free_blocks == 8


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    """Two sequences outgrow a 4-block cache: the newest is preempted, recomputed later, nothing lost."""
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    a, b = seq("a", list(range(7))), seq("b", list(range(100, 107)))
    sch.add(a)
    sch.add(b)
    finisher = Finisher(100)
    step(sch, sch.schedule(), 1, finisher)  # both prefilled (7 tokens) and sampled one: 2 blocks each
    step(sch, sch.schedule(), 2, finisher)  # the 8th token of each still fits its 2 blocks
    assert [len(s.block_table) for s in (a, b)] == [2, 2] and bm.num_free_blocks == 0
    out = sch.schedule()  # a's 9th token needs a third block: b (newest) is preempted
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a]
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert list(sch.waiting) == [b] and sch.running == [a]
    assert sch.counters.num_preemptions == 1
    step(sch, out, 3, finisher)
    assert b.all_token_ids == [*range(100, 107), 1, 2]  # its sampled tokens are kept for the recompute
    sch.abort("a")
    out = sch.schedule()  # b comes back first and recomputes prompt + output in one chunk
    assert [(s.seq.request_id, s.start, s.num_tokens, s.samples) for s in out.scheduled] == [
        ("b", 0, 9, True)
    ]
    assert sch.counters.num_aborted == 1


def test_duplicate_request_id_is_refused() -> None:
    sch = Scheduler(BlockManager(num_blocks=4, block_size=4), max_num_seqs=2, max_num_batched_tokens=8)
    sch.add(seq("a", [1, 2]))
    with pytest.raises(ValueError, match="already running"):
        sch.add(seq("a", [3]))

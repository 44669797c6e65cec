"""Pure-Python engine parts without a model: block manager, scheduler, JSON prefix checker."""

from __future__ import annotations

import json

import pytest

from berth.server.engine import json_mode
from berth.server.engine.kv_cache import BlockManager
from berth.server.engine.scheduler import Scheduler
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import SamplingParams


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


@pytest.mark.parametrize(
    "text",
    ['{"a": [1, -2.5e3, true, null, {"b": "x\\"y\\u00e9"}], "c": {}}', ' {"k":"v"}', "{}", '{"a":[]}'],
)
def test_json_checker_accepts_valid_objects(text: str) -> None:
    st = json_mode.advance(json_mode.INITIAL, text)
    assert st is not None and json_mode.is_done(st)
    json.loads(text)


@pytest.mark.parametrize(
    "text", ["[1]", '"s"', '{"a":01}', '{"a" 1}', '{"a":1,}', "{}{}", '{"a":nul}', '{"a":1.}']
)
def test_json_checker_rejects_invalid(text: str) -> None:
    st = json_mode.advance(json_mode.INITIAL, text)
    assert st is None or not json_mode.is_done(st)


@pytest.mark.parametrize(
    "prefix", ["", "{", '{"ab', '{"a":', '{"a":-', '{"a":[1,', '{"a":"\\u12', '{"a":tr', '{"a":1,']
)
def test_json_completion_closes_any_prefix(prefix: str) -> None:
    st = json_mode.advance(json_mode.INITIAL, prefix)
    assert st is not None
    assert isinstance(json.loads(prefix + json_mode.completion(st)), dict)


def test_json_budget_refuses_tokens_that_cannot_be_closed() -> None:
    st = json_mode.advance(json_mode.INITIAL, '{"a":')
    assert st is not None
    assert json_mode.allowed(st, "[[", tokens_left_after=2) is None  # needs "0]]}" = 4 more tokens
    assert json_mode.allowed(st, "[[", tokens_left_after=4) is not None
    assert json_mode.allowed(st, "1}", tokens_left_after=0) is not None  # completes the object

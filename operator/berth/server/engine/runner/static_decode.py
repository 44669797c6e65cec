"""Decode steps through static shapes, captured as CUDA graphs on CUDA (eager on CPU).

A pure decode step (every scheduled sequence decodes one token, none uses a side-by-side adapter)
runs on buffers allocated once: the batch padded to the next of 1, 2, 4, ... up to
``max_num_seqs``, the block tables to the next of 1, 2, 4, ... blocks. Padded rows write their K/V
into a scratch block (one block past those the block manager hands out) and attend only to it;
their logits are dropped. On CUDA each (batch size, table width) pair is captured once, on first
use, into one shared memory pool, writing into one shared logits buffer, and replayed: one launch
per step. See docs/engine.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from berth.server.engine.runner.attention import AttnGroup
from berth.server.engine.scheduler import ScheduledSeq

logger = logging.getLogger(__name__)

# forward(input_ids [b], positions [b], slots [b], groups) -> float32 logits [b, vocab]
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[AttnGroup]], torch.Tensor]


def buckets(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, then ``limit``."""
    out: list[int] = []
    b = 1
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


class StaticDecode:
    def __init__(
        self,
        forward: Forward,
        *,
        device: torch.device,
        block_size: int,
        scratch_block: int,
        vocab_size: int,
        max_num_seqs: int,
        max_model_len: int,
        cuda_graphs: bool,
    ) -> None:
        self.forward = forward
        self.device = device
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.use_cuda_graphs = cuda_graphs
        self.num_steps = 0
        self.num_graph_captures = 0
        self.batch_buckets = buckets(max_num_seqs)
        self.width_buckets = buckets(-(-max_model_len // block_size))
        b, w = self.batch_buckets[-1], self.width_buckets[-1]
        self._ids = torch.zeros(b, dtype=torch.long, device=device)
        self._pos = torch.zeros(b, dtype=torch.long, device=device)
        self._slots = torch.zeros(b, dtype=torch.long, device=device)
        self._ctx = torch.ones(b, dtype=torch.long, device=device)
        self._tables = torch.full((b, w), scratch_block, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], Any] = {}
        self._graph_pool: Any = None
        # One logits buffer all graphs write into (a graph's own output would be [b, vocab] float32 each).
        self._logits = torch.empty(b, vocab_size, dtype=torch.float32, device=device) if cuda_graphs else None
        logger.info(
            "static decode: batch sizes %s, block-table widths %s%s",
            self.batch_buckets,
            self.width_buckets,
            " (CUDA graphs, captured on first use)" if cuda_graphs else " (eager)",
        )

    def fits(self, batch: Seq[ScheduledSeq]) -> tuple[int, int] | None:
        """The (batch size, table width) bucket for a pure decode step without adapters, else None."""
        if not batch or len(batch) > self.batch_buckets[-1]:
            return None
        width = 0
        for s in batch:
            if s.num_tokens != 1 or not s.samples or s.seq.adapter_index >= 0:
                return None
            width = max(width, s.start // self.block_size + 1)
        if width > self.width_buckets[-1]:
            return None
        b = next(x for x in self.batch_buckets if x >= len(batch))
        w = next(x for x in self.width_buckets if x >= width)
        return b, w

    def _fill(self, batch: Seq[ScheduledSeq], b: int, w: int) -> None:
        """Write this step's inputs into the static buffers; rows past the batch are padding."""
        bs = self.block_size
        ids = [0] * b
        pos = [0] * b
        slots = [self.scratch_block * bs] * b
        ctx = [1] * b
        tables = torch.full((b, w), self.scratch_block, dtype=torch.long)
        for i, s in enumerate(batch):
            seq, p = s.seq, s.start
            ids[i] = seq.all_token_ids[p]
            pos[i] = p
            table = seq.block_table
            slots[i] = table[p // bs] * bs + p % bs
            ctx[i] = p + 1
            used = p // bs + 1
            tables[i, :used] = torch.tensor(table[:used], dtype=torch.long)
        self._ids[:b].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self._pos[:b].copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        self._slots[:b].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)
        self._ctx[:b].copy_(torch.tensor(ctx, dtype=torch.long), non_blocking=True)
        self._tables[:b, :w].copy_(tables, non_blocking=True)

    def _pad(self, b: int, w: int) -> None:
        """Every row padding: what warm-up and capture run on, so they touch only the scratch block."""
        self._ids[:b].zero_()
        self._pos[:b].zero_()
        self._slots[:b].fill_(self.scratch_block * self.block_size)
        self._ctx[:b].fill_(1)
        self._tables[:b, :w].fill_(self.scratch_block)

    def _run(self, b: int, w: int) -> torch.Tensor:
        """Logits [b, vocab] for the b rows in the static buffers (every row samples)."""
        tables = self._tables[:b, :w]
        ctx = self._ctx[:b]
        kpos = torch.arange(w * self.block_size, device=self.device)
        # One decode group in token order: query i is token i, attending to its first ctx[i] positions.
        group = AttnGroup(
            tok_idx=torch.arange(b, device=self.device).unsqueeze(1),
            block_tables=tables,
            mask=(kpos[None, :] < ctx[:, None]).view(b, 1, 1, w * self.block_size),
            src=None,
            dst=None,
            ctx=ctx,
        )
        return self.forward(self._ids[:b], self._pos[:b], self._slots[:b], [group])

    def _capture(self, b: int, w: int) -> Any:
        assert self._logits is not None
        logits_out = self._logits[:b]
        self._pad(b, w)
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy inits, autotuning)
                logits_out.copy_(self._run(b, w))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            logits_out.copy_(self._run(b, w))
        if self._graph_pool is None:
            self._graph_pool = graph.pool()
        self.num_graph_captures += 1
        logger.info("captured a CUDA graph for decode batch %d, block-table width %d", b, w)
        return graph

    def execute(self, batch: Seq[ScheduledSeq], b: int, w: int) -> torch.Tensor:
        """Logits [len(batch), vocab] of a step that ``fits`` returned (b, w) for."""
        self.num_steps += 1
        graph = self._graphs.get((b, w)) if self.use_cuda_graphs else None
        if self.use_cuda_graphs and graph is None:
            try:
                graph = self._graphs[(b, w)] = self._capture(b, w)
            except Exception:
                # Do not fail the step, nor retry every step: serve on without graphs.
                logger.exception(
                    "CUDA graph capture failed; decode steps run the static path eagerly from now on"
                )
                self.use_cuda_graphs = False
                graph = None
        self._fill(batch, b, w)
        if graph is None:
            return self._run(b, w)[: len(batch)]
        graph.replay()
        assert self._logits is not None
        return self._logits[: len(batch)]

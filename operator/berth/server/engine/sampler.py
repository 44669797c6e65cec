"""Token sampling: penalties, structured-output masks, temperature, top-k, top-p, per-request
generators, logprobs.

Works on the logits tensor wherever it lives (CPU or CUDA). Every request that samples gets
its own ``torch.Generator`` seeded from its ``seed``, so a seeded request draws the same
tokens whatever else is in the batch.

Rows of structured-output requests get their grammar's token bitmask applied in place (one
batched call, on the logits' device, through a ``guided.TokenBitmask`` reused step to step) after
the penalties and before temperature, top-k and top-p, so those rows sample exactly from the
model's distribution restricted to what the grammar allows; the other rows are untouched.
Logprobs are those of the model, before penalties and masks.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from berth.server.engine import guided
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import SampleResult


def _apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
    vocab = logits.shape[-1]
    for r, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.all_token_ids)), device=logits.device, dtype=torch.long)
            ids = ids[ids < vocab]
            score = logits[r, ids]
            logits[r, ids] = torch.where(
                score < 0, score * p.repetition_penalty, score / p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, device=logits.device, dtype=torch.long)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            logits[r] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p exclude, for one row."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        remove = cum - probs > top_p  # keep the smallest set whose mass reaches top_p
        remove[0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, idx, remove), float("-inf"))
    return logits


class Sampler:
    def __init__(self, max_num_seqs: int = 0) -> None:
        # structured-output rows' masks, reused step to step: rows for max_num_seqs allocated at the first use
        self._bitmask = guided.TokenBitmask(max_num_seqs)

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        g: torch.Generator | None = seq.generator
        if g is None or g.device != device:
            g = torch.Generator(device=device)
            g.manual_seed(seq.seed)
            seq.generator = g
        return g

    # ---------------------------------------------------------------- sample
    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[SampleResult]:
        """Pick one token per row of ``logits`` ([len(seqs), vocab], float32)."""
        assert logits.shape[0] == len(seqs)
        want_lp = [r for r, s in enumerate(seqs) if s.params.logprobs is not None]
        raw_lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        penalised = any(
            s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
            for s in seqs
        )
        guided_rows = [r for r, s in enumerate(seqs) if s.guide is not None]
        if penalised or guided_rows:
            logits = logits.clone()
        if penalised:
            _apply_penalties(logits, seqs)
        if guided_rows:
            self._bitmask.apply(logits, guided_rows, [seqs[r].guide for r in guided_rows])

        results: list[SampleResult | None] = [None] * len(seqs)
        greedy = [r for r, s in enumerate(seqs) if s.params.greedy]
        if greedy:
            ids = torch.argmax(logits[greedy], dim=-1).tolist()
            for r, tid in zip(greedy, ids, strict=True):
                results[r] = SampleResult(tid)
        for r, seq in enumerate(seqs):
            if results[r] is not None:
                continue
            p = seq.params
            g = self._generator(seq, logits.device)
            masked = _top_k_top_p(logits[r] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(masked, dim=-1)
            results[r] = SampleResult(int(torch.multinomial(probs, 1, generator=g).item()))

        if raw_lp is not None:
            for i, r in enumerate(want_lp):
                res = results[r]
                assert res is not None
                res.logprob = float(raw_lp[i, res.token_id])
                k = seqs[r].params.logprobs or 0
                if k > 0:
                    top = torch.topk(raw_lp[i], k)
                    res.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        out: list[SampleResult] = []
        for res in results:
            assert res is not None
            out.append(res)
        return out

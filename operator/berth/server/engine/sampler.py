"""Token sampling: penalties, temperature, top-k, top-p, per-request generators, logprobs, JSON mode.

Works on the logits tensor wherever it lives (CPU or CUDA). Every request that samples gets
its own ``torch.Generator`` seeded from its ``seed``, so a seeded request draws the same
tokens whatever else is in the batch.

JSON mode masks lazily: the most likely token is tried first and replaced by the next one
(greedy) or re-drawn with the rejected token removed (sampling) until one keeps the output a
valid, still closable JSON prefix (``json_mode.allowed``). This samples exactly from the
distribution restricted to the allowed tokens without checking the whole vocabulary every
step; only when many candidates in a row are rejected is the whole (top-k/top-p) candidate set
checked at once.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from berth.server.engine import json_mode
from berth.server.engine.sequence import Sequence
from berth.server.engine.types import SampleResult

_MAX_REJECTIONS = 24
_SCAN_CHUNK = 256


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
    def __init__(self, token_texts: Callable[[], Seq[str | None]]) -> None:
        # token_texts() returns the text of every token id (None for special tokens); it is
        # only called, and built, when a JSON-mode request arrives.
        self._token_texts = token_texts

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        g: torch.Generator | None = seq.generator
        if g is None or g.device != device:
            g = torch.Generator(device=device)
            g.manual_seed(seq.seed)
            seq.generator = g
        return g

    # ------------------------------------------------------------------ JSON
    def _json_ok(self, seq: Sequence, token_id: int) -> json_mode.State | None:
        texts = self._token_texts()
        if token_id >= len(texts):
            return None
        text = texts[token_id]
        if text is None:
            return None
        left_after = seq.max_tokens - seq.num_output_tokens - 1
        return json_mode.allowed(seq.json_state, text, left_after)

    def _json_greedy(self, seq: Sequence, row: torch.Tensor) -> tuple[int, json_mode.State]:
        order = torch.argsort(row, descending=True)
        for start in range(0, order.shape[0], _SCAN_CHUNK):
            for tid in order[start : start + _SCAN_CHUNK].tolist():
                st = self._json_ok(seq, tid)
                if st is not None:
                    return tid, st
        raise RuntimeError("JSON mode: no token of the vocabulary continues the output")

    def _json_sample(
        self, seq: Sequence, probs: torch.Tensor, logits: torch.Tensor, g: torch.Generator
    ) -> tuple[int, json_mode.State]:
        probs = probs.clone()
        for _ in range(_MAX_REJECTIONS):
            if float(probs.sum()) <= 0:
                break
            tid = int(torch.multinomial(probs, 1, generator=g).item())
            st = self._json_ok(seq, tid)
            if st is not None:
                return tid, st
            probs[tid] = 0.0
        # Check every remaining candidate at once and draw among the allowed ones.
        cand = torch.nonzero(probs > 0).flatten().tolist()
        ok: list[int] = []
        states: dict[int, json_mode.State] = {}
        for tid in cand:
            st = self._json_ok(seq, tid)
            if st is not None:
                ok.append(tid)
                states[tid] = st
        if not ok:  # nothing allowed inside top-k/top-p: take the most likely allowed token
            return self._json_greedy(seq, logits)
        sub = probs[torch.tensor(ok, device=probs.device)]
        pick = ok[int(torch.multinomial(sub, 1, generator=g).item())]
        return pick, states[pick]

    # ---------------------------------------------------------------- sample
    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[SampleResult]:
        """Pick one token per row of ``logits`` ([len(seqs), vocab], float32)."""
        assert logits.shape[0] == len(seqs)
        want_lp = [r for r, s in enumerate(seqs) if s.params.logprobs is not None]
        raw_lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        if any(
            s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
            for s in seqs
        ):
            logits = logits.clone()
            _apply_penalties(logits, seqs)

        results: list[SampleResult | None] = [None] * len(seqs)
        plain_greedy = [r for r, s in enumerate(seqs) if s.params.greedy and not s.params.json_mode]
        if plain_greedy:
            ids = torch.argmax(logits[plain_greedy], dim=-1).tolist()
            for r, tid in zip(plain_greedy, ids, strict=True):
                results[r] = SampleResult(tid)
        for r, seq in enumerate(seqs):
            if results[r] is not None:
                continue
            p = seq.params
            row = logits[r]
            if p.greedy:
                tid, st = self._json_greedy(seq, row)
                results[r] = SampleResult(tid, json_state=st)
                continue
            g = self._generator(seq, logits.device)
            masked = _top_k_top_p(row / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(masked, dim=-1)
            if p.json_mode:
                tid, st = self._json_sample(seq, probs, row, g)
                results[r] = SampleResult(tid, json_state=st)
            else:
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

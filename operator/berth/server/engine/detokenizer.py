"""Token ids -> text: incremental detokenization, stop handling, token pieces.

``Detokenizer.process`` turns one sampled token of a sequence into its ``TokenEvent``: the text
delta, with a suffix that may still become a stop string held back (released when it cannot, or
trimmed with the stop string), and the finish reason when the token ends the sequence (EOS, a stop
token or string, a completed structured-output grammar, ``max_tokens``). The scheduler calls it from
``update_from_output`` and frees what it finishes.
"""

from __future__ import annotations

import logging
from typing import Any

from berth.server.engine.sequence import Sequence
from berth.server.engine.types import TokenEvent

logger = logging.getLogger(__name__)


class Detokenizer:
    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or [])
        self._piece_cache: dict[int, str] = {}

    # ------------------------------------------------------------------ vocabulary
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        return str(text)

    def token_piece(self, token_id: int) -> str:
        """The text of one token as it would appear in an output (for top_logprobs)."""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = str(
                self.tokenizer.decode(
                    [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
            )
            self._piece_cache[token_id] = piece
        return piece

    # --------------------------------------------------------------------- outputs
    def _incremental(self, seq: Sequence, flush: bool) -> str:
        ids = seq.all_token_ids
        skip = seq.params.skip_special_tokens
        prefix = self.decode(ids[seq.prefix_offset : seq.read_offset], skip)
        new = self.decode(ids[seq.prefix_offset :], skip)
        if len(new) > len(prefix) and (flush or not new.endswith("\ufffd")):
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(ids)
            return new[len(prefix) :]
        return ""

    def _stop_string(self, seq: Sequence, old_len: int) -> bool:
        """Trim the text at the first stop string that appeared; True when one did."""
        stops = seq.params.stop
        if not stops:
            return False
        begin = max(0, old_len - max(len(s) for s in stops) + 1)
        hits = [i for i in (seq.text.find(s, begin) for s in stops) if i >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
        return bool(hits)

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        p = seq.params
        if (token_id in self.eos_token_ids and not p.ignore_eos) or token_id in p.stop_token_ids:
            return "stop"
        old_len = len(seq.text)
        seq.text += self._incremental(seq, flush=False)
        if self._stop_string(seq, old_len) or (seq.guide is not None and seq.guide.done):
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens:
            seq.text += self._incremental(seq, flush=True)
            return "length"
        return None

    def _release(self, seq: Sequence, finished: bool) -> str:
        """The text delta to send now, holding back a suffix that may still become a stop string."""
        end = len(seq.text)
        stops = seq.params.stop
        if not finished and stops:
            for k in range(min(end - seq.num_released_chars, max(len(s) for s in stops) - 1), 0, -1):
                tail = seq.text[end - k :]
                if any(s.startswith(tail) for s in stops):
                    end -= k
                    break
        delta = seq.text[seq.num_released_chars : end]
        seq.num_released_chars = end
        return delta

    def process(
        self, seq: Sequence, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> TokenEvent:
        """The event for the token just appended to ``seq`` (its finish reason set when it ends it)."""
        finish = self._finish_reason(seq, token_id)
        return TokenEvent(
            token_id=token_id,
            text=self._release(seq, finish is not None),
            logprob=logprob,
            top_logprobs=[(self.token_piece(t), lp) for t, lp in top] if top is not None else None,
            finish_reason=finish,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_output_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
        )

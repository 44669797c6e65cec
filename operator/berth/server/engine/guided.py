"""Grammar-constrained decoding (structured outputs) through xgrammar.

A request that asks for structured output carries a ``GuidedSpec`` (JSON schema, any JSON object,
or a regular expression) in its ``SamplingParams``. ``Guides`` compiles the spec once per engine
(compiled grammars are cached by spec) against the model's tokenizer and vocabulary size, and
gives each sequence its own ``Guide``: an ``xgrammar.GrammarMatcher`` that knows which tokens may
come next. Each step, the sampler fills one row of its ``TokenBitmask`` (allocated once for the
engine's ``max_num_seqs`` rows, reused) per constrained sequence and applies the bitmask to those rows of the logits in place, on the
logits' device, before penalties' results are turned into probabilities (temperature, top-k,
top-p then only see allowed tokens), so sampling draws exactly from the model's distribution
restricted to the grammar; unconstrained rows in the same batch are untouched. The scheduler
advances the matcher with each token it appends. Preemption recomputes the KV cache from the tokens
already generated, which the matcher has already accepted, so its state stays right.

Why xgrammar rather than llguidance: it ships CPU and CUDA wheels on PyPI, compiles JSON schemas to
a cached token mask per grammar state (so a step's mask is mostly a lookup), applies the bitmask with
its own kernels on either device, and is what vLLM and SGLang default to.

JSON is generated compactly (no free whitespace between tokens): with ``any_whitespace`` a small
model at a high temperature can spend its whole budget on newlines. A grammar does not know the
token budget: an answer cut by ``max_tokens`` is not valid JSON (``finish_reason: length``), as with
OpenAI's API.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from berth.server.engine.types import GuidedSpec, ParamError

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr

logger = logging.getLogger(__name__)

_CACHE_MAX = 256  # compiled grammars kept per engine (LRU)
MAX_SCHEMA_BYTES = 64 * 1024  # a larger schema is refused (compiling one costs time on the event loop)
_SEPARATORS = (",", ":")
_LOG_PREFIX = re.compile(r"^\[[\d:.]+\]\s+\S+:\d+:\s*")


class Guide:
    """One sequence's grammar state."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher
        self.failed = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if self.failed or self._matcher.is_terminated():
            return
        if not self._matcher.accept_token(token_id):
            # Only possible if the sampled token was outside the mask (it is not, by construction):
            # end the sequence rather than let it continue unconstrained.
            logger.warning("structured output: token %d is not allowed by the grammar; ending", token_id)
            self.failed = True

    @property
    def done(self) -> bool:
        """The grammar is complete and its stop token was accepted (or the grammar failed)."""
        return self.failed or bool(self._matcher.is_terminated())


class Guides:
    """Compiles ``GuidedSpec``s for one model (thread-safe, cached) and makes per-sequence guides."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(set(stop_token_ids))
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[GuidedSpec, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> xgr.GrammarCompiler:
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def prepare(self) -> None:
        """Build the tokenizer tables now (about a second for a 50k vocabulary), not in a request."""
        with self._lock:
            self._get_compiler()

    def compile(self, spec: GuidedSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of ``spec``; ParamError naming ``spec.param`` if it does not compile."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
            compiler = self._get_compiler()
            try:
                if spec.kind == "json_schema":
                    compiled = compiler.compile_json_schema(
                        spec.value, any_whitespace=False, separators=_SEPARATORS, strict_mode=True
                    )
                elif spec.kind == "json_object":
                    compiled = compiler.compile_json_schema(
                        '{"type": "object"}', any_whitespace=False, separators=_SEPARATORS
                    )
                else:
                    compiled = compiler.compile_regex(spec.value)
            except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its reason
                reason = _reason(exc)
                raise ParamError(
                    spec.param, f"{spec.param}: the {spec.describe()} cannot be compiled: {reason}"
                ) from exc
            self._cache[spec] = compiled
            if len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
            return compiled

    def guide(self, spec: GuidedSpec) -> Guide:
        import xgrammar as xgr

        return Guide(xgr.GrammarMatcher(self.compile(spec)))


def _reason(exc: BaseException) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /project/cpp/x.cc:42: ")."""
    lines = str(exc).strip().splitlines()
    return _LOG_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


class TokenBitmask:
    """The token bitmask the guided rows of a step are filled into, reused every step (one per sampler, so
    per engine thread). Its first allocation has ``capacity`` rows (the engine's ``max_num_seqs``: no step
    has more) or the step's rows if more; a larger batch doubles it (at least to the batch), so a batch
    that grows row by row reallocates O(log rows) times, not once per row. A step uses the first rows.

    Only the rows a step fills are applied (``indices``), and filling writes a whole row, so what
    earlier steps left in the other rows is never read. Where the logits live on an accelerator the
    host mask is pinned and copied into a device mask kept alongside, so a step allocates nothing."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self._host: torch.Tensor | None = None
        self._device: torch.Tensor | None = None
        self._vocab = 0

    def _host_rows(self, batch: int, vocab: int, pinned: bool) -> torch.Tensor:
        import xgrammar as xgr

        host = self._host
        if host is None or vocab != self._vocab or host.shape[0] < batch:
            rows = max(batch, self.capacity if host is None or vocab != self._vocab else 2 * host.shape[0])
            host = xgr.allocate_token_bitmask(rows, vocab)
            self._host, self._vocab, self._device = (host.pin_memory() if pinned else host), vocab, None
        assert self._host is not None
        return self._host[:batch]

    def apply(self, logits: torch.Tensor, rows: Sequence[int], guides: Sequence[Guide]) -> None:
        """Mask (to -inf), in place, every token the guide of each row does not allow next."""
        import xgrammar as xgr

        batch, vocab = logits.shape
        mask = self._host_rows(batch, vocab, pinned=logits.device.type == "cuda")
        for r, g in zip(rows, guides, strict=True):
            g.fill(mask, r)
        if mask.device != logits.device:
            assert self._host is not None
            if self._device is None or self._device.device != logits.device:
                self._device = self._host.to(logits.device)
            mask = self._device[:batch].copy_(mask)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=list(rows))


def schema_spec(schema: Any, param: str) -> GuidedSpec:
    """A ``json_schema`` spec from a schema object (dict) or its JSON text; ParamError if neither."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ParamError(param, f"{param}: the schema is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise ParamError(param, f"{param}: the schema must be a JSON object, got {type(schema).__name__}")
    text = json.dumps(schema, separators=_SEPARATORS)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise ParamError(
            param,
            f"{param}: the schema is {len(text.encode())} bytes; at most {MAX_SCHEMA_BYTES} are accepted",
        )
    return GuidedSpec("json_schema", text, param)

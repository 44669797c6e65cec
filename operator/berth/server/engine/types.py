"""Plain data types shared by the engine and the serving layer.

This module imports nothing heavy (no torch, no transformers) so that the serving layer and
its tests can use the types without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    seed: int | None = None  # per-request torch.Generator => reproducible
    stop: tuple[str, ...] = ()  # stop strings: generation ends, the stop text is not returned
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # TGI's (CTRL-style, divides positive logits)
    logprobs: int | None = None  # None: none; 0: chosen token's logprob only; k: plus top-k alternatives
    json_mode: bool = False  # constrain output to one valid JSON object

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # LoRA adapter name, None = base model


@dataclass
class TokenEvent:
    """One per generated token (the last one carries finish_reason).

    ``text`` is the incremental text delta; text that could still turn into a stop string is
    held back and released later (or trimmed when the stop string completes), so the
    concatenation of all deltas is the final completion text.
    """

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache


class QueueFullError(Exception):
    """The waiting queue is full: serving answers 429 + Retry-After."""

    def __init__(self, message: str = "the engine's waiting queue is full", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDrainingError(Exception):
    """The engine stopped admitting requests (SIGTERM): serving answers 503."""


class AdapterNotFoundError(ValueError):
    """The request names a LoRA adapter that is not loaded."""


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # 0..1, fraction of KV blocks held by live requests
    steps: int  # decode/prefill steps executed so far
    num_prefill_tokens: int
    num_decode_tokens: int
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_blocks_total: int = 0
    num_blocks_free: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    num_aborted: int = 0


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the engine (the serving layer fills it from the command line)."""

    max_num_seqs: int = 32  # at most this many requests run (hold KV blocks) at once
    max_queue: int = 256  # at most this many wait behind them; more -> QueueFullError
    max_num_batched_tokens: int = 512  # per-step token budget (decode tokens + prefill chunks)
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = (
        None  # None => sized from memory (see kv_cache_memory_fraction / kv_cache_cpu_gib)
    )
    kv_cache_memory_fraction: float = 0.5  # CUDA: fraction of *free* device memory for the KV cache
    kv_cache_cpu_gib: float = 1.0  # CPU: KV cache size in GiB
    enable_prefix_caching: bool = True
    # Pure decode steps through the static-shape path, captured as CUDA graphs on CUDA (eager on CPU).
    cuda_graphs: bool = False
    seed: int = 0  # seeds the RNG that gives requests without a seed their own seed
    prebuild_json_vocab: bool = True  # build JSON mode's token-text table when the engine starts


@dataclass(frozen=True)
class ModelInfo:
    served_name: str
    source: str  # the model reference it was loaded from
    architecture: str
    max_model_len: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # "cpu" | "cuda" | "cuda:0" ...
    has_chat_template: bool
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    adapters: tuple[str, ...] = ()  # served side by side as "<served_name>:<adapter>"
    merged_adapters: tuple[str, ...] = ()  # merged into the base weights at load
    extra: dict[str, str] = field(default_factory=dict)

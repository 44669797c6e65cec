"""Plain data types shared by the engine, the loader and the serving layer.

This module imports nothing heavy (no torch, no transformers at run time) so that the serving
layer and its tests can use the types without loading a model. ``LoadedModel`` is what the loader
hands the engine: the only arrow between them is loader -> engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


class ParamError(ValueError):
    """A sampling parameter out of range; ``param`` names the field (serving answers 400 with it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GuidedSpec:
    """Structured output: the grammar a request's output must follow (see ``engine/guided.py``).

    ``kind`` is ``json_schema`` (``value``: the schema as canonical JSON text), ``json_object`` (any
    JSON object) or ``regex`` (``value``: the pattern). ``param`` names the request field it came
    from, for the 400 when it does not compile.
    """

    kind: str
    value: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "json_object", "regex"):
            raise ParamError(self.param, f"unknown structured output kind {self.kind!r}")

    def describe(self) -> str:
        return {
            "json_schema": "JSON schema",
            "json_object": "JSON object grammar",
            "regex": "regular expression",
        }[self.kind]


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
    guided: GuidedSpec | None = None  # structured output: the grammar the output follows
    skip_special_tokens: bool = True  # False: special tokens stay in the text (tool-call markers)

    def __post_init__(self) -> None:
        """Validated once, when made: raises ParamError naming the offending field."""
        checks = (
            ("max_tokens", self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            ("temperature", self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("top_k", self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (
                "repetition_penalty",
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                "logprobs",
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be between 0 and 20, got {self.logprobs}",
            ),
        )
        for param, ok, message in checks:
            if not ok:
                raise ParamError(param, message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # LoRA adapter name, None = base model
    multimodal: Any = None  # a multimodal.MultiModalInput for a prompt with images


@dataclass
class SampleResult:
    """What the model runner produced for one sequence in one step: its next token."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


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
    running_adapters: tuple[str, ...] = ()  # side-by-side LoRA adapters of the running requests
    waiting_adapters: tuple[str, ...] = ()  # ... and of the waiting ones
    max_lora: int = 0  # side-by-side adapters loaded (all of them, all the time)


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
    # Native backend on CPU (runner/packed.py): "fp32" (also "none": the model's own weights), "fp16", "bf16",
    # "int8" packed weights, or "auto" (fp32 or fp16, whichever decodes faster here, measured at start-up).
    weight_format: str = "fp32"
    # gguf: free the model's float weights of the linears its packs serve (runner/packed.py). Only for a model
    # this engine alone uses (berth serve): the float weights are gone from the LoadedModel afterwards.
    release_packed_weights: bool = False
    # torch threads (runner/threads.py): "auto" (1 or every usable core, timed at start-up), "N", or None (torch's).
    threads: str | None = None
    seed: int = 0  # seeds the RNG that gives requests without a seed their own seed
    prepare_guided: bool = True  # build structured output's tokenizer tables when the engine starts


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
    backend: str = "native"  # the model runner's backend: native | transformers
    extra: dict[str, str] = field(default_factory=dict)
    image_token_id: int | None = None  # set for image-text-to-text models: the placeholder token


@dataclass
class LoraWeights:
    """One side-by-side adapter: per (layer, module) the A [r, in] and B [out, r] tensors and the scale."""

    name: str
    scale: float
    weights: dict[tuple[int, str], tuple[Any, Any]] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A model ready for the engine: weights on their device, tokenizer, limits, adapters."""

    model: Any  # a transformers PreTrainedModel, eval mode, on ``device``
    tokenizer: PreTrainedTokenizerBase
    source: str
    served_name: str
    architecture: str
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    adapters: list[LoraWeights] = field(default_factory=list)  # served side by side
    merged_adapters: list[str] = field(default_factory=list)  # merged into the weights at load
    backend: str = "native"  # the model runner: "native" (Berth's own forward) or "transformers"
    image_processor: Any = None  # the model's image processor (image-text-to-text models)

    @property
    def image_token_id(self) -> int | None:
        if self.image_processor is None:
            return None
        tid = getattr(self.model.config, "image_token_id", None)
        return int(tid) if tid is not None else None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, list | tuple):
                ids.update(int(i) for i in src)
        return sorted(ids)

"""A request inside the engine: its tokens, its KV blocks, its text and stop-string state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from berth.server.engine.types import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # None or the name of a side-by-side LoRA adapter
    adapter_index: int = -1  # row into the runner's adapter table, -1 = base
    max_tokens: int = 16  # params.max_tokens clipped to the model/cache limits
    arrival: float = field(default_factory=time.monotonic)
    seed: int = 0
    generator: Any = None  # torch.Generator, created by the sampler on first use
    multimodal: Any = None  # multimodal.MultiModalInput (images of the prompt), None for text
    mm_state: Any = None  # the runner's per-sequence image embeddings / M-RoPE positions
    block_salts: dict[int, bytes] = field(default_factory=dict)  # block index -> image hash

    status: SeqStatus = SeqStatus.WAITING
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output, filled in __post_init__
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0  # of those, taken from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: str | None = None

    # Detokenisation: offsets into all_token_ids (see detokenizer.py).
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # decoded completion text so far (before stop-string trimming)
    num_released_chars: int = 0  # how much of ``text`` was sent to the client
    guide: Any = None  # guided.Guide of a structured-output request (its grammar matcher)

    def __post_init__(self) -> None:
        n = len(self.prompt_token_ids)
        self.all_token_ids = list(self.prompt_token_ids)
        self.read_offset = n
        self.prefix_offset = max(0, n - 5)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

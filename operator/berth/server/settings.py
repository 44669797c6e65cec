"""The inference server's settings: one validated object per process.

Values come from the command line (`berth serve --flag`), which wins, then from the environment
(prefix ``BERTH_``, e.g. ``BERTH_PORT``, ``BERTH_API_KEYS``), then from the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "builtin://smollm2-135m-instruct"


class ServerSettings(BaseSettings):
    """Everything `berth serve` needs, validated at start."""

    model_config = SettingsConfigDict(env_prefix="BERTH_", extra="ignore", frozen=True)

    model: str = DEFAULT_MODEL
    served_model_name: str | None = None  # default: derived from the model reference
    adapters: tuple[str, ...] = ()  # "name=dir" LoRA adapters
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=32, ge=1)
    max_queue: int = Field(default=256, ge=0)
    max_num_batched_tokens: int = Field(default=512, ge=16)
    kv_cache_memory_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    kv_cache_cpu_gib: float = Field(default=1.0, gt=0.0)
    cuda_graphs: bool = False  # decode steps as CUDA graphs (static-shape path; eager on CPU)
    api_key_dir: Path | None = None
    # Comma-separated keys; an entry "id:key" names its key id, a bare "key" gets the id "env-<n>".
    api_keys: str | None = Field(default=None, repr=False)
    log_content: bool = False  # put prompt and completion text in the access log
    drain_timeout: float = Field(default=30.0, ge=0.0)  # grace for in-flight requests after SIGTERM
    max_n: int = Field(default=8, ge=1)  # largest `n` one request may ask for
    max_stop_sequences: int = Field(default=8, ge=0)
    log_level: str = "info"
    warmup: bool = True  # run one short generation before reporting ready

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"adapter {item!r} must look like name=dir")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @model_validator(mode="after")
    def _check_api_key_dir(self) -> ServerSettings:
        if self.api_key_dir is not None and not self.api_key_dir.is_dir():
            raise ValueError(f"api_key_dir {str(self.api_key_dir)!r} is not a directory")
        return self

    def adapter_map(self) -> dict[str, str]:
        """The adapters as {name: dir}."""
        return dict(item.split("=", 1) for item in self.adapters)

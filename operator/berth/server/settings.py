"""The inference server's settings: one validated object per process, and the `berth serve` flags
generated from it (one list: each field's name, type, default and description make its flag).

Values come from the command line (`berth serve --flag`), which wins, then from the environment
(prefix ``BERTH_``, e.g. ``BERTH_PORT``, ``BERTH_API_KEYS``), then from the defaults below.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "builtin://smollm2-135m-instruct"


def _cli(**options: Any) -> dict[str, Any]:
    """How a field appears on the command line: ``flag``, ``aliases``, ``metavar``, ``hidden``, ``cli=False``."""
    return {"cli": options}


class ServerSettings(BaseSettings):
    """Everything `berth serve` needs, validated at start."""

    model_config = SettingsConfigDict(env_prefix="BERTH_", extra="ignore", frozen=True)

    model: str = Field(
        DEFAULT_MODEL, description=f"model reference: {DEFAULT_MODEL}, a HF model directory or a .gguf file"
    )
    served_model_name: str | None = Field(
        None, description="the name clients send as `model` (default: derived from --model)"
    )
    adapters: tuple[str, ...] = Field(
        (),
        description="a LoRA adapter directory; repeatable (served as <served-model-name>:<NAME>)",
        json_schema_extra=_cli(flag="--adapter", metavar="NAME=DIR"),
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    backend: Literal["auto", "native", "transformers"] = Field(
        "auto",
        description="model runner: native (Berth's Llama-family forward), transformers (any decoder transformers "
        "can build, over Berth's paged KV cache) or auto (native where it covers the model)",
    )
    trust_remote_code: bool = Field(
        False, description="run the model repository's own code when its config asks for it (auto_map)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype (auto: bf16 on CUDA, fp32 on CPU)"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    weight_format: Literal["auto", "fp32", "fp16", "bf16", "int8", "gguf"] = Field(
        "auto",
        description="native backend on CPU: fp32 (the model's weights), fp16 (weights rounded, fp32 compute), "
        "bf16, int8 (dynamic activation quantization; not exact), gguf (a .gguf model's Q4_0/Q4_1 weights "
        "as they are, bf16 activations; not exact), or auto (fp32 or fp16, whichever decodes faster on this "
        "machine, timed at start-up and logged)",
    )
    threads: str = Field(
        "auto",
        description="torch threads: N, or auto (one thread or every usable core, whichever decodes faster on "
        "this machine, timed at start-up and logged; usable cores = the CPU affinity capped by a cgroup quota)",
    )
    max_model_len: int | None = Field(None, ge=16, description="context length limit (default: the model's)")
    max_num_seqs: int = Field(32, ge=1, description="requests in the running batch at most")
    max_queue: int = Field(256, ge=0, description="requests waiting behind them at most; more get 429")
    max_num_batched_tokens: int = Field(512, ge=16, description="tokens per engine step")
    kv_cache_memory_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="CUDA: fraction of free memory for the KV cache"
    )
    kv_cache_cpu_gib: float = Field(1.0, gt=0.0, description="CPU: KV cache size in GiB")
    cuda_graphs: bool = Field(
        False, description="run decode steps as captured CUDA graphs (off until measured; see docs/engine.md)"
    )
    api_key_dir: Path | None = Field(
        None, description="directory with one API key per file (file name = key id); see also BERTH_API_KEYS"
    )
    # Comma-separated keys; an entry "id:key" names its key id, a bare "key" gets the id "env-<n>".
    api_keys: str | None = Field(None, repr=False, json_schema_extra=_cli(cli=False))
    log_content: bool = Field(False, description="put prompt and completion text into the access log")
    drain_timeout: float = Field(
        30.0,
        ge=0.0,
        description="seconds in-flight requests may take to finish after SIGTERM",
        json_schema_extra=_cli(aliases=["--grace"]),
    )
    max_n: int = Field(8, ge=1, description="largest `n` (choices) one request may ask for")
    max_stop_sequences: int = Field(8, ge=0, description="stop sequences one request may give at most")
    max_images_per_request: int = Field(8, ge=0, description="images one chat request may hold at most")
    max_image_pixels: int = Field(
        16_777_216, ge=1, description="pixels (width x height) of one decoded image at most"
    )
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="bytes of one encoded image at most")
    allow_image_urls: bool = Field(
        False,
        description="fetch http(s) image URLs from the --image-url-domain hosts (off: data: URLs only)",
    )
    image_url_domains: tuple[str, ...] = Field(
        (),
        description="a host image URLs may be fetched from (its subdomains too); repeatable",
        json_schema_extra=_cli(flag="--image-url-domain", metavar="HOST"),
    )
    image_fetch_timeout: float = Field(10.0, gt=0.0, description="seconds to fetch one image URL at most")
    log_level: str = Field("info", description="critical | error | warning | info | debug")
    warmup: bool = Field(
        True,
        description="run one short generation before reporting ready",
        json_schema_extra=_cli(hidden=True),
    )

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"adapter {item!r} must look like name=dir")
        return value

    @field_validator("threads")
    @classmethod
    def _check_threads(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            raise ValueError(f"threads must be auto or a positive integer, not {value!r}")
        return value if value == "auto" else str(int(value))

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


# ------------------------------------------------------------------------------ command line


def _cli_options(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    options = extra.get("cli") if isinstance(extra, dict) else None
    return dict(options) if isinstance(options, dict) else {}


def _base_type(annotation: Any) -> Any:
    """``X`` of ``X | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _add_flag(parser: argparse.ArgumentParser, name: str, info: FieldInfo) -> None:
    options = _cli_options(info)
    if options.get("cli") is False:
        return
    flags = [options.get("flag") or "--" + name.replace("_", "-"), *options.get("aliases", [])]
    kind = _base_type(info.annotation)
    default = info.default
    help_text = info.description or ""
    if default not in (None, (), "") and kind is not bool:
        help_text += f" (default {default})"
    kwargs: dict[str, Any] = {
        "dest": name,
        "default": None,
        "help": argparse.SUPPRESS if options.get("hidden") else help_text,
    }
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        kwargs.update(action="append", metavar=options.get("metavar"))
    elif typing.get_origin(kind) is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
    else:
        kwargs["type"] = kind if kind in (int, float, Path) else str
        if options.get("metavar"):
            kwargs["metavar"] = options["metavar"]
    parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """`berth serve`'s parser: one flag per ServerSettings field (see ``_cli``)."""
    parser = argparse.ArgumentParser(
        prog="berth serve",
        description="Serve a model over OpenAI- and TGI-compatible HTTP APIs. "
        "Every option can also be set in the environment as BERTH_<OPTION> (e.g. BERTH_PORT).",
    )
    for name, info in ServerSettings.model_fields.items():
        _add_flag(parser, name, info)
    return parser


def settings_from_args(argv: list[str]) -> ServerSettings:
    """Command line over environment (BERTH_*) over defaults; exits 2 on invalid values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "adapters" in given:
        given["adapters"] = tuple(given["adapters"])
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits

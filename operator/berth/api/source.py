"""spec.model: where the model comes from (`ModelUri`, builtin/pvc/hostpath/hf), its LoRA adapters and how
it is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from berth.api.base import (
    BUILTIN_MODEL,
    BUILTIN_MODELS,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    URI_HELP,
    URI_PATTERNS,
    ApiModel,
    Quantity,
)


@dataclass(frozen=True)
class ModelUri:
    """A parsed `model.uri`."""

    scheme: str
    # builtin: model name; pvc: claim name; hostpath: directory; hf: "org/name"
    location: str
    # pvc: path inside the claim ("" = the claim's root); hf: revision ("" = main)
    path: str = ""

    @classmethod
    def parse(cls, uri: str) -> ModelUri:
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in URI_PATTERNS or not re.match(URI_PATTERNS[scheme], uri):
            raise ValueError(f"{URI_HELP}; got {uri!r}")
        if scheme == "builtin":
            if rest not in BUILTIN_MODELS:
                raise ValueError(
                    f"unknown built-in model {rest!r}; built-in models: {', '.join(BUILTIN_MODELS)}"
                )
            return cls(scheme, rest)
        if scheme == "pvc":
            claim, _, path = rest.partition("/")
            return cls(scheme, claim, path.strip("/"))
        if scheme == "hostpath":
            return cls(scheme, rest)  # rest starts with "/"
        repo, _, revision = rest.partition("@")
        return cls(scheme, repo, revision)


class SecretKeyRef(ApiModel):
    """A key in a Secret of the ModelDeployment's namespace."""

    name: str = Field(description="Name of the Secret.", max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field("token", description="Key inside the Secret.", max_length=253)


class Adapter(ApiModel):
    """A LoRA adapter served on top of the base model."""

    name: str = Field(
        description="Adapter name; clients select it with model `<servedName>:<name>`.",
        max_length=55,  # the pod volume is named adapter-<name> (63 characters at most)
        pattern=DNS_LABEL,
    )
    uri: str = Field(
        description="Where the adapter's files are: pvc://<claim>/<path>, hostpath:///<dir> or hf://<org>/<name>.",
        max_length=1024,
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if ModelUri.parse(v).scheme == "builtin":
            raise ValueError("an adapter cannot be builtin://")
        return v


class ModelSpec(ApiModel):
    """Which model the instances serve and how it is loaded."""

    uri: str = Field(
        BUILTIN_MODEL,
        description=(
            "Model source: builtin://smollm2-135m-instruct (shipped in the server image), "
            "pvc://<claim>/<path> (a PersistentVolumeClaim, mounted read-only), hostpath:///<dir> "
            "(a directory on the node) or hf://<org>/<name>[@revision] (downloaded into a cache volume "
            "by an init container)."
        ),
        max_length=1024,
    )
    served_name: str | None = Field(
        None,
        description="The `model` value clients send. Default: metadata.name.",
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto is bfloat16 on GPUs and float32 on CPUs."
    )
    max_model_len: int | None = Field(
        None,
        description="Longest prompt plus completion, in tokens. Default: the model's own limit.",
        ge=16,
        le=1048576,
    )
    adapters: list[Adapter] = Field(
        default_factory=list,
        description="LoRA adapters. One adapter is merged into the base; several are served side by side.",
        max_length=16,
    )
    hf_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding a Hugging Face token, for hf:// models that need one."
    )
    revision: str | None = Field(
        None,
        description=(
            "hf:// only: the branch, tag or commit to download (the same as uri's @revision; give one "
            "of the two). Default: main. The download resolves it to a commit first and fetches exactly "
            "that commit; status.modelRevision publishes it."
        ),
        max_length=255,
        pattern=r"^[A-Za-z0-9._/-]+$",
    )
    cache_size: Quantity | None = Field(
        None,
        description=(
            "hf:// only: size of the download volume (an emptyDir with this sizeLimit, and the "
            "ephemeral-storage the download container requests, so the scheduler picks a node with "
            "room). Default: the operator's BERTH_MODEL_CACHE_SIZE."
        ),
    )
    trust_remote_code: bool = Field(
        False,
        description=(
            "Run the model repository's own Python code (transformers' trust_remote_code), for models "
            "whose config asks for it (e.g. ChatGLM3). Accepted only when the operator allows it "
            "(BERTH_ALLOW_REMOTE_CODE); otherwise the ModelDeployment is Failed with reason PolicyViolation."
        ),
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        ModelUri.parse(v)
        return v

    @model_validator(mode="after")
    def _one_revision(self) -> ModelSpec:
        uri = self.parsed_uri
        if self.revision is not None:
            if uri.scheme != "hf":
                raise ValueError("model.revision applies to an hf:// model.uri only")
            if uri.path and uri.path != self.revision:
                raise ValueError(
                    f"model.revision {self.revision!r} contradicts the uri's @{uri.path}: give one of the two"
                )
        return self

    @property
    def hf_revision(self) -> str:
        """The revision an hf:// model is downloaded at: model.revision, else the uri's @revision, else main."""
        return self.revision or self.parsed_uri.path or "main"

    @model_validator(mode="after")
    def _unique_adapters(self) -> ModelSpec:
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def parsed_uri(self) -> ModelUri:
        return ModelUri.parse(self.uri)

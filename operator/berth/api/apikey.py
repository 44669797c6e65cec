"""The ApiKey API (berth.dev/v1alpha1): a team's key for the gateway, as pydantic models.

The operator generates the key into a Secret owned by the ApiKey and publishes only its SHA-256
in the status, so the gateway, which checks presented keys against those hashes, reads no Secrets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from berth.api.models import API_VERSION, DNS_LABEL, ApiModel, Condition

APIKEY_KIND = "ApiKey"
APIKEY_PLURAL = "apikeys"
APIKEY_SINGULAR = "apikey"
APIKEY_SHORT_NAMES = ["ak"]

# Every limit has a default: a key nobody sized still cannot take a whole cluster.
DEFAULT_RPM = 600
DEFAULT_TPM = 1_000_000
DEFAULT_CONCURRENCY = 32


class ApiKeyLimits(ApiModel):
    """Quotas the gateway enforces for this key. Each gateway replica enforces its share
    (limit / replicas), so the cluster-wide limit holds when traffic is spread over the replicas."""

    requests_per_minute: int = Field(DEFAULT_RPM, ge=1, le=10_000_000, description="Requests per minute.")
    tokens_per_minute: int = Field(
        DEFAULT_TPM,
        ge=1,
        le=10_000_000_000,
        description="Prompt + completion tokens per minute (from upstream usage).",
    )
    max_concurrent_requests: int = Field(
        DEFAULT_CONCURRENCY, ge=1, le=100_000, description="Requests in flight at once."
    )


class ApiKeySpec(ApiModel):
    """What the key may call, and how much."""

    models: list[Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]] = Field(
        default_factory=list,
        max_length=256,
        description="ModelDeployments (names) of this namespace the key may call; empty = all of them.",
    )
    limits: ApiKeyLimits = Field(default_factory=ApiKeyLimits, description="Quotas at the gateway.")
    expires_at: datetime | None = Field(None, description="After this time (RFC 3339) the key is refused.")
    disabled: bool = Field(False, description="Refuse the key (revocation without deleting it).")


class ApiKeyUsage(ApiModel):
    """What the gateway has counted for this key (each replica adds its deltas)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    requests: int = Field(0, description="Requests answered with success.")
    prompt_tokens: int = Field(0, description="Prompt tokens, from the instances' usage.")
    completion_tokens: int = Field(0, description="Completion tokens, from the instances' usage.")
    last_used: str | None = Field(None, description="Last successful request (RFC 3339).")


class ApiKeyStatus(ApiModel):
    """What the operator published (the key's hash, never the key) and the gateway counted."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    key_id: str | None = Field(None, description="The key's id: labels metrics and logs (not secret).")
    key_hash: str | None = Field(None, description="SHA-256 (hex) of the key; the gateway matches on it.")
    secret_name: str | None = Field(None, description="The Secret (owned by this ApiKey) holding the key.")
    usage: ApiKeyUsage | None = Field(None, description="Requests and tokens counted by the gateway.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready.")
    observed_generation: int | None = Field(None, description="The spec generation last reconciled.")


class ApiKey(ApiModel):
    """A team's API key for the Berth gateway."""

    api_version: str = Field(API_VERSION, description="berth.dev/v1alpha1")
    kind: str = Field(APIKEY_KIND, description="ApiKey")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ApiKeySpec = Field(default_factory=ApiKeySpec, description="What the key may do.")
    status: ApiKeyStatus = Field(default_factory=ApiKeyStatus, description="What the operator published.")

"""The gateway's settings: one validated object per process (env prefix ``BERTH_GATEWAY_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BERTH_GATEWAY_", extra="ignore", frozen=True)

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    replicas: int = Field(
        1, ge=1, description="gateway replicas; each enforces limit/replicas of a key's quotas"
    )
    namespaces: tuple[str, ...] = Field((), description="namespaces to watch (empty: all)")
    master_key_file: Path | None = Field(
        None, description="file with the gateway master key; per-instance credentials are HMAC'd from it"
    )
    connect_timeout_seconds: float = Field(2.0, gt=0, description="connecting to an instance")
    read_timeout_seconds: float = Field(600.0, gt=0, description="between two bytes from an instance")
    max_attempts: int = Field(3, ge=1, le=10, description="endpoints tried before the first byte")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body accepted")
    usage_flush_seconds: float = Field(5.0, gt=0, description="how often usage deltas go to ApiKey.status")
    no_endpoint_retry_after_seconds: int = Field(5, ge=1, description="Retry-After when no instance is ready")
    keepalive_seconds: float = Field(
        5.0, gt=0, description="SSE comment interval while a stream waits for a wake"
    )
    kubernetes: bool = Field(True, description="watch the cluster (off: tests feed the registry)")

    def master_key(self) -> bytes | None:
        if self.master_key_file is None:
            return None
        return self.master_key_file.read_bytes().strip()

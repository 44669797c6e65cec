"""The gateway's settings: one validated object per process (env prefix ``BERTH_GATEWAY_``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


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
    previous_master_key_grace_seconds: float = Field(
        600.0,
        ge=0,
        description="after the master key file changes, how long a 401 is retried with the previous key",
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


class MasterKey:
    """The gateway master key, re-read from its mounted file (at most every `check_seconds`) so a
    rotation needs no restart: the kubelet updates a mounted Secret in place, typically within a minute.

    The key before the last change is kept (`previous`) for `grace_seconds` after the change was
    noticed, then dropped: the operator rewrites each instance's gateway-key Secret after its own copy of
    the master changed, and each instance's kubelet updates its file after that, so for a minute or two an
    instance may accept only the credential derived from the previous key. The relay retries a 401 once
    with it while it is kept; after the window a 401 is not retried (an instance still without the new
    credential is not one the rotation can wait for). `clock` is injectable for tests."""

    def __init__(
        self,
        path: Path | None,
        key: bytes | None = None,
        check_seconds: float = 1.0,
        grace_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.key = key
        self.check_seconds = check_seconds
        self.grace_seconds = grace_seconds
        self._clock = clock
        self._previous: bytes | None = None
        self._rotated = float("-inf")  # when the current key replaced `_previous`
        self._checked = clock() if key is not None else float("-inf")

    @property
    def previous(self) -> bytes | None:
        """The key before the last change, within `grace_seconds` of the change; None after (dropped)."""
        if self._previous is not None and self._clock() - self._rotated >= self.grace_seconds:
            log.info(
                "the previous gateway master key is dropped (%.0f s after the change)", self.grace_seconds
            )
            self._previous = None
        return self._previous

    def current(self) -> bytes | None:
        now = self._clock()
        if self.path is None or now - self._checked < self.check_seconds:
            return self.key
        self._checked = now
        try:
            key = self.path.read_bytes().strip() or None
        except OSError as exc:  # e.g. in the middle of the kubelet's swap: keep the one we have
            log.warning("cannot read the gateway master key %s: %s", self.path, exc.__class__.__name__)
            return self.key
        if key != self.key and key is not None:
            if self.key is not None:
                log.info(
                    "the gateway master key changed; the previous one is kept for %.0f s for instances "
                    "not updated yet",
                    self.grace_seconds,
                )
            self._previous, self.key, self._rotated = self.key, key, now
        return self.key

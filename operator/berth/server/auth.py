"""API keys: Bearer tokens checked in constant time; key ids (never keys) label metrics and logs.

Keys come from a directory (a mounted Kubernetes Secret: one key per file, the file name is the
key id) and/or from ``BERTH_API_KEYS`` (comma-separated; ``id:key`` names a key, a bare ``key``
gets the id ``env-<n>``). The directory is re-read when it changes, so a rotated Secret takes
effect without a restart (kubelet swaps the ``..data`` symlink, which changes the directory's
modification time).

With no key source configured at all, authentication is off and every request gets the key id
``anonymous``. With a key directory configured but empty, every request is refused.

The Berth gateway authenticates with its own per-instance key (id ``berth-gateway``, derived by HMAC
from the gateway master key and placed in the instance's key Secret; no tenant holds it) and names
the tenant's key id in ``X-Berth-Key-Id``. That header is honoured only from the gateway's key, so
per-key metrics stay right behind the gateway and nobody else can spoof a key id.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
GATEWAY_KEY_ID = "berth-gateway"
FORWARDED_KEY_ID_HEADER = "x-berth-key-id"
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_RELOAD_CHECK_SECONDS = 2.0


@dataclass(frozen=True)
class _Key:
    key_id: str
    secret: bytes


def parse_env_keys(value: str | None) -> list[tuple[str, str]]:
    """Parse ``BERTH_API_KEYS`` into (key id, key) pairs."""
    if not value:
        return []
    pairs: list[tuple[str, str]] = []
    for index, raw in enumerate(part.strip() for part in value.split(",")):
        if not raw:
            continue
        key_id, sep, key = raw.partition(":")
        if sep and key_id and key:
            pairs.append((key_id.strip(), key.strip()))
        else:
            pairs.append((f"env-{index}", raw))
    return pairs


def read_key_dir(directory: Path) -> list[tuple[str, str]]:
    """Read (key id, key) pairs from a directory: one key per regular file, file name = key id.

    Hidden entries (Kubernetes' ``..data`` and timestamped directories) are skipped; symlinks to
    files are followed. Surrounding whitespace (a trailing newline) is stripped; empty files are
    ignored.
    """
    pairs: list[tuple[str, str]] = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            key = entry.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read API key file %s: %s", entry.name, exc)
            continue
        if key:
            pairs.append((entry.name, key))
    return pairs


class KeyStore:
    """The set of accepted API keys."""

    def __init__(self, key_dir: Path | None = None, env_keys: str | None = None) -> None:
        self._key_dir = key_dir
        self._env_pairs = parse_env_keys(env_keys)
        self._lock = threading.Lock()
        self._keys: tuple[_Key, ...] = ()
        self._dir_stamp: float | None = None
        self._next_check = 0.0
        self.enabled = key_dir is not None or bool(self._env_pairs)
        self._load()

    def _stamp(self) -> float | None:
        if self._key_dir is None:
            return None
        try:
            stamps = [os.stat(self._key_dir).st_mtime_ns]
            data = self._key_dir / "..data"
            if data.exists():
                stamps.append(os.stat(data).st_mtime_ns)
            return float(max(stamps))
        except OSError:
            return None

    def _load(self) -> None:
        pairs = list(self._env_pairs)
        if self._key_dir is not None:
            try:
                pairs += read_key_dir(self._key_dir)
            except OSError as exc:
                log.error("cannot read API key directory %s: %s", self._key_dir, exc)
        self._keys = tuple(_Key(key_id, key.encode("utf-8")) for key_id, key in pairs)
        self._dir_stamp = self._stamp()
        if self.enabled:
            log.info("loaded %d API key(s): ids %s", len(self._keys), sorted({k.key_id for k in self._keys}))

    def _maybe_reload(self) -> None:
        if self._key_dir is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + _RELOAD_CHECK_SECONDS
            if self._stamp() != self._dir_stamp:
                self._load()

    @property
    def key_ids(self) -> list[str]:
        return [k.key_id for k in self._keys]

    def check(self, presented: str | None) -> str | None:
        """Return the key id for a presented key, or None if it matches no key.

        Every configured key is compared with ``hmac.compare_digest`` and the loop never stops
        early, so the time taken does not depend on which key (or how much of one) matched.
        """
        if not self.enabled:
            return ANONYMOUS
        self._maybe_reload()
        if not presented:
            return None
        candidate = presented.encode("utf-8")
        found: str | None = None
        for key in self._keys:
            if hmac.compare_digest(candidate, key.secret) and found is None:
                found = key.key_id
        return found

    def authenticate(self, authorization: str | None) -> str | None:
        """Check an ``Authorization`` header value; return the key id or None."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.check(token.strip())

    def authenticate_forwarded(self, authorization: str | None, forwarded_key_id: str | None) -> str | None:
        """Like `authenticate`; a request made with the gateway's key is attributed to the tenant key id
        it names (``X-Berth-Key-Id``, a short id, never a key), shown as ``gateway/<id>``."""
        key_id = self.authenticate(authorization)
        if key_id != GATEWAY_KEY_ID or not forwarded_key_id:
            return key_id
        forwarded = forwarded_key_id.strip()
        if not _KEY_ID_RE.match(forwarded):
            return key_id
        return f"gateway/{forwarded}"

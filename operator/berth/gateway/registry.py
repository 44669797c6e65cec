"""What the gateway knows: instances (from ModelDeployments and EndpointSlices) and keys (from ApiKeys).

Pure state, no I/O: the watchers in ``berth.gateway.kube`` feed it, the proxy reads it. A key only ever
sees its own namespace: a model in another namespace resolves exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime


def hash_key(key: str) -> str:
    """The SHA-256 hex digest that ``ApiKey.status.keyHash`` publishes."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def instance_credential(master: bytes, namespace: str, name: str) -> str:
    """The per-instance key the gateway presents upstream: HMAC-SHA256(master, "<ns>/<name>").

    The operator puts the same value into the instance's key Secret under the id ``berth-gateway``;
    no tenant holds it, and a leaked one opens a single instance only.
    """
    return "bgw-" + hmac.new(master, f"{namespace}/{name}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class Instance:
    """One ModelDeployment as the gateway routes to it."""

    namespace: str
    name: str
    served_name: str
    adapters: tuple[str, ...] = ()
    capacity: int = 1
    autoscaling: bool = False
    min_capacity: int = 0
    wake_timeout_seconds: float = 300.0

    def serves(self, model: str) -> bool:
        if model == self.served_name:
            return True
        base, sep, adapter = model.partition(":")
        return bool(sep) and base == self.served_name and adapter in self.adapters

    def model_ids(self) -> list[str]:
        return [self.served_name] + [f"{self.served_name}:{a}" for a in self.adapters]


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True)
class Key:
    """One ApiKey as the gateway checks it (the hash only; the gateway never sees the key)."""

    namespace: str
    name: str
    key_id: str
    key_hash: str
    models: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    disabled: bool = False
    expires_at: datetime | None = None

    def active(self, now: datetime | None = None) -> bool:
        if self.disabled:
            return False
        if self.expires_at is None:
            return True
        return (now or datetime.now(UTC)) < self.expires_at

    def may_call(self, instance: Instance) -> bool:
        return instance.namespace == self.namespace and (not self.models or instance.name in self.models)


@dataclass(frozen=True)
class Target:
    instance: Instance
    model: str  # the model name sent upstream (the bare served name, with the adapter if any)


class Registry:
    """Thread-safe: watchers write from their threads, the event loop reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[tuple[str, str], Instance] = {}
        self._endpoints: dict[tuple[str, str], dict[str, tuple[Endpoint, ...]]] = {}
        self._keys: dict[tuple[str, str], Key] = {}
        self._by_hash: dict[str, Key] = {}
        self.version = 0  # bumped on every change; waiters poll it

    # --- writers -----------------------------------------------------------------------------
    def put_instance(self, instance: Instance) -> None:
        with self._lock:
            self._instances[(instance.namespace, instance.name)] = instance
            self.version += 1

    def delete_instance(self, namespace: str, name: str) -> None:
        with self._lock:
            self._instances.pop((namespace, name), None)
            self.version += 1

    def put_slice(
        self, namespace: str, service: str, slice_name: str, endpoints: tuple[Endpoint, ...]
    ) -> None:
        with self._lock:
            self._endpoints.setdefault((namespace, service), {})[slice_name] = endpoints
            self.version += 1

    def delete_slice(self, namespace: str, service: str, slice_name: str) -> None:
        with self._lock:
            slices = self._endpoints.get((namespace, service))
            if slices is not None:
                slices.pop(slice_name, None)
                if not slices:
                    del self._endpoints[(namespace, service)]
            self.version += 1

    def put_key(self, key: Key) -> None:
        with self._lock:
            old = self._keys.get((key.namespace, key.name))
            if old is not None and self._by_hash.get(old.key_hash) is old:
                del self._by_hash[old.key_hash]
            self._keys[(key.namespace, key.name)] = key
            if key.key_hash:
                self._by_hash[key.key_hash] = key
            self.version += 1

    def delete_key(self, namespace: str, name: str) -> None:
        with self._lock:
            old = self._keys.pop((namespace, name), None)
            if old is not None and self._by_hash.get(old.key_hash) is old:
                del self._by_hash[old.key_hash]
            self.version += 1

    # --- readers -----------------------------------------------------------------------------
    def authenticate(self, presented: str | None, now: datetime | None = None) -> Key | None:
        """The active key whose hash matches the presented key, or None."""
        if not presented:
            return None
        key = self._by_hash.get(hash_key(presented))
        if key is None or not key.active(now):
            return None
        return key

    def instance(self, namespace: str, name: str) -> Instance | None:
        return self._instances.get((namespace, name))

    def key(self, namespace: str, name: str) -> Key | None:
        return self._keys.get((namespace, name))

    def endpoints(self, instance: Instance) -> tuple[Endpoint, ...]:
        with self._lock:
            slices = self._endpoints.get((instance.namespace, instance.name), {})
            seen: dict[Endpoint, None] = {}
            for eps in slices.values():
                for ep in eps:
                    seen[ep] = None
            return tuple(seen)

    def resolve(self, key: Key, model: str) -> Target | None:
        """``<namespace>/<model>`` or a bare ``<model>`` in the key's namespace; None when the key
        may not call it, exactly as when it does not exist."""
        namespace, sep, bare = model.partition("/")
        if not sep:
            namespace, bare = key.namespace, model
        if namespace != key.namespace or not bare:
            return None
        with self._lock:
            candidates = [i for (ns, _), i in sorted(self._instances.items()) if ns == namespace]
        for instance in candidates:
            if instance.serves(bare) and key.may_call(instance):
                return Target(instance, bare)
        return None

    def models_for(self, key: Key) -> list[tuple[Instance, str]]:
        with self._lock:
            instances = sorted(self._instances.values(), key=lambda i: (i.namespace, i.name))
        return [(i, m) for i in instances if key.may_call(i) for m in i.model_ids()]

    def all_keys(self) -> list[Key]:
        with self._lock:
            return list(self._keys.values())

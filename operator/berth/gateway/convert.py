"""Kubernetes objects (plain dicts) -> the gateway's registry records. Pure, unit-tested."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from berth.api.apikey import DEFAULT_CONCURRENCY, DEFAULT_RPM, DEFAULT_TPM
from berth.gateway.registry import Endpoint, Instance, Key, Limits

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def instance_of(obj: dict[str, Any]) -> Instance:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    model = spec.get("model") or {}
    auto = spec.get("autoscaling") or {}
    return Instance(
        namespace=meta["namespace"],
        name=meta["name"],
        served_name=model.get("servedName") or meta["name"],
        adapters=tuple(
            a["name"] for a in model.get("adapters") or [] if isinstance(a, dict) and a.get("name")
        ),
        capacity=_int(spec.get("capacity")) if _int(spec.get("capacity")) is not None else 1,  # type: ignore[arg-type]
        autoscaling=bool(auto.get("enabled")),
        min_capacity=_int(auto.get("minCapacity")) or 0,
        wake_timeout_seconds=float(auto.get("wakeTimeoutSeconds") or 300),
    )


def endpoints_of(obj: dict[str, Any], port_name: str = "http") -> tuple[Endpoint, ...]:
    """Ready endpoints of an EndpointSlice (``conditions.ready`` true or unset, as Kubernetes reads it)."""
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
    if port is None and len(ports) == 1:
        port = ports[0].get("port")
    if not isinstance(port, int):
        return ()
    out: list[Endpoint] = []
    for ep in obj.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        out.extend(Endpoint(addr, port) for addr in ep.get("addresses") or [])
    return tuple(out)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def key_of(obj: dict[str, Any]) -> Key:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    limits = spec.get("limits") or {}
    return Key(
        namespace=meta["namespace"],
        name=meta["name"],
        key_id=status.get("keyId") or f"{meta['namespace']}.{meta['name']}",
        key_hash=status.get("keyHash") or "",
        models=tuple(spec.get("models") or ()),
        limits=Limits(  # the CRD's defaults, should an object predate them
            _int(limits.get("requestsPerMinute")) or DEFAULT_RPM,
            _int(limits.get("tokensPerMinute")) or DEFAULT_TPM,
            _int(limits.get("maxConcurrentRequests")) or DEFAULT_CONCURRENCY,
        ),
        disabled=bool(spec.get("disabled")),
        expires_at=_time(spec.get("expiresAt")),
    )

"""The InferencePool child (Gateway API Inference Extension): made only where the cluster serves
``inference.networking.k8s.io/v1`` (its CRD is installed), looked up through API discovery at most once
a minute per client; and its status as the ModelDeployment shows it (``status.inferencePool``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Literal

from berth.api.models import InferencePoolStatus, ModelDeployment
from berth.controller import builders, kube, names
from berth.controller.settings import OperatorSettings

log = logging.getLogger(__name__)

DISCOVERY_TTL_SECONDS = 60.0

_served: weakref.WeakKeyDictionary[Any, tuple[float, bool]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def served(client: kube.Kube, now: float | None = None) -> bool:
    """Whether the cluster serves InferencePools (their CRD is installed); cached per client."""
    now = time.monotonic() if now is None else now
    with _lock:
        cached = _served.get(client)
    if cached is not None and now - cached[0] < DISCOVERY_TTL_SECONDS:
        return cached[1]
    try:
        doc = client.get(kube.INFERENCE_POOL_API, "", "")
    except kube.ApiError as exc:  # not a 404: keep the last answer, ask again next time
        log.info("cannot discover %s: %s", kube.INFERENCE_POOL_API.prefix, exc)
        return cached[1] if cached is not None else False
    found = any(r.get("name") == kube.INFERENCE_POOL.plural for r in (doc or {}).get("resources") or [])
    if cached is None or cached[1] != found:
        log.info("InferencePool CRD %s", "found: pools are made" if found else "absent: no pools")
    with _lock:
        _served[client] = (now, found)
    return found


def desired(md: ModelDeployment, settings: OperatorSettings, client: kube.Kube) -> list[Any]:
    """[(kind, name, manifest or None)] for the pool; [] where the cluster has no InferencePool CRD."""
    if not served(client):
        return []
    return [(kube.INFERENCE_POOL, names.inference_pool_name(md), builders.build_inference_pool(md, settings))]


def _parents(pool: dict[str, Any]) -> list[dict[str, Any]]:
    status = pool.get("status") or {}
    parents = status.get("parents") or status.get("parent") or []  # v1; the pre-release spelling
    return [
        p
        for p in parents
        if not (
            (p.get("parentRef") or {}).get("kind") == "Status"
            and (p.get("parentRef") or {}).get("name") == "default"
        )
    ]


def pool_status(md: ModelDeployment, pool: dict[str, Any] | None, wanted: bool) -> dict[str, Any] | None:
    """``status.inferencePool`` from the pool as read (None: no pool is wanted or can be made)."""
    if not wanted:
        return None
    name = names.inference_pool_name(md)
    if pool is None:
        out = InferencePoolStatus(
            name=name, accepted="Unknown", reason="Creating", message="the pool is being created"
        )
        return out.model_dump(mode="json", by_alias=True)
    parents = _parents(pool)
    if not parents:
        out = InferencePoolStatus(
            name=name,
            accepted="Unknown",
            reason="NoGateway",
            message="no Gateway references the pool yet (an HTTPRoute backendRef of kind InferencePool does)",
        )
        return out.model_dump(mode="json", by_alias=True)
    said: list[str] = []
    states: list[Literal["True", "False", "Unknown"]] = []
    reasons: list[str] = []
    for parent in parents:
        ref = parent.get("parentRef") or {}
        gateway = "/".join(x for x in (ref.get("namespace"), ref.get("name")) if x)
        cond: dict[str, Any] = next(
            (c for c in parent.get("conditions") or [] if c.get("type") == "Accepted"), {}
        )
        raw = cond.get("status")
        state: Literal["True", "False", "Unknown"] = raw if raw in ("True", "False") else "Unknown"
        states.append(state)
        reasons.append(str(cond.get("reason") or ""))
        said.append(
            f"{ref.get('kind') or 'Gateway'} {gateway}: Accepted={state}"
            + (f" ({cond.get('message')})" if cond.get("message") else "")
        )
    accepted = "True" if all(s == "True" for s in states) else "False" if "False" in states else "Unknown"
    reason = "Accepted"
    if accepted != "True":
        reason = next((r for s, r in zip(states, reasons, strict=True) if s != "True" and r), "NotAccepted")
    out = InferencePoolStatus(name=name, accepted=accepted, reason=reason, message="; ".join(said)[:1000])
    return out.model_dump(mode="json", by_alias=True)

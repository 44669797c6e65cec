"""kopf handlers: thin. Parse, call reconcile, translate errors. Never sleep here.

One reconcile path serves create, update, resume, the resync timer and the watches on the owned
Deployments and Pods (so status follows them within seconds). Reconciles of one ModelDeployment are
serialised by a per-object lock; different objects run in parallel on kopf's thread pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import kopf
import pydantic

from berth.api.models import GROUP, KIND, PLURAL, VERSION
from berth.controller import builders, kube, metrics
from berth.controller.autoscaler import Autoscaler
from berth.controller.loops import Loop, is_leader
from berth.controller.reconcile import managed_status, reconcile
from berth.controller.settings import get_settings
from berth.controller.status import failed_status

SETTINGS = get_settings()
# Filled in by `berth operator` before kopf starts: watched namespaces and this process's peering priority.
RUNTIME: dict[str, Any] = {}
log = logging.getLogger(__name__)
MANAGED = {"app.kubernetes.io/managed-by": builders.MANAGED_BY}

_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_client: kube.Kube | None = None
_autoscaler: Autoscaler | None = None


def client() -> kube.Kube:
    global _client
    if _client is None:
        _client = kube.KubeClient()
    return _client


def spec_error_message(error: pydantic.ValidationError) -> str:
    """Name the field: `spec.autoscaling: autoscaling.minCapacity (3) must not exceed maxCapacity (1)`."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # the operator records its own, meaningful events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 8


def run_reconcile(
    namespace: str, name: str, trigger: str, logger: Any, *, permanent_on_invalid: bool
) -> None:
    """Reconcile one ModelDeployment from a fresh read, under its lock (the caller's copy may be stale:
    acting on an old spec.capacity would undo a scale that just happened)."""
    started = time.monotonic()
    with _locks[(namespace, name)]:
        now = datetime.now(UTC)
        body: dict[str, Any] | None = None
        try:
            body = client().get(kube.MODEL_DEPLOYMENT, namespace, name)
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                return
            result = reconcile(body, client(), SETTINGS, now)
        except pydantic.ValidationError as e:
            assert body is not None  # only reconcile() validates
            _record_failure(body, "InvalidSpec", spec_error_message(e), now)
            metrics.RECONCILES.labels(trigger=trigger, result="invalid").inc()
            if permanent_on_invalid:
                raise kopf.PermanentError(spec_error_message(e)) from None
            return
        except kube.ApiError as e:
            metrics.RECONCILES.labels(trigger=trigger, result="error").inc()
            if e.status in (400, 422) and body is not None:
                # The API server refused a child built from this spec (e.g. a name that is no DNS label):
                # say so on the resource; retry later, as a fix may come from an edit or an admission change.
                _record_failure(body, "ChildRejected", f"the API server refused a child: {e.message}", now)
                raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=60) from None
            raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=5) from None
        finally:
            metrics.RECONCILE_SECONDS.labels(trigger=trigger).observe(time.monotonic() - started)
    metrics.RECONCILES.labels(trigger=trigger, result="ok").inc()
    metrics.record_phase(namespace, name, result.status.get("phase"))
    if result.actions or result.status_written:
        logger.info(
            "reconciled (%s): %s; phase %s",
            trigger,
            ", ".join(f"{a.verb} {a.kind.kind}" for a in result.actions) or "status",
            result.status.get("phase"),
        )


def _record_failure(body: dict[str, Any], reason: str, message: str, now: datetime) -> None:
    """Phase Failed with a False Ready condition naming the cause; children of the last valid spec stay."""
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace")), str(meta.get("name"))
    status = failed_status(body, message, now, body.get("status"), reason=reason)
    metrics.record_phase(ns, name, "Failed")
    if managed_status(status) != managed_status(body.get("status") or {}):
        client().patch_status(kube.MODEL_DEPLOYMENT, ns, name, status)
        client().create(kube.EVENT, ns, _event(body, "Warning", reason, message, now))


def _event(body: dict[str, Any], type_: str, reason: str, message: str, now: datetime) -> dict[str, Any]:
    from berth.controller.reconcile import event_body
    from berth.controller.status import EventSpec

    return event_body(body, EventSpec(type_, reason, message), now)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_spec(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    run_reconcile(
        str(body.metadata.namespace), str(body.metadata.name), "spec", logger, permanent_on_invalid=True
    )


def autoscaler() -> Autoscaler:
    global _autoscaler
    if _autoscaler is None:
        _autoscaler = Autoscaler(client(), SETTINGS)
    return _autoscaler


def _resync(body: dict[str, Any]) -> None:
    meta = body["metadata"]
    run_reconcile(str(meta["namespace"]), str(meta["name"]), "timer", log, permanent_on_invalid=False)


def _autoscale(listed: dict[str, Any]) -> None:
    ns, name = str(listed["metadata"]["namespace"]), str(listed["metadata"]["name"])
    if not ((listed.get("spec") or {}).get("autoscaling") or {}).get("enabled"):
        autoscaler().forget(ns, name)
        return
    body = client().get(
        kube.MODEL_DEPLOYMENT, ns, name
    )  # the listed copy may be older than a scale just made
    if body is None:
        return
    try:
        autoscaler().tick(body, datetime.now(UTC), time.monotonic())
    except pydantic.ValidationError:
        return  # an invalid spec is reported by the reconcile path


def start_loops(namespaces: list[str], priority: int) -> list[Loop]:
    """The resync and autoscaling loops (operator-wide: no per-object kopf timers, so no finalizers)."""

    def leader() -> bool:
        return is_leader(client(), SETTINGS.peering, namespaces, priority, datetime.now(UTC))

    loops = [
        Loop("resync", SETTINGS.resync_seconds, client(), namespaces, _resync, leader),
        Loop("autoscale", SETTINGS.autoscale_interval_seconds, client(), namespaces, _autoscale, leader),
    ]
    for loop in loops:
        loop.start()
    return loops


@kopf.on.startup()
def on_startup(memo: kopf.Memo, **_: Any) -> None:
    memo["loops"] = start_loops(list(RUNTIME.get("namespaces", [])), int(RUNTIME.get("priority", 0)))


@kopf.on.cleanup()
def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    for loop in memo.get("loops", []):
        loop.stop()


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_delete(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (garbage collector); only forget the metrics. No finalizer is added."""
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace")), str(meta.get("name"))
    metrics.record_phase(ns, name, None)
    autoscaler().forget(ns, name)
    _locks.pop((ns, name), None)


def _owner_name(body: kopf.Body) -> str | None:
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller"):
            return str(ref.get("name"))
    return None


def _refresh_owner(namespace: str, name: str, trigger: str, logger: kopf.Logger) -> None:
    run_reconcile(namespace, name, trigger, logger, permanent_on_invalid=False)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
def on_deployment_event(body: kopf.Body, type: str | None, logger: kopf.Logger, **_: Any) -> None:
    owner = _owner_name(body)
    if owner and type is not None:  # type None: the initial listing, covered by resume
        _refresh_owner(str(body.metadata.namespace), owner, "deployment", logger)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
def on_pod_event(body: kopf.Body, type: str | None, logger: kopf.Logger, **_: Any) -> None:
    owner = (body.get("metadata") or {}).get("labels", {}).get(builders.SELECTOR_LABEL)
    if owner and type is not None:
        _refresh_owner(str(body.metadata.namespace), str(owner), "pod", logger)

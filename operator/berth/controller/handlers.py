"""kopf handlers: thin. Parse, call reconcile, translate errors. Never sleep here.

One reconcile path serves create, update, resume, the resync timer and the watches on the owned
Deployments and Pods (so status follows them within seconds). Reconciles of one ModelDeployment are
serialised by a per-object lock; different objects run in parallel on kopf's thread pool. The state
they share (client, autoscaler, locks, loops) is one `OperatorContext` in kopf's memo.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import kopf
import pydantic

from berth.api.models import GROUP, PLURAL, VERSION
from berth.controller import kube, metrics, names
from berth.controller.context import MEMO_KEY, OperatorContext, from_memo
from berth.controller.events import EventSpec, emit
from berth.controller.loops import Loop
from berth.controller.policy import PolicyViolation
from berth.controller.reconcile import Result, reconcile
from berth.controller.settings import get_settings
from berth.controller.status import failed_status, managed_status

log = logging.getLogger(__name__)


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


def _api_failure(e: kube.ApiError, trigger: str, delay: float) -> kopf.TemporaryError:
    metrics.RECONCILES.labels(trigger=trigger, result="error").inc()
    return kopf.TemporaryError(f"Kubernetes API: {e}", delay=delay)


def _reconcile_fresh(
    ctx: OperatorContext, namespace: str, name: str, trigger: str, *, permanent_on_invalid: bool
) -> Result | None:
    """Read the ModelDeployment and reconcile it; None when it is gone or its spec is invalid."""
    now = datetime.now(UTC)
    try:
        body = ctx.client.get(kube.MODEL_DEPLOYMENT, namespace, name)
    except kube.ApiError as e:
        raise _api_failure(e, trigger, delay=5) from None
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    try:
        return reconcile(body, ctx.client, ctx.settings, now)
    except pydantic.ValidationError as e:
        _record_failure(ctx, body, "InvalidSpec", spec_error_message(e), now)
        metrics.RECONCILES.labels(trigger=trigger, result="invalid").inc()
        if permanent_on_invalid:
            raise kopf.PermanentError(spec_error_message(e)) from None
        return None
    except PolicyViolation as e:
        _record_failure(ctx, body, "PolicyViolation", str(e), now)
        metrics.RECONCILES.labels(trigger=trigger, result="invalid").inc()
        if permanent_on_invalid:
            raise kopf.PermanentError(str(e)) from None
        return None
    except kube.Rejected as e:
        # The API server refused a child built from this spec (e.g. a name that is no DNS label): say so
        # on the resource; retry later, as a fix may come from an edit or an admission change.
        failure = _api_failure(e, trigger, delay=60)
        _record_failure(ctx, body, "ChildRejected", f"the API server refused a child: {e.message}", now)
        raise failure from None
    except kube.ApiError as e:
        raise _api_failure(e, trigger, delay=5) from None


def run_reconcile(
    ctx: OperatorContext, namespace: str, name: str, trigger: str, logger: Any, *, permanent_on_invalid: bool
) -> None:
    """Reconcile one ModelDeployment from a fresh read, under its lock (the caller's copy may be stale:
    acting on an old spec.capacity would undo a scale that just happened)."""
    started = time.monotonic()
    with ctx.lock(namespace, name):
        try:
            result = _reconcile_fresh(
                ctx, namespace, name, trigger, permanent_on_invalid=permanent_on_invalid
            )
        finally:
            metrics.RECONCILE_SECONDS.labels(trigger=trigger).observe(time.monotonic() - started)
    if result is None:
        return
    metrics.RECONCILES.labels(trigger=trigger, result="ok").inc()
    metrics.record_phase(namespace, name, result.status.get("phase"))
    if result.actions or result.status_written:
        logger.info(
            "reconciled (%s): %s; phase %s",
            trigger,
            ", ".join(f"{a.verb} {a.kind.kind}" for a in result.actions) or "status",
            result.status.get("phase"),
        )


def _record_failure(
    ctx: OperatorContext, body: dict[str, Any], reason: str, message: str, now: datetime
) -> None:
    """Phase Failed with a False Ready condition naming the cause; children of the last valid spec stay."""
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace")), str(meta.get("name"))
    status = failed_status(body, message, now, body.get("status"), reason=reason)
    metrics.record_phase(ns, name, "Failed")
    if managed_status(status) != managed_status(body.get("status") or {}):
        ctx.client.patch_status(kube.MODEL_DEPLOYMENT, ns, name, status)
        emit(ctx.client, body, [EventSpec("Warning", reason, message)], now)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_spec(body: kopf.Body, logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    run_reconcile(
        from_memo(memo),
        str(body.metadata.namespace),
        str(body.metadata.name),
        "spec",
        logger,
        permanent_on_invalid=True,
    )


def _resync(ctx: OperatorContext, body: dict[str, Any]) -> None:
    meta = body["metadata"]
    run_reconcile(ctx, str(meta["namespace"]), str(meta["name"]), "timer", log, permanent_on_invalid=False)


def _autoscale(ctx: OperatorContext, listed: dict[str, Any]) -> None:
    ns, name = str(listed["metadata"]["namespace"]), str(listed["metadata"]["name"])
    if not ((listed.get("spec") or {}).get("autoscaling") or {}).get("enabled"):
        ctx.autoscaler.forget(ns, name)
        return
    # the listed copy may be older than a scale just made
    body = ctx.client.get(kube.MODEL_DEPLOYMENT, ns, name)
    if body is None:
        return
    try:
        ctx.autoscaler.tick(body, datetime.now(UTC), time.monotonic())
    except pydantic.ValidationError:
        return  # an invalid spec is reported by the reconcile path


def start_loops(ctx: OperatorContext) -> list[Loop]:
    """The resync and autoscaling loops (operator-wide: no per-object kopf timers, so no finalizers),
    run only while this replica holds the leader Lease (controller/leader.py)."""

    elector = ctx.make_elector()
    elector.start()

    def resync(body: dict[str, Any]) -> None:
        _resync(ctx, body)

    def autoscale(body: dict[str, Any]) -> None:
        _autoscale(ctx, body)

    settings = ctx.settings
    loops = [
        Loop("resync", settings.resync_seconds, ctx.client, ctx.namespaces, resync, elector.is_leader),
        Loop(
            "autoscale",
            settings.autoscale_interval_seconds,
            ctx.client,
            ctx.namespaces,
            autoscale,
            elector.is_leader,
        ),
    ]
    for loop in loops:
        loop.start()
    return loops


@kopf.on.startup()
def on_startup(memo: kopf.Memo, **_: Any) -> None:
    # `berth operator` passes the context to kopf.run; under a bare `kopf run` it is made here, before
    # kopf copies this memo for each resource.
    if MEMO_KEY not in memo:
        memo[MEMO_KEY] = OperatorContext.create(get_settings())
    ctx = from_memo(memo)
    ctx.loops = start_loops(ctx)


@kopf.on.cleanup()
def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctx = from_memo(memo)
    for loop in ctx.loops:
        loop.stop()
    if ctx.elector is not None:
        ctx.elector.stop()  # hands the Lease back: another replica takes the loops over at once


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Children go with their owner (garbage collector); only forget the metrics. No finalizer is added."""
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace")), str(meta.get("name"))
    metrics.record_phase(ns, name, None)
    from_memo(memo).forget(ns, name)


def _refresh_owner(memo: kopf.Memo, namespace: str, name: str, trigger: str, logger: kopf.Logger) -> None:
    run_reconcile(from_memo(memo), namespace, name, trigger, logger, permanent_on_invalid=False)


@kopf.on.event("apps", "v1", "deployments", labels=names.MANAGED_LABELS)
def on_deployment_event(
    body: kopf.Body, type: str | None, logger: kopf.Logger, memo: kopf.Memo, **_: Any
) -> None:
    owner = names.owner_name(body)
    if owner and type is not None:  # type None: the initial listing, covered by resume
        _refresh_owner(memo, str(body.metadata.namespace), owner, "deployment", logger)


@kopf.on.event("", "v1", "pods", labels=names.MANAGED_LABELS)
def on_pod_event(body: kopf.Body, type: str | None, logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    owner = (body.get("metadata") or {}).get("labels", {}).get(names.SELECTOR_LABEL)
    if owner and type is not None:
        _refresh_owner(memo, str(body.metadata.namespace), str(owner), "pod", logger)

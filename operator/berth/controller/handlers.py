"""kopf handlers: thin. They start and stop the operator's machinery; they reconcile nothing themselves.

ModelDeployments and their children reach the operator through its own list-watch caches
(`cache.py`), whose events only enqueue the ModelDeployment's key; N workers (settings.workers) take
keys from the work queue and reconcile them from the caches (`loops.Reconciler`), so a handler never
holds a kopf worker, never sleeps and never makes an API call per event. kopf still runs the process:
settings, the ApiKey handlers (apikey_handlers.py), the liveness endpoint, startup and cleanup. The
shared state is one `OperatorContext` in kopf's memo.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import kopf
import pydantic

from berth.api.models import GROUP
from berth.controller import kube
from berth.controller.context import MEMO_KEY, OperatorContext, from_memo
from berth.controller.loops import Loop, spec_error_message
from berth.controller.settings import get_settings

log = logging.getLogger(__name__)

__all__ = ["spec_error_message", "start_loops", "start_runtime"]


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
    settings.execution.max_workers = 4


def _autoscale(ctx: OperatorContext, listed: dict[str, Any]) -> None:
    ns, name = str(listed["metadata"]["namespace"]), str(listed["metadata"]["name"])
    if not ((listed.get("spec") or {}).get("autoscaling") or {}).get("enabled"):
        ctx.autoscaler.forget(ns, name)
        return
    body = ctx.client.get(kube.MODEL_DEPLOYMENT, ns, name)  # the cache's newest copy
    if body is None:
        return
    try:
        ctx.autoscaler.tick(body, datetime.now(UTC), time.monotonic())
    except pydantic.ValidationError:
        return  # an invalid spec is reported by the reconcile path


def start_loops(ctx: OperatorContext) -> list[Loop]:
    """The resync (enqueues every key) and autoscaling loops, run only while this replica holds the
    leader Lease (controller/leader.py); the resync also runs at once when the lease is won."""
    if ctx.elector is None:
        ctx.make_elector().start()

    def resync(body: dict[str, Any]) -> None:
        meta = body["metadata"]
        ctx.enqueue(str(meta["namespace"]), str(meta["name"]), "timer")

    def autoscale(body: dict[str, Any]) -> None:
        _autoscale(ctx, body)

    settings = ctx.settings
    loops = [
        Loop(
            "resync", settings.resync_seconds, ctx.client, ctx.namespaces, resync, ctx.is_leader, eager=True
        ),
        Loop(
            "autoscale",
            settings.autoscale_interval_seconds,
            ctx.client,
            ctx.namespaces,
            autoscale,
            ctx.is_leader,
        ),
    ]
    for loop in loops:
        loop.start()
    return loops


def start_runtime(ctx: OperatorContext) -> None:
    """The leader election, the watches (waiting for their first LIST), the workers (which act only
    while this replica leads), then the loops (whose resync enqueues every key when the lease is won)."""
    ctx.make_elector().start()
    ctx.start_watches()
    assert ctx.queue is not None
    ctx.queue.start()
    ctx.loops = start_loops(ctx)
    log.info(
        "watch caches synced (%s); %d reconcile workers",
        ", ".join(f"{k} {len(s)}" for k, s in ctx.caches.stores.items()),
        ctx.settings.workers,
    )


@kopf.on.startup()
def on_startup(memo: kopf.Memo, **_: Any) -> None:
    # `berth operator` passes the context to kopf.run; under a bare `kopf run` it is made here, before
    # kopf copies this memo for each resource.
    if MEMO_KEY not in memo:
        memo[MEMO_KEY] = OperatorContext.create(get_settings())
    start_runtime(from_memo(memo))


@kopf.on.cleanup()
def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    from_memo(memo).stop()

"""The operator's background work: the work queue's reconciler, the level-triggered resync and the
autoscaler.

- `Reconciler` is the work queue's handler: it reconciles one ModelDeployment key from the watch
  caches and turns what can go wrong into the right next step: an invalid spec or a policy violation
  is a Failed status (no retry: an edit brings the key back); a 403 (RBAC, a ResourceQuota, an
  admission plugin) a False condition that quotes the API server and a retry with backoff; a 429 a
  retry after the server's Retry-After at least; any other API error a retry with per-key
  exponential backoff and jitter.
- `Loop` runs a pass over every ModelDeployment in the cache every `interval` seconds. These are
  operator-wide loops instead of kopf per-object timers, because kopf puts a finalizer on every
  object that has a timer: a ModelDeployment could then not be deleted while the operator is down.
  The resync pass only enqueues keys. Only the replica that holds the leader Lease (`leader.py`)
  reconciles and runs the loops; a replica that becomes leader enqueues every key at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Any

import pydantic

from berth.controller import kube, metrics
from berth.controller.backoff import Backoff
from berth.controller.events import EventRecorder, EventSpec
from berth.controller.policy import PolicyViolation
from berth.controller.reconcile import reconcile
from berth.controller.settings import OperatorSettings
from berth.controller.status import failed_status, managed_status

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]
Key = tuple[str, str]


def spec_error_message(error: pydantic.ValidationError) -> str:
    """Name the field: `spec.autoscaling: autoscaling.minCapacity (3) must not exceed maxCapacity (1)`."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class Reconciler:
    """Reconcile one ModelDeployment key (the work queue's handler); returns the retry delay or None."""

    def __init__(
        self,
        client: kube.Kube,
        settings: OperatorSettings,
        backoff: Backoff,
        recorder: EventRecorder,
        leader: Callable[[], bool] = lambda: True,
        trigger: Callable[[Key], str] = lambda key: "queue",
    ) -> None:
        self.client = client
        self.settings = settings
        self.backoff = backoff
        self.recorder = recorder
        self.leader = leader
        self.trigger = trigger

    def __call__(self, key: Key) -> float | None:
        trigger = self.trigger(key)
        if not self.leader():
            return None  # a replica that becomes leader enqueues every key (the resync loop)
        ns, name = key
        body = self.client.get(kube.MODEL_DEPLOYMENT, ns, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            self.backoff.success(key)
            return None
        started = time.monotonic()
        try:
            return self._reconcile(key, body, trigger)
        finally:
            metrics.RECONCILE_SECONDS.labels(trigger=trigger).observe(time.monotonic() - started)

    def _reconcile(self, key: Key, body: dict[str, Any], trigger: str) -> float | None:
        ns, name = key
        now = datetime.now(UTC)
        log.debug("reconcile %s/%s (%s)", ns, name, trigger)
        try:
            result = reconcile(body, self.client, self.settings, now, recorder=self.recorder)
        except pydantic.ValidationError as e:
            self._failed(body, "InvalidSpec", spec_error_message(e), now)
            self._done(key, trigger, "invalid")
            return None
        except PolicyViolation as e:
            self._failed(body, "PolicyViolation", str(e), now)
            self._done(key, trigger, "invalid")
            return None
        except kube.TooManyRequests as e:
            delay = self.backoff.failure(key, e.retry_after)
            metrics.RECONCILES.labels(trigger=trigger, result="throttled").inc()
            log.info("%s/%s: the API server asks to slow down (%s); again in %.1fs", ns, name, e, delay)
            return delay
        except kube.Forbidden as e:
            # RBAC, a ResourceQuota, an admission plugin: say so on the resource, quoting the server
            self._failed(body, "Forbidden", f"the API server forbade a write: {e.message}", now)
            return self._retry(key, trigger, "forbidden", e)
        except kube.Rejected as e:
            # a child built from this spec was refused (e.g. a name that is no DNS label): a fix may
            # come from an edit or an admission change
            self._failed(body, "ChildRejected", f"the API server refused a child: {e.message}", now)
            return self._retry(key, trigger, "rejected", e)
        except kube.ApiError as e:
            return self._retry(key, trigger, "error", e)
        self.backoff.success(key)
        metrics.RECONCILES.labels(trigger=trigger, result="ok").inc()
        metrics.record_phase(ns, name, result.status.get("phase"))
        if result.actions or result.status_written:
            log.info(
                "reconciled %s/%s (%s): %s; phase %s",
                ns,
                name,
                trigger,
                ", ".join(f"{a.verb} {a.kind.kind}" for a in result.actions) or "status",
                result.status.get("phase"),
            )
        return None

    def _done(self, key: Key, trigger: str, result: str) -> None:
        self.backoff.success(key)
        metrics.RECONCILES.labels(trigger=trigger, result=result).inc()

    def _retry(self, key: Key, trigger: str, result: str, error: kube.ApiError) -> float:
        delay = self.backoff.failure(key, error.retry_after)
        metrics.RECONCILES.labels(trigger=trigger, result=result).inc()
        log.warning("%s/%s: %s; again in %.1fs", key[0], key[1], error, delay)
        return delay

    def _failed(self, body: dict[str, Any], reason: str, message: str, now: datetime) -> None:
        """Phase Failed with a False Ready condition naming the cause; children of the last valid spec
        stay. Written (and an Event recorded) only when it changes the status."""
        meta = body.get("metadata") or {}
        ns, name = str(meta.get("namespace")), str(meta.get("name"))
        status = failed_status(body, message, now, body.get("status"), reason=reason)
        metrics.record_phase(ns, name, "Failed")
        if managed_status(status) == managed_status(body.get("status") or {}):
            return
        try:
            self.client.patch_status(kube.MODEL_DEPLOYMENT, ns, name, status)
        except kube.ApiError as e:
            log.warning("%s/%s: could not record %s: %s", ns, name, reason, e)
            return
        self.recorder.emit(self.client, body, [EventSpec("Warning", reason, message)], now)

    def on_error(self, key: Hashable, error: Exception) -> float:
        """A bug, not an API error (those are handled above): log it and try again later."""
        log.error("reconcile of %s failed unexpectedly", key, exc_info=error)
        metrics.RECONCILES.labels(trigger="queue", result="error").inc()
        return self.backoff.failure(key)


class Loop:
    """Call `handle(body)` for every ModelDeployment every `interval` seconds, in a daemon thread,
    while `leader()`; with `eager`, also at once when this replica becomes the leader."""

    def __init__(
        self,
        name: str,
        interval: float,
        client: kube.Kube,
        namespaces: list[str],
        handle: Handler,
        leader: Callable[[], bool] = lambda: True,
        eager: bool = False,
        poll: float = 1.0,
    ) -> None:
        self.name = name
        self.interval = interval
        self.client = client
        self.namespaces = namespaces
        self.handle = handle
        self.leader = leader
        self.eager = eager
        self.poll = poll
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"berth-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def once(self) -> int:
        """One pass over every ModelDeployment; returns how many were handled."""
        handled = 0
        for ns in self.namespaces or [""]:
            for body in self.client.list(kube.MODEL_DEPLOYMENT, ns, ""):
                if self.stopped.is_set():
                    return handled
                if (body.get("metadata") or {}).get("deletionTimestamp"):
                    continue
                try:
                    self.handle(body)
                except Exception as e:  # one bad object must not stop the loop for the others
                    meta = body.get("metadata") or {}
                    log.warning(
                        "%s of %s/%s failed: %s", self.name, meta.get("namespace"), meta.get("name"), e
                    )
                handled += 1
        return handled

    def _run(self) -> None:
        was_leader = False
        due = time.monotonic() + self.interval
        while not self.stopped.wait(min(self.poll, self.interval)):
            try:
                leader = self.leader()
                now = time.monotonic()
                if leader and (now >= due or (self.eager and not was_leader)):
                    due = now + self.interval
                    self.once()
                was_leader = leader
            except Exception as e:  # the API server may be away for a while; try again next period
                log.warning("%s pass failed: %s", self.name, e)

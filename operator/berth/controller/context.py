"""The operator process's state, handed to the kopf handlers through kopf's memo (no module globals).

`berth operator` builds one `OperatorContext` and passes it to `kopf.run(memo=...)`; kopf gives every
handler a shallow copy of that memo, so all of them share this one object: the API client (rate
limited: settings.api_qps / api_burst), the watch caches and the `CachedKube` that reads them, the
work queue of ModelDeployment keys with its workers and backoff, the Event recorder, the
autoscaler's per-object state and the operator-wide loops.

Watch events only enqueue: a ModelDeployment's own change (spec, labels, deletion) at once, a change
of one of its children or pods after `child_event_delay` (so the 50 pod events of a rollout are a
few reconciles, not 50). Status-only changes of a ModelDeployment (its own writes) enqueue nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.controller import inference_pool, kube, metrics
from berth.controller.autoscaler import Autoscaler
from berth.controller.backoff import Backoff, TokenBucket
from berth.controller.cache import (
    Caches,
    OnChange,
    inference_pool_spec,
    operator_specs,
    owner_of,
    remembered_specs,
)
from berth.controller.cached_kube import CachedKube
from berth.controller.events import EventRecorder
from berth.controller.leader import LeaseElector, default_identity
from berth.controller.loops import Loop, Reconciler
from berth.controller.settings import OperatorSettings
from berth.controller.workqueue import WorkQueue

log = logging.getLogger(__name__)

MEMO_KEY = "berth"
Key = tuple[str, str]  # (namespace, name) of a ModelDeployment

# Seconds a child's or pod's event waits in the queue, so that a burst of them is one reconcile.
CHILD_EVENT_DELAY = 1.0


def _spec_changed(old: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    """Whether a ModelDeployment change is more than a status write (its own, or the autoscaler's)."""
    if old is None or new is None:
        return True
    o, n = old.get("metadata") or {}, new.get("metadata") or {}
    return (
        old.get("spec") != new.get("spec")
        or o.get("generation") != n.get("generation")
        or o.get("labels") != n.get("labels")
        or o.get("deletionTimestamp") != n.get("deletionTimestamp")
        or o.get("uid") != n.get("uid")
    )


@dataclass
class OperatorContext:
    settings: OperatorSettings
    api: kube.Kube  # the API server itself (rate limited)
    caches: Caches
    client: CachedKube  # what reconcile and the autoscaler read and write through
    autoscaler: Autoscaler
    backoff: Backoff
    recorder: EventRecorder
    namespaces: list[str] = field(default_factory=list)  # watched namespaces; empty: the whole cluster
    priority: int = 0  # this process's kopf peering priority
    loops: list[Loop] = field(default_factory=list)
    elector: LeaseElector | None = None  # made by make_elector() when the loops start
    queue: WorkQueue[Key] | None = None
    source_factory: Callable[[], Any] | None = None  # a client for each watch (its own connection)
    child_event_delay: float = CHILD_EVENT_DELAY
    _triggers: dict[Key, str] = field(default_factory=dict, init=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def create(
        cls,
        settings: OperatorSettings,
        namespaces: list[str] | None = None,
        priority: int = 0,
        client: kube.Kube | None = None,
    ) -> OperatorContext:
        source_factory: Callable[[], Any] | None = None
        if client is None:
            limiter = TokenBucket(settings.api_qps, settings.api_burst)
            client = kube.KubeClient(limiter=limiter, pool_size=settings.workers + 4)
            source_factory = lambda: kube.KubeClient(pool_size=2)  # noqa: E731
        caches = Caches(operator_specs(), remembered_specs())
        cached = CachedKube(client, caches)
        ctx = cls(
            settings,
            client,
            caches,
            cached,
            Autoscaler(cached, settings),
            Backoff(
                settings.backoff_base_seconds,
                max(settings.backoff_max_seconds, settings.backoff_base_seconds),
            ),
            EventRecorder(settings.event_repeat_seconds),
            list(namespaces or []),
            priority,
            source_factory=source_factory,
        )
        reconciler = Reconciler(
            cached, settings, ctx.backoff, ctx.recorder, leader=ctx.is_leader, trigger=ctx.take_trigger
        )
        ctx.queue = WorkQueue(reconciler, reconciler.on_error, workers=settings.workers)
        return ctx

    # ---- leadership ----------------------------------------------------------------------------

    def make_elector(self) -> LeaseElector:
        lease = self.settings.leader_election_lease_seconds
        self.elector = LeaseElector(
            self.api,
            self.settings.operator_namespace,
            self.settings.leader_election_lease_name,
            default_identity(),
            lease_seconds=lease,
            renew_deadline=lease * 2 / 3,
            retry=lease / 5,
        )
        return self.elector

    def is_leader(self) -> bool:
        """Whether this replica reconciles (no elector yet, as in unit tests: yes)."""
        return self.elector is None or self.elector.is_leader()

    # ---- the queue -----------------------------------------------------------------------------

    def enqueue(self, namespace: str, name: str, trigger: str, delay: float = 0.0) -> None:
        assert self.queue is not None
        key = (namespace, name)
        with self._guard:
            self._triggers.setdefault(key, trigger)
        if delay > 0:
            self.queue.add_after(key, delay)
        else:
            self.queue.add(key)

    def take_trigger(self, key: Key) -> str:
        with self._guard:
            return self._triggers.pop(key, "retry")

    def on_change(self, kind: kube.Kind) -> OnChange:
        """The watch listener for `kind`: enqueue the ModelDeployment the change concerns."""
        if kind is kube.MODEL_DEPLOYMENT:

            def on_md(old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
                meta = (new or old or {}).get("metadata") or {}
                ns, name = str(meta.get("namespace")), str(meta.get("name"))
                if new is None:
                    self.forget(ns, name)
                    return
                if _spec_changed(old, new):
                    self.enqueue(ns, name, "spec")

            return on_md
        trigger = "pod" if kind is kube.POD else "child"

        def on_child(old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
            obj = new or old or {}
            owner = owner_of(obj)
            if owner:
                ns = str((obj.get("metadata") or {}).get("namespace"))
                self.enqueue(ns, owner, trigger, self.child_event_delay)

        return on_child

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept about a deleted ModelDeployment."""
        self.autoscaler.forget(namespace, name)
        self.backoff.success((namespace, name))
        metrics.record_phase(namespace, name, None)
        secrets = self.caches.store(kube.SECRET)
        if secrets is not None:
            for obj in list(secrets.items(namespace)):
                if owner_of(obj) == name:
                    secrets.delete(namespace, str(obj["metadata"]["name"]))

    # ---- threads -------------------------------------------------------------------------------

    def start_watches(self, sync_timeout: float = 120.0) -> bool:
        """Start the list-watch caches and wait (up to `sync_timeout`) for their first LISTs."""
        assert self.source_factory is not None, "a context made with a test client watches nothing"
        if inference_pool.served(self.api):
            # the InferencePools too (without their CRD at start, reconcile reads them from the API)
            self.caches.watch_also(inference_pool_spec())
        self.caches.start(
            self.source_factory, self.namespaces, self.on_change, self.settings.watch_timeout_seconds
        )
        synced = self.caches.wait_synced(sync_timeout)
        if not synced:
            log.warning(
                "the watch caches did not sync within %.0fs; reconciling what they hold", sync_timeout
            )
        return synced

    def stop(self) -> None:
        for loop in self.loops:
            loop.stop()
        if self.queue is not None:
            self.queue.stop()
        self.caches.stop()
        if self.elector is not None:
            self.elector.stop()  # hands the Lease back: another replica takes over at once


def from_memo(memo: Mapping[str, Any]) -> OperatorContext:
    """The context kopf handed a handler (put into the memo by `berth operator` or the startup handler)."""
    ctx = memo.get(MEMO_KEY)
    if not isinstance(ctx, OperatorContext):
        raise RuntimeError(f"kopf's memo holds no OperatorContext under {MEMO_KEY!r}")
    return ctx

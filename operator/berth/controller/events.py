"""Kubernetes Events on a ModelDeployment: what to say (`status_events`, pure), the Event object
(`event_body`, pure) and recording them (`emit`, never fails a reconcile).

kopf's own event posting is off (handlers.configure): every Event the operator records is one of these.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from berth.api.models import API_VERSION, KIND
from berth.controller import kube
from berth.controller.status import format_time

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024


@dataclass(frozen=True)
class EventSpec:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def event_body(md_body: dict[str, Any], event: EventSpec, now: datetime) -> dict[str, Any]:
    """The core/v1 Event about the ModelDeployment `md_body`."""
    meta = md_body.get("metadata") or {}
    ts = format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:MAX_MESSAGE],
        "source": {"component": "berth-operator"},
        "reportingComponent": "berth.dev/operator",
        "reportingInstance": "berth-operator",
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "count": 1,
    }


def emit(client: kube.Kube, md_body: dict[str, Any], events: list[EventSpec], now: datetime) -> None:
    """Record `events` on the ModelDeployment; a refused Event is a log line, never an error."""
    ns = (md_body.get("metadata") or {}).get("namespace", "default")
    for event in events:
        try:
            client.create(kube.EVENT, ns, event_body(md_body, event, now))
        except kube.ApiError as e:
            log.warning("could not record event %s on %s: %s", event.reason, ns, e)


class EventRecorder:
    """`emit` with aggregation: an Event identical (object, type, reason, message) to one this process
    recorded within `repeat_seconds` is not sent again, only counted (so a status that flaps, or a
    failure retried with backoff, does not make an Event per attempt)."""

    def __init__(self, repeat_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.repeat_seconds = repeat_seconds
        self._clock = clock
        self._sent: dict[tuple[str, str, str, str, str, str], float] = {}
        self._lock = threading.Lock()
        self.suppressed = 0

    def _fresh(self, md_body: dict[str, Any], event: EventSpec) -> bool:
        meta = md_body.get("metadata") or {}
        key = (
            str(meta.get("namespace")),
            str(meta.get("name")),
            str(meta.get("uid")),
            event.type,
            event.reason,
            event.message,
        )
        now = self._clock()
        with self._lock:
            last = self._sent.get(key)
            if last is not None and now - last < self.repeat_seconds:
                self.suppressed += 1
                return False
            self._sent[key] = now
            if len(self._sent) > 10_000:  # forget the old ones
                horizon = now - self.repeat_seconds
                self._sent = {k: t for k, t in self._sent.items() if t >= horizon}
            return True

    def emit(
        self, client: kube.Kube, md_body: dict[str, Any], events: list[EventSpec], now: datetime
    ) -> None:
        emit(client, md_body, [e for e in events if self._fresh(md_body, e)], now)


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})
    return found


def _phase_event(new: dict[str, Any]) -> EventSpec | None:
    """The event for entering new["phase"] (None for the phases that pass without one)."""
    phase = new.get("phase")
    if phase == "Running":
        ready = f"{new.get('readyCapacity')}/{new.get('capacity')} instances ready"
        return EventSpec("Normal", "Ready", f"{ready}; endpoint {new.get('endpoint')}")
    if phase == "Degraded":
        return EventSpec("Warning", "Degraded", _condition(new, "Degraded").get("message", ""))
    if phase == "Failed":
        return EventSpec("Warning", "Failed", _condition(new, "Ready").get("message", ""))
    if phase == "Idle":
        return EventSpec("Normal", "Idle", "scaled to zero")
    return None


def status_events(previous: dict[str, Any], new: dict[str, Any]) -> list[EventSpec]:
    """Events for what changed: ready, scaled, degraded, failed (deployed comes from reconcile)."""
    events: list[EventSpec] = []
    new_ready = _condition(new, "Ready")
    if (
        new_ready.get("reason") == "Unschedulable"
        and _condition(previous, "Ready").get("reason") != "Unschedulable"
    ):
        events.append(EventSpec("Warning", "Unschedulable", new_ready.get("message", "")))
    if previous.get("capacity") is not None and previous.get("capacity") != new.get("capacity"):
        events.append(
            EventSpec("Normal", "Scaled", f"capacity {previous.get('capacity')} -> {new.get('capacity')}")
        )
    if new.get("phase") != previous.get("phase"):
        event = _phase_event(new)
        if event is not None:
            events.append(event)
    return events

"""One leader for the operator-wide loops: a `coordination.k8s.io/v1` Lease, as client-go elects.

Every replica runs a `LeaseElector` thread that, every `retry` seconds, tries to acquire or renew the
Lease `<operator namespace>/<name>`. Writes carry the observed `resourceVersion`, so of two replicas
racing for a free or expired Lease exactly one wins (the other gets 409). A Lease held by another
identity counts as expired when its record (holder, renewTime) has not changed for
`leaseDurationSeconds` of *this* replica's monotonic clock, so clocks between nodes need not agree.
The holder considers itself leader only until `renew_deadline` after its last successful renewal
(less than the lease duration): a replica that cannot renew (API server away, partitioned) stops
its loops before anyone else may take over. On shutdown the holder hands the Lease back
(`holderIdentity` cleared) so the next replica takes over at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from berth.controller import kube, metrics

log = logging.getLogger(__name__)

LEASE = kube.Kind("Lease", "apis/coordination.k8s.io/v1", "leases")


def default_identity() -> str:
    """POD_NAME (the chart sets it from the downward API), else host, pid and a random suffix."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _micro_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self,
        client: kube.Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: float = 15.0,
        renew_deadline: float = 10.0,
        retry: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not retry < renew_deadline < lease_seconds:
            raise ValueError("leader election needs retry < renew deadline < lease duration")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline
        self.retry = retry
        self._monotonic = monotonic
        self._wall = wall
        self._held_until = float("-inf")
        self._observed: tuple[Any, Any] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_leader = False
        self._last: dict[str, Any] | None = None  # the Lease as our last write left it

    # ------------------------------------------------------------------ state
    def is_leader(self) -> bool:
        return self._monotonic() < self._held_until

    def _spec(self, acquire: bool, previous: dict[str, Any]) -> dict[str, Any]:
        now = _micro_time(self._wall())
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_seconds),
            "renewTime": now,
        }
        if acquire:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(previous.get("leaseTransitions") or 0) + (
                1 if previous.get("holderIdentity") else 0
            )
        return spec

    def _renewal(self, lease: dict[str, Any], acquire: bool) -> dict[str, Any]:
        """A merge patch that takes (``acquire``) or renews the Lease, valid only on top of ``lease``."""
        return {
            "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
            "spec": self._spec(acquire, lease.get("spec") or {}),
        }

    def _expired(self, spec: dict[str, Any]) -> bool:
        """Free, or its record unchanged for a lease duration of our own clock."""
        if not spec.get("holderIdentity"):
            return True
        record = (spec.get("holderIdentity"), spec.get("renewTime"))
        now = self._monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
            return False
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        return now - self._observed_at >= duration

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        started = self._monotonic()
        if self._last is not None and self.is_leader():
            # renewing: write on top of our own last write, no GET (one request per renewal)
            try:
                self._last = self.client.patch(
                    LEASE, self.namespace, self.name, self._renewal(self._last, False)
                )
                self._held_until = started + self.renew_deadline
                return True
            except (kube.Conflict, kube.NotFound):
                self._last = None  # someone else wrote it: read it again below
        lease = self.client.get(LEASE, self.namespace, self.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(True, {}),
            }
            created = self.client.create(LEASE, self.namespace, body)
            if created is None:  # 409: another replica was first
                return False
            self._last = created
        else:
            spec = lease.get("spec") or {}
            mine = spec.get("holderIdentity") == self.identity
            if not mine and not self._expired(spec):
                return False
            try:
                self._last = self.client.patch(
                    LEASE, self.namespace, self.name, self._renewal(lease, not mine)
                )
            except kube.Conflict:
                return False  # someone else wrote it since we read it
        self._held_until = started + self.renew_deadline
        return True

    def release(self) -> None:
        """Hand the Lease back if this replica holds it (shutdown), so another takes over at once."""
        if not self.is_leader():
            return
        self._held_until = float("-inf")
        self._last = None
        try:
            lease = self.client.get(LEASE, self.namespace, self.name)
            if lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                patch = {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": 1},
                }
                self.client.patch(LEASE, self.namespace, self.name, patch)
        except kube.ApiError as e:
            log.warning("could not release the lease %s/%s: %s", self.namespace, self.name, e)

    # ------------------------------------------------------------------ thread
    def _step(self) -> None:
        try:
            self.try_acquire_or_renew()
        except Exception as e:  # the API server may be away: keep trying; leadership lapses by itself
            log.warning("leader election (lease %s/%s): %s", self.namespace, self.name, e)
        leader = self.is_leader()
        if leader != self._was_leader:
            log.info(
                "%s leadership of lease %s/%s (%s)",
                "took" if leader else "lost",
                self.namespace,
                self.name,
                self.identity,
            )
            self._was_leader = leader
        metrics.LEADER.set(1 if leader else 0)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._step()
            self._stopped.wait(self.retry)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="berth-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self.retry + 5)
        self.release()
        metrics.LEADER.set(0)

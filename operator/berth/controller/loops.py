"""The operator's periodic work: the level-triggered resync and the autoscaler.

These run as two operator-wide loops instead of kopf per-object timers, because kopf puts a
finalizer on every object that has a timer: a ModelDeployment could then not be deleted while the
operator is down (an uninstalled operator would leave resources and namespaces stuck Terminating).
Each loop lists the ModelDeployments once per period (one LIST per watched namespace, or one
cluster-wide) and handles them one by one. Only the replica that holds the leader Lease acts
(`leader.py`); the others keep their loops idle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from berth.controller import kube

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]


class Loop:
    """Call `handle(body)` for every ModelDeployment every `interval` seconds, in a daemon thread."""

    def __init__(
        self,
        name: str,
        interval: float,
        client: kube.Kube,
        namespaces: list[str],
        handle: Handler,
        leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name = name
        self.interval = interval
        self.client = client
        self.namespaces = namespaces
        self.handle = handle
        self.leader = leader
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
        while not self.stopped.wait(self.interval):
            try:
                if self.leader():
                    self.once()
            except Exception as e:  # the API server may be away for a while; try again next period
                log.warning("%s pass failed: %s", self.name, e)

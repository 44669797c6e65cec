"""The operator process's state, handed to the kopf handlers through kopf's memo (no module globals).

`berth operator` builds one `OperatorContext` and passes it to `kopf.run(memo=...)`; kopf gives every
handler a shallow copy of that memo, so all of them share this one object: the API client, the
autoscaler's per-object state, the per-object reconcile locks and the operator-wide loops.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.controller import kube
from berth.controller.autoscaler import Autoscaler
from berth.controller.leader import LeaseElector, default_identity
from berth.controller.loops import Loop
from berth.controller.settings import OperatorSettings

MEMO_KEY = "berth"


@dataclass
class OperatorContext:
    settings: OperatorSettings
    client: kube.Kube
    autoscaler: Autoscaler
    namespaces: list[str] = field(default_factory=list)  # watched namespaces; empty: the whole cluster
    priority: int = 0  # this process's kopf peering priority
    loops: list[Loop] = field(default_factory=list)
    elector: LeaseElector | None = None  # made by make_elector() when the loops start
    _locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict, init=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def create(
        cls,
        settings: OperatorSettings,
        namespaces: list[str] | None = None,
        priority: int = 0,
        client: kube.Kube | None = None,
    ) -> OperatorContext:
        client = client if client is not None else kube.KubeClient()
        return cls(settings, client, Autoscaler(client, settings), list(namespaces or []), priority)

    def make_elector(self) -> LeaseElector:
        lease = self.settings.leader_election_lease_seconds
        self.elector = LeaseElector(
            self.client,
            self.settings.operator_namespace,
            self.settings.leader_election_lease_name,
            default_identity(),
            lease_seconds=lease,
            renew_deadline=lease * 2 / 3,
            retry=lease / 5,
        )
        return self.elector

    def lock(self, namespace: str, name: str) -> threading.Lock:
        """The lock that serialises the reconciles of one ModelDeployment."""
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept about a deleted ModelDeployment."""
        self.autoscaler.forget(namespace, name)
        with self._guard:
            self._locks.pop((namespace, name), None)


def from_memo(memo: Mapping[str, Any]) -> OperatorContext:
    """The context kopf handed a handler (put into the memo by `berth operator` or the startup handler)."""
    ctx = memo.get(MEMO_KEY)
    if not isinstance(ctx, OperatorContext):
        raise RuntimeError(f"kopf's memo holds no OperatorContext under {MEMO_KEY!r}")
    return ctx

"""`CachedKube`: the `kube.Kube` that reconcile is given: reads of cached kinds come from the stores of
`cache.Caches`, everything else and every write goes to the API, and a write's response is put into
the store at once (a reconcile that follows before the watch event sees its own write).
"""

from __future__ import annotations

from typing import Any

from berth.controller import kube, names
from berth.controller.cache import Caches, Store


class CachedKube:
    """`kube.Kube` for reconcile: reads from the caches, writes to the API (and into the caches).

    A watched store has the last word once synced: a miss means "absent" (a create that answers 409
    then asks the API with `fetch`, e.g. for someone else's object the label-filtered watch does not
    show). A remembered store (Secrets) holds only what the operator created, or confirmed with a
    create that answered 409, and never causes an API read: a miss means "not known to exist"."""

    def __init__(self, client: kube.Kube, caches: Caches) -> None:
        self.client = client
        self.caches = caches

    def _readable(self, kind: kube.Kind) -> Store | None:
        """The store to read `kind` from; None where the API must answer: no store, a watch the RBAC
        forbids, or one whose first LIST has not come in (a miss there would not mean "absent")."""
        store = self.caches.store(kind)
        if store is None or store.forbidden or not store.synced.is_set():
            return None
        return store

    def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        store = self._readable(kind)
        if store is None:
            return self.client.get(kind, namespace, name)
        return store.get(namespace, name)

    def fetch(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """A GET from the API server, not from (nor into) the cache: for the rare object the watches
        cannot show (someone else's, named like a child)."""
        return self.client.get(kind, namespace, name)

    def list(self, kind: kube.Kind, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        store = self._readable(kind)
        if store is None or kind.kind not in self.caches.specs:
            return self.client.list(kind, namespace, label_selector)
        wanted = dict(p.split("=", 1) for p in label_selector.split(",")) if label_selector else {}
        owner = wanted.get(names.SELECTOR_LABEL)
        if owner and store.by_owner and namespace:
            candidates = store.owned(namespace, owner)
        else:
            candidates = store.items(namespace)
        return [
            o
            for o in candidates
            if all(((o.get("metadata") or {}).get("labels") or {}).get(a) == b for a, b in wanted.items())
        ]

    def remember(self, kind: kube.Kind, obj: dict[str, Any] | None) -> None:
        """Put an object the operator knows about (its own write's response, a confirmed stub) in the store."""
        store = self.caches.store(kind)
        if store is not None and obj and (obj.get("metadata") or {}).get("name"):
            store.upsert(obj)

    def forget(self, kind: kube.Kind, namespace: str, name: str) -> None:
        store = self.caches.store(kind)
        if store is not None:
            store.delete(namespace, name)

    def create(
        self, kind: kube.Kind, namespace: str, body: dict[str, Any], dry_run: bool = False
    ) -> dict[str, Any] | None:
        created = self.client.create(kind, namespace, body, dry_run=dry_run)
        if not dry_run:
            self.remember(kind, created)
        return created

    def patch(self, kind: kube.Kind, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        patched = self.client.patch(kind, namespace, name, body)
        self.remember(kind, patched)
        return patched

    def json_patch(self, kind: kube.Kind, namespace: str, name: str, ops: kube.JsonPatch) -> dict[str, Any]:
        patched = self.client.json_patch(kind, namespace, name, ops)
        self.remember(kind, patched)
        return patched

    def delete(self, kind: kube.Kind, namespace: str, name: str) -> None:
        self.client.delete(kind, namespace, name)
        self.forget(kind, namespace, name)

    def patch_status(
        self, kind: kube.Kind, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        patched = self.client.patch_status(kind, namespace, name, status)
        self.remember(kind, patched)
        return patched

    def patch_scale(self, kind: kube.Kind, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        return self.client.patch_scale(kind, namespace, name, replicas)

"""Watch caches: the operator reads ModelDeployments and their children from memory, not from GETs.

- `Store`: objects of one kind by (namespace, name), indexed by the ModelDeployment that owns them
  (the `berth.dev/model-deployment` label), trimmed on the way in (no managedFields; metadata only
  where that is all that is read).
- `Informer`: a thread per kind and namespace that LISTs (paged), then WATCHes from the list's
  resourceVersion with bookmarks; a watch that ends is resumed from the last version seen, an
  expired one (410) or a broken one is followed by a fresh LIST whose result replaces the store (so
  deletions missed meanwhile are noticed). Every change calls `on_change(old, new)`.
- `cached_kube.CachedKube` reads them (its own module).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from berth.api.models import API_VERSION, KIND
from berth.controller import kube, names
from berth.controller.hpas import HPA

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
Transform = Callable[[dict[str, Any]], dict[str, Any]]
OnChange = Callable[[dict[str, Any] | None, dict[str, Any] | None], None]


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without what nothing reads: managedFields and the last-applied annotation."""
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations and "kubectl.kubernetes.io/last-applied-configuration" in annotations:
        meta["annotations"] = {
            k: v for k, v in annotations.items() if k != "kubectl.kubernetes.io/last-applied-configuration"
        }
    out = dict(obj)
    out["metadata"] = meta
    return out


def strip_hpa(obj: dict[str, Any]) -> dict[str, Any]:
    """An HPA as hpas.py reads it: its metadata (stripped) and its scaleTargetRef."""
    ref = (obj.get("spec") or {}).get("scaleTargetRef")
    return {"metadata": strip(obj)["metadata"], "spec": {"scaleTargetRef": ref} if ref else {}}


def strip_pod(obj: dict[str, Any]) -> dict[str, Any]:
    """A pod as status.py and the autoscaler read it: metadata, status and the node it is bound to
    (the rest of the spec is the Deployment's business)."""
    out = strip(obj)
    spec = out.pop("spec", None) or {}
    if spec.get("nodeName"):
        out["spec"] = {"nodeName": spec["nodeName"]}
    return out


def strip_md(obj: dict[str, Any]) -> dict[str, Any]:
    """A ModelDeployment, with the apiVersion and kind a LIST's items lack."""
    out = strip(obj)
    out.setdefault("apiVersion", API_VERSION)
    out.setdefault("kind", KIND)
    return out


def metadata_only(obj: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": strip(obj)["metadata"]}


def owner_of(obj: dict[str, Any]) -> str | None:
    """The ModelDeployment an object belongs to: its controller ownerReference, else the selector label."""
    owner = names.owner_name(obj)
    if owner:
        return owner
    label = ((obj.get("metadata") or {}).get("labels") or {}).get(names.SELECTOR_LABEL)
    return str(label) if label else None


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _version(obj: dict[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


class Store:
    """Objects of one kind, by key and by owning ModelDeployment; thread-safe; values are not copied
    (callers must not mutate what they get)."""

    def __init__(self, kind: kube.Kind, transform: Transform = strip, by_owner: bool = True) -> None:
        self.kind = kind
        self.transform = transform
        self.by_owner = by_owner
        self._objects: dict[Key, dict[str, Any]] = {}
        self._owned: dict[Key, set[str]] = {}  # (namespace, owner) -> names
        self._lock = threading.Lock()
        self.synced = threading.Event()  # set after the first complete LIST of every namespace watched
        self._unsynced: set[str] = set()  # the namespaces whose first LIST is still to come
        self.forbidden = False  # an optional kind the operator may not watch: CachedKube asks the API

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    def expect(self, namespaces: Iterable[str]) -> None:
        """The namespaces (one informer each) whose first LIST `synced` waits for."""
        with self._lock:
            self._unsynced = set(namespaces)

    def mark_synced(self, namespace: str) -> None:
        """The first complete LIST of `namespace` is in: `synced` once every expected one is."""
        with self._lock:
            self._unsynced.discard(namespace)
            done = not self._unsynced
        if done:
            self.synced.set()

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def owned(self, namespace: str, owner: str) -> list[dict[str, Any]]:
        """The objects that `owner` (a ModelDeployment of `namespace`) owns, by name."""
        with self._lock:
            return [self._objects[(namespace, n)] for n in sorted(self._owned.get((namespace, owner), ()))]

    def items(self, namespace: str = "") -> list[dict[str, Any]]:
        with self._lock:
            return [o for (ns, _), o in self._objects.items() if namespace in ("", ns)]

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._objects)

    def _index(self, key: Key, obj: dict[str, Any] | None, add: bool) -> None:
        if not self.by_owner or obj is None:
            return
        owner = owner_of(obj)
        if owner is None:
            return
        bucket = (key[0], owner)
        if add:
            self._owned.setdefault(bucket, set()).add(key[1])
        else:
            names_ = self._owned.get(bucket)
            if names_ is not None:
                names_.discard(key[1])
                if not names_:
                    del self._owned[bucket]

    def upsert(self, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Put `obj` in (unless the stored copy is newer); (old, new) as stored."""
        new = self.transform(obj)
        key = _key(new)
        with self._lock:
            old = self._objects.get(key)
            if old is not None and _newer(old, new):
                return old, old
            self._index(key, old, add=False)
            self._objects[key] = new
            self._index(key, new, add=True)
        return old, new

    def delete(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            old = self._objects.pop((namespace, name), None)
            self._index((namespace, name), old, add=False)
        return old

    def replace(
        self, namespace: str, objects: Iterable[dict[str, Any]]
    ) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
        """Make the store's objects of `namespace` ("" = all) exactly `objects` (a fresh LIST); the
        changes, as (old, new) pairs (new None: deleted)."""
        fresh = {}
        for obj in objects:
            t = self.transform(obj)
            fresh[_key(t)] = t
        changes: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = []
        with self._lock:
            for key in [k for k in self._objects if namespace in ("", k[0]) and k not in fresh]:
                gone = self._objects.pop(key)
                self._index(key, gone, add=False)
                changes.append((gone, None))
            for key, new in fresh.items():
                old = self._objects.get(key)
                if old is not None and _version(old) == _version(new):
                    continue
                self._index(key, old, add=False)
                self._objects[key] = new
                self._index(key, new, add=True)
                changes.append((old, new))
        return changes


def _newer(stored: dict[str, Any], incoming: dict[str, Any]) -> bool:
    """Whether the stored copy is newer than `incoming` (resourceVersions of one object are integers
    in practice; compare them only when both are)."""
    a, b = _version(stored), _version(incoming)
    if a is None or b is None or not (a.isdigit() and b.isdigit()):
        return False
    return int(a) > int(b)


class Source(Protocol):
    """What an Informer needs from the API client (kube.KubeClient has both)."""

    def list_page(
        self,
        kind: kube.Kind,
        namespace: str,
        label_selector: str,
        metadata_only: bool = False,
        limit: int = 500,
    ) -> tuple[list[dict[str, Any]], str]: ...

    def watch(
        self,
        kind: kube.Kind,
        namespace: str,
        label_selector: str,
        resource_version: str,
        timeout_seconds: int,
        metadata_only: bool = False,
    ) -> Iterable[dict[str, Any]]: ...


@dataclass
class InformerSpec:
    kind: kube.Kind
    label_selector: str = ""
    metadata_only: bool = False
    transform: Transform = strip
    by_owner: bool = True
    optional: bool = False  # a 403 (the RBAC lacks the rule) ends the watch; reads then go to the API


class Informer:
    """Keep `store` equal to the API server's objects of one kind in one namespace ("" = all)."""

    def __init__(
        self,
        source: Source,
        spec: InformerSpec,
        store: Store,
        namespace: str = "",
        on_change: OnChange = lambda old, new: None,
        watch_timeout: int = 300,
        retry: Callable[[int], float] = lambda n: min(30.0, 0.5 * 2**n) * (0.8 + 0.4 * random.random()),
    ) -> None:
        self.source = source
        self.spec = spec
        self.store = store
        self.namespace = namespace
        self.on_change = on_change
        self.watch_timeout = watch_timeout
        self.retry = retry
        self.stopped = threading.Event()
        self.resource_version = ""
        self.lists = 0  # LISTs made (the first one and every relist)
        self.thread = threading.Thread(
            target=self.run, name=f"berth-watch-{spec.kind.plural}-{namespace or 'all'}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _notify(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        try:
            self.on_change(old, new)
        except Exception:  # a failing listener must not stop the watch
            log.exception("%s watch: change handler failed", self.spec.kind.kind)

    def relist(self) -> None:
        items, self.resource_version = self.source.list_page(
            self.spec.kind, self.namespace, self.spec.label_selector, self.spec.metadata_only
        )
        self.lists += 1
        for old, new in self.store.replace(self.namespace, items):
            self._notify(old, new)
        self.store.mark_synced(self.namespace)

    def apply(self, event: dict[str, Any]) -> None:
        """One watch event into the store (and to the listener when it changed something)."""
        kind = event.get("type")
        obj = event.get("object") or {}
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if kind == "BOOKMARK":
            return
        if kind == "DELETED":
            ns, name = _key(obj)
            old = self.store.delete(ns, name)
            if old is not None:
                self._notify(old, None)
            return
        if kind in ("ADDED", "MODIFIED"):
            old, new = self.store.upsert(obj)
            if old is not new and _version(old) != _version(new):
                self._notify(old, new)

    def run_once(self) -> None:
        """One WATCH (after a LIST when there is no resourceVersion to resume from)."""
        if not self.resource_version:
            self.relist()
        for event in self.source.watch(
            self.spec.kind,
            self.namespace,
            self.spec.label_selector,
            self.resource_version,
            self.watch_timeout,
            self.spec.metadata_only,
        ):
            if self.stopped.is_set():
                return
            self.apply(event)

    def run(self) -> None:
        failures = 0
        while not self.stopped.is_set():
            try:
                self.run_once()
                failures = 0
            except kube.Gone:
                log.info("%s watch expired; listing again", self.spec.kind.kind)
                self.resource_version = ""
            except Exception as e:  # API server away, connection broken: list again after a pause
                if self.spec.optional and isinstance(e, kube.Forbidden):
                    log.warning("%s watch forbidden (%s): reading them from the API", self.spec.kind.kind, e)
                    self.store.forbidden = True
                    self.store.synced.set()
                    return
                self.resource_version = ""
                delay = self.retry(failures)
                failures += 1
                log.warning("%s watch failed (%s); listing again in %.1fs", self.spec.kind.kind, e, delay)
                if self.stopped.wait(delay):
                    return


class Caches:
    """The stores the operator reads, and the informers that fill them. A `remembered` kind has a store
    but no watch: it holds what the operator itself created or found (the Secrets: the operator does
    not list Secrets, see CachedKube)."""

    def __init__(self, specs: Iterable[InformerSpec], remembered: Iterable[InformerSpec] = ()) -> None:
        specs, remembered = list(specs), list(remembered)
        self.stores: dict[str, Store] = {
            s.kind.kind: Store(s.kind, s.transform, s.by_owner) for s in [*specs, *remembered]
        }
        for s in remembered:
            self.stores[s.kind.kind].synced.set()
        self.specs = {s.kind.kind: s for s in specs}
        self.informers: list[Informer] = []

    def watch_also(self, spec: InformerSpec) -> None:
        """Watch one more kind (before `start`): e.g. InferencePools, where their CRD is installed."""
        self.stores.setdefault(spec.kind.kind, Store(spec.kind, spec.transform, spec.by_owner))
        self.specs[spec.kind.kind] = spec

    def store(self, kind: kube.Kind) -> Store | None:
        return self.stores.get(kind.kind)

    def start(
        self,
        source_factory: Callable[[], Source],
        namespaces: list[str],
        on_change: Callable[[kube.Kind], OnChange],
        watch_timeout: int = 300,
    ) -> None:
        for spec in self.specs.values():
            self.stores[spec.kind.kind].expect(namespaces or [""])
            for ns in namespaces or [""]:
                informer = Informer(
                    source_factory(),
                    spec,
                    self.stores[spec.kind.kind],
                    ns,
                    on_change(spec.kind),
                    # spread the reconnects of the watches over time
                    watch_timeout=int(watch_timeout * (0.9 + 0.2 * random.random())),
                )
                self.informers.append(informer)
                informer.start()

    def wait_synced(self, timeout: float) -> bool:
        """Whether every store got its first complete LIST within `timeout` seconds."""
        return all(s.synced.wait(timeout) for s in self.stores.values())

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()


def operator_specs() -> list[InformerSpec]:
    """What the operator watches: its ModelDeployments, the children they own (by the managed-by label)
    and the HorizontalPodAutoscalers of their namespaces."""
    managed = ",".join(f"{k}={v}" for k, v in names.MANAGED_LABELS.items())
    return [
        InformerSpec(kube.MODEL_DEPLOYMENT, by_owner=False, transform=strip_md),
        InformerSpec(kube.DEPLOYMENT, managed),
        InformerSpec(kube.SERVICE, managed),
        InformerSpec(kube.NETWORK_POLICY, managed),
        InformerSpec(kube.PDB, managed),
        InformerSpec(kube.POD, managed, transform=strip_pod),
        # every HPA (anyone's): the autoscaler stands aside for one that targets a ModelDeployment
        InformerSpec(HPA, by_owner=False, optional=True, transform=strip_hpa),
    ]


def inference_pool_spec() -> InformerSpec:
    """InferencePools of ModelDeployments (watched only where the cluster serves them)."""
    managed = ",".join(f"{k}={v}" for k, v in names.MANAGED_LABELS.items())
    return InformerSpec(kube.INFERENCE_POOL, managed)


def remembered_specs() -> list[InformerSpec]:
    """Kinds kept from the operator's own writes, not watched: Secrets (metadata only), as the operator
    may not read Secrets at all (RBAC: create only)."""
    return [InformerSpec(kube.SECRET, metadata_only=True, transform=metadata_only)]

"""The gateway's view of the cluster: watches of ModelDeployments, EndpointSlices and ApiKeys feeding
the registry, and the usage flush into ``ApiKey.status.usage``. Reads no Secrets.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from berth.gateway.convert import SERVICE_NAME_LABEL, endpoints_of, instance_of, key_of
from berth.gateway.registry import Instance, Registry
from berth.gateway.usage import UsageBook

log = logging.getLogger(__name__)

GROUP, VERSION = "berth.dev", "v1alpha1"
MD_PLURAL, APIKEY_PLURAL = "modeldeployments", "apikeys"


def load_config() -> Any:
    import kubernetes

    client: Any = kubernetes.client
    config: Any = kubernetes.config
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Watcher:
    """One list+watch loop per kind and namespace, each in a daemon thread; relists on any error."""

    def __init__(self, api: Any, registry: Registry, namespaces: tuple[str, ...] = ()) -> None:
        from kubernetes import client

        self.api = api
        self.registry = registry
        self.namespaces = namespaces or ("",)
        self.custom = client.CustomObjectsApi(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.stop = threading.Event()
        self.synced: dict[str, threading.Event] = {}

    def _lister(self, kind: str, ns: str) -> Callable[..., Any]:
        if kind == "endpointslices":
            if ns:
                return lambda **kw: self.discovery.list_namespaced_endpoint_slice(
                    ns, label_selector=SERVICE_NAME_LABEL, **kw
                )
            return lambda **kw: self.discovery.list_endpoint_slice_for_all_namespaces(
                label_selector=SERVICE_NAME_LABEL, **kw
            )
        if ns:
            return lambda **kw: self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, kind, **kw)
        return lambda **kw: self.custom.list_cluster_custom_object(GROUP, VERSION, kind, **kw)

    def _apply(self, kind: str, etype: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        if kind == MD_PLURAL:
            if etype == "DELETED":
                self.registry.delete_instance(ns, name)
            else:
                self.registry.put_instance(instance_of(obj))
        elif kind == APIKEY_PLURAL:
            if etype == "DELETED":
                self.registry.delete_key(ns, name)
            else:
                self.registry.put_key(key_of(obj))
        else:
            service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL, "")
            if etype == "DELETED":
                self.registry.delete_slice(ns, service, name)
            else:
                self.registry.put_slice(ns, service, name, endpoints_of(obj))

    def _loop(self, kind: str, ns: str, synced: threading.Event) -> None:
        import kubernetes

        watch: Any = kubernetes.watch
        lister = self._lister(kind, ns)
        while not self.stop.is_set():
            try:
                listing = self.api.sanitize_for_serialization(lister())
                seen = set()
                for obj in listing.get("items") or []:
                    self._apply(kind, "ADDED", obj)
                    seen.add((obj["metadata"].get("namespace"), obj["metadata"]["name"]))
                self._forget(kind, ns, seen)
                synced.set()
                rv = listing["metadata"]["resourceVersion"]
                w = watch.Watch()
                for event in w.stream(
                    lister, resource_version=rv, timeout_seconds=60, allow_watch_bookmarks=True
                ):
                    if self.stop.is_set():
                        w.stop()
                        return
                    obj = event["object"]
                    if not isinstance(obj, dict):
                        obj = self.api.sanitize_for_serialization(obj)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._apply(kind, event["type"], obj)
            except Exception as exc:
                log.warning("watch of %s failed (%s); relisting", kind, exc)
                self.stop.wait(1.0)

    def _forget(self, kind: str, ns: str, seen: set[tuple[str, str]]) -> None:
        if kind == APIKEY_PLURAL:
            for key in self.registry.all_keys():
                if (not ns or key.namespace == ns) and (key.namespace, key.name) not in seen:
                    self.registry.delete_key(key.namespace, key.name)

    def start(self) -> None:
        for kind in (MD_PLURAL, "endpointslices", APIKEY_PLURAL):
            for ns in self.namespaces:
                synced = self.synced[f"{kind}/{ns}"] = threading.Event()
                threading.Thread(
                    target=self._loop, args=(kind, ns, synced), daemon=True, name=f"watch-{kind}"
                ).start()

    def wait_synced(self, timeout: float) -> bool:
        return all(e.wait(timeout) for e in self.synced.values())


class Waker:
    """Scales a ModelDeployment at capacity 0 to max(1, minCapacity) through its scale subresource;
    at most one patch per instance every few seconds, however many requests are waiting."""

    def __init__(self, api: Any, every_seconds: float = 5.0) -> None:
        import kubernetes

        self.custom: Any = kubernetes.client.CustomObjectsApi(api)
        self.every = every_seconds
        self._last: dict[tuple[str, str], float] = {}

    def wake(self, instance: Instance) -> bool:
        import time

        now = time.monotonic()
        key = (instance.namespace, instance.name)
        if now - self._last.get(key, -1e9) < self.every:
            return False
        self._last[key] = now
        replicas = max(1, instance.min_capacity)
        try:
            self.custom.patch_namespaced_custom_object_scale(
                GROUP, VERSION, instance.namespace, MD_PLURAL, instance.name, {"spec": {"replicas": replicas}}
            )
        except Exception as exc:
            log.warning("waking %s/%s failed: %s", instance.namespace, instance.name, exc)
            self._last.pop(key, None)
            return False
        log.info("woke %s/%s to capacity %d", instance.namespace, instance.name, replicas)
        return True


def flush_usage(api: Any, book: UsageBook, custom: Any = None) -> int:
    """Add the pending deltas to each ApiKey's status.usage, guarded by resourceVersion; a conflict
    puts the delta back for the next flush. Returns how many keys were written."""
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    if custom is None:
        custom = kubernetes.client.CustomObjectsApi(api)
    written = 0
    for (ns, name), delta in book.take().items():
        try:
            obj = custom.get_namespaced_custom_object_status(GROUP, VERSION, ns, APIKEY_PLURAL, name)
            usage = (obj.get("status") or {}).get("usage") or {}
            body = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": {"usage": delta.apply(usage)},
            }
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, APIKEY_PLURAL, name, body)
            written += 1
        except ApiException as exc:
            if exc.status == 404:
                continue  # the key is gone; so is its usage
            log.info("usage flush for %s/%s: %s; retrying next flush", ns, name, exc.status)
            book.put_back(ns, name, delta)
        except Exception as exc:
            log.warning("usage flush for %s/%s failed: %s", ns, name, exc)
            book.put_back(ns, name, delta)
    return written

"""Shared helpers for the unit tests: ModelDeployment bodies and an in-memory recording API."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from berth.controller import kube
from berth.controller.settings import OperatorSettings


def md_body(
    name: str = "chat", namespace: str = "team-a", spec: dict[str, Any] | None = None, **meta: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": "2026-11-23T10:00:00Z",
            **meta,
        },
        "spec": spec or {},
    }


@pytest.fixture
def settings() -> OperatorSettings:
    return OperatorSettings(
        server_image="registry.example/berth-server:test",
        server_cpu_image="registry.example/berth-server-cpu:test",
        operator_namespace="berth-system",
    )


class RecordingKube:
    """A `kube.Kube` that keeps objects in memory and records every call (for unit tests only).

    It plays the parts of the API server the plan depends on: 404 as None, 409 on create of an
    existing object, merge-patch semantics, generation bumps on spec changes.
    """

    WRITES = ("create", "patch", "json_patch", "delete", "patch_status", "patch_scale")

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str, Any]] = []
        self._uid = itertools.count(1)

    def writes(self) -> list[tuple[str, str, str, Any]]:
        return [c for c in self.calls if c[0] in self.WRITES]

    def clear(self) -> None:
        self.calls.clear()

    def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind.kind, name, None))
        obj = self.objects.get((kind.kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, kind: kube.Kind, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        self.calls.append(("list", kind.kind, label_selector, None))
        wanted = dict(p.split("=", 1) for p in label_selector.split(",")) if label_selector else {}
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in sorted(self.objects.items())
            if k == kind.kind
            and namespace in ("", ns)
            and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in wanted.items())
        ]

    def create(
        self, kind: kube.Kind, namespace: str, body: dict[str, Any], dry_run: bool = False
    ) -> dict[str, Any] | None:
        name = body["metadata"].get("name") or f"{body['metadata'].get('generateName', 'x')}{next(self._uid)}"
        self.calls.append(("dry-run create" if dry_run else "create", kind.kind, name, copy.deepcopy(body)))
        key = (kind.kind, namespace, name)
        if key in self.objects:
            return None
        if dry_run:
            return copy.deepcopy(body)
        obj = copy.deepcopy(body)
        obj["metadata"].update({"name": name, "uid": f"u{next(self._uid)}", "generation": 1})
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def patch(self, kind: kube.Kind, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch", kind.kind, name, copy.deepcopy(body)))
        obj = self.objects[(kind.kind, namespace, name)]
        _merge(obj, copy.deepcopy(body))
        if "spec" in body:
            obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        return copy.deepcopy(obj)

    def json_patch(
        self, kind: kube.Kind, namespace: str, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """RFC 6902 `test`, `add` and `replace` (all or nothing, as the API server does, with its 422
        that does not say which op failed); the metadata back."""
        self.calls.append(("json_patch", kind.kind, name, copy.deepcopy(ops)))
        key = (kind.kind, namespace, name)
        if key not in self.objects:
            raise kube.NotFound(404, "NotFound", f"{name} not found")
        obj = copy.deepcopy(self.objects[key])
        for op in ops:
            *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
            node: Any = obj
            try:
                for p in parents:
                    node = node[int(p)] if isinstance(node, list) else node[p]
                if op["op"] == "add" and isinstance(node, dict):
                    node[last] = op["value"]
                    continue
                if op["op"] == "test" and isinstance(node, dict) and last not in node:
                    raise kube.Rejected(422, "Invalid", kube.PATCH_NOT_APPLICABLE)
                here = node[int(last)] if isinstance(node, list) else node[last]
            except (KeyError, IndexError, TypeError, ValueError):
                raise kube.Rejected(422, "Invalid", kube.PATCH_NOT_APPLICABLE) from None
            if op["op"] == "test" and here != op["value"]:
                raise kube.Rejected(422, "Invalid", kube.PATCH_NOT_APPLICABLE)
            if op["op"] == "replace":
                node[int(last) if isinstance(node, list) else last] = op["value"]
        self.objects[key] = obj
        return {"metadata": copy.deepcopy(obj["metadata"])}

    def delete(self, kind: kube.Kind, namespace: str, name: str) -> None:
        self.calls.append(("delete", kind.kind, name, None))
        self.objects.pop((kind.kind, namespace, name), None)

    def patch_status(
        self, kind: kube.Kind, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        self.calls.append(("patch_status", kind.kind, name, copy.deepcopy(status)))
        obj = self.objects.setdefault((kind.kind, namespace, name), {"metadata": {"name": name}})
        obj.setdefault("status", {})
        _merge(obj["status"], copy.deepcopy(status))
        return copy.deepcopy(obj)

    def patch_scale(self, kind: kube.Kind, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        self.calls.append(("patch_scale", kind.kind, name, replicas))
        obj = self.objects[(kind.kind, namespace, name)]
        obj["spec"]["capacity"] = replicas
        return copy.deepcopy(obj)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


@pytest.fixture
def recording() -> RecordingKube:
    return RecordingKube()


def feed(ctx: Any, client: RecordingKube) -> None:
    """What the watches would deliver to an OperatorContext's caches: every object the fake API holds
    (but Secrets, which the operator never watches nor reads)."""
    for (kind, _, _), o in client.objects.items():
        store = ctx.caches.stores.get(kind)
        if store is not None and kind != "Secret":
            store.upsert(copy.deepcopy(o))
    for store in ctx.caches.stores.values():
        store.synced.set()


def reconcile_key(ctx: Any, client: RecordingKube, namespace: str = "team-a", name: str = "chat") -> Any:
    """One work-queue step for a ModelDeployment key, its caches fed from the fake API first; returns
    the retry delay the reconciler asked for (None: done)."""
    feed(ctx, client)
    return ctx.queue.handler((namespace, name))


class NoSecretReads(RecordingKube):
    """The operator's view of Secrets with RBAC `create` and `patch` only: a read never finds one."""

    def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        if kind.kind == "Secret":
            self.calls.append(("get", "Secret", name, None))
            return None
        return super().get(kind, namespace, name)

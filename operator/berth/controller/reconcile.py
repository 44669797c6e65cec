"""Reconcile: one level-triggered, idempotent path for create, update, resume, the timer and child events.

`plan` is pure: desired manifests and observed objects in, the smallest list of writes out (a merge
patch holds only what differs). `reconcile` reads, plans, writes, observes and patches the status
only when it changed, so a reconcile with nothing to do makes no write at all.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from berth.api.models import KIND, ModelDeployment
from berth.api.quantity import parse_quantity
from berth.controller import builders, inference_pool, kube, names, policy
from berth.controller.events import EventSpec, emit, status_events
from berth.controller.settings import OperatorSettings
from berth.controller.status import Observed, compute_status, managed_status
from berth.gateway.registry import instance_credential

log = logging.getLogger(__name__)

_SAME = object()

# Maps the operator owns whole: a key the desired manifest does not name is removed (a GPU limit after
# gpus: 0, a nodeSelector entry the spec dropped). Everything below them is owned too.
OWNED_MAPS = frozenset({"limits", "requests", "nodeSelector", "affinity"})


@dataclass(frozen=True)
class Action:
    verb: str  # create | patch | delete
    kind: kube.Kind
    name: str
    body: dict[str, Any] | None = None


@dataclass
class Result:
    actions: list[Action] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    status_written: bool = False
    events: list[EventSpec] = field(default_factory=list)


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == []


def _scalar_equal(desired: Any, observed: Any, quantities: bool = False) -> bool:
    if desired == observed:
        return True
    if isinstance(desired, bool) or isinstance(observed, bool):
        return False
    if isinstance(desired, int | float | str) and isinstance(observed, int | float | str):
        if str(desired) == str(observed):
            return True
        if not quantities:
            return False
        try:  # resource quantities come back canonicalised ("0.5" -> "500m")
            return parse_quantity(desired) == parse_quantity(observed)
        except (ValueError, TypeError, ArithmeticError):
            return False
    return False


def diff(desired: Any, observed: Any, quantities: bool = False, owned: bool = False) -> Any:
    """The merge patch that makes `observed` match `desired` on the keys desired names; _SAME if none.

    Keys the API server or others added (defaults, status, annotations) are left alone, except inside
    the maps in OWNED_MAPS, where a key desired does not name is removed; a key desired as None is
    removed; lists are compared element by element the same way and replaced whole when they differ.
    A desired False or "" matches a missing key (the API server drops them). Values under
    resources.requests/limits compare as quantities ("0.5" == "500m").
    """
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return desired
        patch: dict[str, Any] = {}
        for key, value in desired.items():
            if key not in observed or observed[key] is None:
                if not (_empty(value) or value is False or value == ""):
                    patch[key] = value
                continue
            sub = diff(
                value,
                observed[key],
                quantities or key in ("requests", "limits"),
                owned or key in OWNED_MAPS,
            )
            if sub is not _SAME:
                patch[key] = sub
        if owned:
            patch.update({key: None for key in observed if key not in desired})
        return patch if patch else _SAME
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return desired if not (_empty(desired) and _empty(observed)) else _SAME
        same = all(diff(d, o, quantities, owned) is _SAME for d, o in zip(desired, observed, strict=True))
        return _SAME if same else desired
    return _SAME if _scalar_equal(desired, observed, quantities) else desired


def forget_dropped_pod_metadata(manifest: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The Deployment manifest with None for each pod-template label or annotation that an earlier
    spec.podTemplate set (recorded in names.POD_METADATA_KEYS on `current`) and this one does not."""
    recorded = ((current.get("metadata") or {}).get("annotations") or {}).get(names.POD_METADATA_KEYS)
    if not recorded:
        return manifest
    try:
        before = json.loads(recorded)
    except ValueError:
        return manifest
    template = manifest["spec"]["template"]
    meta = template.get("metadata") or {}
    dropped = {
        name: {
            k: None for k in before.get(name) or [] if isinstance(k, str) and k not in (meta.get(name) or {})
        }
        for name in ("labels", "annotations")
    }
    if not any(dropped.values()):
        return manifest  # the usual case: nothing to remove, nothing copied
    new_meta = {**meta, **{name: {**(meta.get(name) or {}), **dropped[name]} for name in dropped}}
    return {**manifest, "spec": {**manifest["spec"], "template": {**template, "metadata": new_meta}}}


def prune(manifest: Any) -> Any:
    """The manifest without None values (what a create sends)."""
    if isinstance(manifest, dict):
        return {k: prune(v) for k, v in manifest.items() if v is not None}
    if isinstance(manifest, list):
        return [prune(v) for v in manifest]
    return manifest


Desired = list[tuple[kube.Kind, str, dict[str, Any] | None]]


def conflicts(
    desired: Desired, observed: dict[tuple[str, str], dict[str, Any] | None], owner_uid: str
) -> list[str]:
    """ "Kind/name" of each child the spec wants that exists without this ModelDeployment's controller
    reference (someone else's object with the same name): Berth never patches, adopts or deletes it."""
    return [
        f"{kind.kind}/{name}"
        for kind, name, manifest in desired
        if manifest is not None
        and (current := observed.get((kind.kind, name))) is not None
        and not owned_by(current, owner_uid)
    ]


def plan(
    desired: Desired,
    observed: dict[tuple[str, str], dict[str, Any] | None],
    create_only: frozenset[str] = frozenset({"Secret"}),
    owner_uid: str | None = None,
) -> list[Action]:
    """Writes that make the cluster match `desired` ((kind, name, manifest-or-None-for-absent)).

    An existing object without the controller reference of the ModelDeployment `owner_uid` (any
    ModelDeployment when None) is left as it is: no patch, no delete (see `conflicts`)."""
    actions: list[Action] = []
    for kind, name, manifest in desired:
        current = observed.get((kind.kind, name))
        if current is not None and not owned_by(current, owner_uid):
            continue  # not ours: never patched, adopted or deleted
        if manifest is None:
            if current is not None:
                actions.append(Action("delete", kind, name))
            continue
        if current is None:
            actions.append(Action("create", kind, name, manifest))
        elif kind.kind not in create_only:
            if kind.kind == "Deployment":
                manifest = forget_dropped_pod_metadata(manifest, current)
            patch = diff({k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}, current)
            if patch is not _SAME:
                actions.append(Action("patch", kind, name, patch))
    return actions


def owned_by(obj: dict[str, Any], owner_uid: str | None) -> bool:
    """`obj` carries the controller reference of the ModelDeployment `owner_uid` (of any when None)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(
        r.get("kind") == KIND and r.get("controller") and (owner_uid is None or r.get("uid") == owner_uid)
        for r in refs
    )


def generate_api_key() -> str:
    return "sk-berth-" + secrets.token_urlsafe(32)


def gateway_key_child(md: ModelDeployment, settings: OperatorSettings) -> Desired:
    """The instance's gateway-credential Secret ([] when no gateway master key is mounted or auth is off).

    Created once like every Secret: after rotating the master key, delete the ``<name>-gateway-key``
    Secrets and the operator writes them anew."""
    master = settings.gateway_master_key()
    if master is None:
        return []
    secret = builders.build_gateway_key_secret(md, instance_credential(master, md.namespace, md.name))
    if secret is None:
        return []  # auth off: nothing to mount (a Secret left from before goes with the ModelDeployment)
    return [(kube.SECRET, names.gateway_key_secret_name(md), secret)]


def desired_children(md: ModelDeployment, settings: OperatorSettings, api_key: Callable[[], str]) -> Desired:
    children: Desired = []
    if names.generates_api_key_secret(md):
        children.append((kube.SECRET, names.generated_api_key_secret_name(md), _LazySecret(md, api_key)))
    gateway_key = gateway_key_child(md, settings)
    children += gateway_key
    deployment = builders.build_deployment(md, settings)
    if gateway_key:
        deployment = builders.mount_gateway_key(deployment, md)
    children += [
        (kube.DEPLOYMENT, names.deployment_name(md), deployment),
        (kube.SERVICE, names.service_name(md), builders.build_service(md)),
        (kube.NETWORK_POLICY, names.network_policy_name(md), builders.build_network_policy(md, settings)),
        (kube.PDB, names.pdb_name(md), builders.build_pdb(md)),
    ]
    return children


class _LazySecret(dict[str, Any]):
    """The generated Secret, whose random key is drawn only if it is really created."""

    def __init__(self, md: ModelDeployment, api_key: Callable[[], str]) -> None:
        super().__init__()
        self._md = md
        self._api_key = api_key

    def materialise(self) -> dict[str, Any]:
        return builders.build_api_key_secret(self._md, self._api_key())


def _missing_secret(md: ModelDeployment, client: kube.Kube) -> str | None:
    """spec.auth.apiKeySecretRef when it names a Secret that does not exist."""
    ref = md.spec.auth.api_key_secret_ref
    if md.spec.auth.mode == "apiKey" and ref and client.get(kube.SECRET, md.namespace, ref) is None:
        return ref
    return None


def _apply(
    action: Action, md: ModelDeployment, client: kube.Kube, deployment: dict[str, Any] | None, result: Result
) -> dict[str, Any] | None:
    """Make one write; returns the Deployment as it is after it (for the status)."""
    ns = md.namespace
    if action.verb == "create":
        manifest = action.body.materialise() if isinstance(action.body, _LazySecret) else action.body
        assert manifest is not None
        created = client.create(action.kind, ns, prune(manifest))
        if action.kind is kube.DEPLOYMENT:
            if created is None:  # it appeared since the read (409): observe the one that is there
                return client.get(kube.DEPLOYMENT, ns, action.name)
            message = f"created Deployment {action.name} with {md.spec.capacity} instances"
            result.events.append(EventSpec("Normal", "Deployed", message))
            return created
    elif action.verb == "patch":
        assert action.body is not None
        patched = client.patch(action.kind, ns, action.name, action.body)
        if action.kind is kube.DEPLOYMENT:
            return patched
    else:
        client.delete(action.kind, ns, action.name)
    return deployment


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return found


def reconcile(
    body: dict[str, Any],
    client: kube.Kube,
    settings: OperatorSettings,
    now: datetime,
    api_key: Callable[[], str] = generate_api_key,
) -> Result:
    """Bring the children of one ModelDeployment in line with its spec, then its status with the children.

    Raises pydantic.ValidationError for a spec the operator cannot act on (the caller records it).
    """
    md = ModelDeployment.model_validate(
        {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec") if body.get(k) is not None}
    )
    policy.check(md, settings)
    ns = md.namespace
    result = Result()

    desired = desired_children(md, settings, api_key)
    pool = inference_pool.desired(md, settings, client)  # [] unless the cluster has the InferencePool CRD
    desired += pool
    observed: dict[tuple[str, str], dict[str, Any] | None] = {
        (kind.kind, name): client.get(kind, ns, name) for kind, name, _ in desired
    }
    missing_secret = _missing_secret(md, client)
    uid = str(md.metadata.get("uid") or "")
    taken = conflicts(desired, observed, uid)
    deployment_key = (kube.DEPLOYMENT.kind, names.deployment_name(md))
    if any(c.startswith(f"{kube.SECRET.kind}/") for c in taken):
        # someone else's Secret under the generated name: the instances must not mount it as their keys
        desired = [d for d in desired if d[0] is not kube.DEPLOYMENT]
    result.actions = plan(desired, observed, owner_uid=uid)
    deployment = observed.get(deployment_key)
    if deployment is not None and not owned_by(deployment, uid):
        deployment = None  # someone else's Deployment says nothing about this ModelDeployment's instances
    for action in result.actions:
        deployment = _apply(action, md, client, deployment, result)
        log.info("%s %s %s/%s", action.verb, action.kind.kind, ns, action.name)

    pods = client.list(kube.POD, ns, names.selector_string(md)) if deployment is not None else []
    previous = dict(body.get("status") or {})
    status = compute_status(md, Observed(deployment, pods, missing_secret, taken), settings, now, previous)
    pool_key = (kube.INFERENCE_POOL.kind, names.inference_pool_name(md))
    status["inferencePool"] = inference_pool.pool_status(
        md, observed.get(pool_key), any(m is not None for _, _, m in pool)
    )
    result.status = status
    if managed_status(status) != managed_status(previous):
        client.patch_status(kube.MODEL_DEPLOYMENT, ns, md.name, status)
        result.status_written = True
    if taken and _ready(status).get("message") != _ready(previous).get("message"):
        result.events.append(EventSpec("Warning", "ChildConflict", str(_ready(status).get("message", ""))))
    result.events += status_events(previous, status)
    emit(client, body, result.events, now)
    return result

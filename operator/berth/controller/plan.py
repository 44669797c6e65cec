"""The plan: desired manifests and observed objects in, the smallest list of writes out.

Pure (no client, no clock): a merge patch holds only what differs (`diff`), keys others added are left
alone except inside the maps the operator owns whole, an object without this ModelDeployment's
controller reference is never patched, adopted or deleted (`owned_by`, `conflicts`). reconcile.py
reads, plans with `plan`, writes, observes and patches the status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from berth.api.models import KIND
from berth.api.quantity import parse_quantity
from berth.controller import builders, names

if TYPE_CHECKING:
    from berth.controller import kube


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


# (kind, name, manifest or None for absent); kube is imported for typing only: the plan needs no client
Desired: TypeAlias = "list[tuple[kube.Kind, str, dict[str, Any] | None]]"


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


def gateway_key_rewrite(
    secret: dict[str, Any] | None,
    owner_uid: str,
    *records: dict[str, Any] | None,
) -> list[dict[str, Any]] | None:
    """The JSON Patch that writes the desired gateway-key Secret's credential (`secret`, the manifest;
    None: no key wanted, as without a master key or with auth off) over the existing Secret of that
    name; None when nothing is to be written: one of `records` (this ModelDeployment's Deployment, the
    operator's remembered stub of the Secret) carries the fingerprint of that credential
    (builders.GATEWAY_KEY_FINGERPRINT), so the Secret holds it.

    The patch first tests the Secret's whole ownerReferences list against the one the operator gives
    its children: the API server applies the ops atomically and refuses them all (422: the patch does not apply)
    for a Secret that is not this ModelDeployment's, however its references are arranged, so the
    operator overwrites no Secret it does not own although it cannot read one. (A Secret of ours
    that someone gave another reference is refused too: left as it is, a ChildConflict.) The data is
    written with `add` of the whole map, which succeeds whatever keys the Secret holds now."""
    if secret is None:
        return None
    credential = builders.gateway_credential(secret)
    fingerprint = builders.gateway_key_fingerprint(credential)
    if any(
        r is not None and owned_by(r, owner_uid) and recorded_fingerprint(r) == fingerprint for r in records
    ):
        return None
    return [
        {"op": "test", "path": "/metadata/ownerReferences", "value": secret["metadata"]["ownerReferences"]},
        {
            "op": "add",
            "path": "/data",
            "value": {builders.GATEWAY_KEY_ID: secret["data"][builders.GATEWAY_KEY_ID]},
        },
    ]


def recorded_fingerprint(obj: dict[str, Any] | None) -> str | None:
    """The gateway-key credential fingerprint `obj` records (builders.GATEWAY_KEY_FINGERPRINT), if any."""
    annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
    found: str | None = annotations.get(builders.GATEWAY_KEY_FINGERPRINT)
    return found


def hold_gateway_key_record(desired: Desired, deployment: dict[str, Any] | None) -> Desired:
    """`desired` with the Deployment's gateway-key record (builders.GATEWAY_KEY_FINGERPRINT) as
    `deployment` (observed) has it: the credential could not be written, so the record must not
    claim it (absent when the Deployment is new or has none)."""
    recorded = recorded_fingerprint(deployment)
    held: Desired = []
    for kind, name, manifest in desired:
        if kind.kind == "Deployment" and manifest is not None:
            metadata = manifest["metadata"]
            annotations = {
                k: v
                for k, v in (metadata.get("annotations") or {}).items()
                if k != builders.GATEWAY_KEY_FINGERPRINT
            }
            if recorded is not None:
                annotations[builders.GATEWAY_KEY_FINGERPRINT] = recorded
            manifest = {**manifest, "metadata": {**metadata, "annotations": annotations}}
        held.append((kind, name, manifest))
    return held

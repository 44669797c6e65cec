"""ApiKey reconcile: generate the key into a Secret the ApiKey owns, publish only its SHA-256.

Level-triggered and idempotent like the ModelDeployment reconcile: the Secret is created once and
never read (the hash published is that of the key the operator generated, see `reconcile_apikey`),
and never touched when another owner holds the name (a ``ChildConflict`` condition instead). The status carries keyId, keyHash, secretName and
a Ready condition that says why a key is refused (Disabled, Expired); ``status.usage`` belongs to the
gateway and the operator's merge patches never name it.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any

from berth.api.apikey import APIKEY_KIND, APIKEY_PLURAL, ApiKey
from berth.api.models import API_VERSION, GROUP, VERSION
from berth.controller import kube

APIKEY = kube.Kind(APIKEY_KIND, f"apis/{GROUP}/{VERSION}", APIKEY_PLURAL)
KEY_FIELD = "key"
KEY_PREFIX = "bk-"


def secret_name(name: str) -> str:
    return f"{name}-apikey"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(namespace: str, name: str, uid: str) -> str:
    """Stable across rotations of the Secret, unique per object, not derived from the key."""
    return "ak-" + hashlib.sha256(f"{namespace}/{name}/{uid}".encode()).hexdigest()[:12]


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": APIKEY_KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_secret(obj: dict[str, Any], key: str) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {
                "app.kubernetes.io/managed-by": "berth",
                "app.kubernetes.io/part-of": "berth",
                "berth.dev/apikey": meta["name"],
            },
            "ownerReferences": [owner_reference(obj)],
        },
        "data": {KEY_FIELD: base64.b64encode(key.encode()).decode()},
    }


def _owned_by(child: dict[str, Any], obj: dict[str, Any]) -> bool:
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == obj["metadata"]["uid"] for r in refs)


def _condition(
    status: str, reason: str, message: str, generation: int | None, old: list[dict[str, Any]]
) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    prev = next((c for c in old if c.get("type") == "Ready"), None)
    since = prev.get("lastTransitionTime") if prev and prev.get("status") == status else now
    return {
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def _remember(client: kube.Kube, obj: dict[str, Any]) -> None:
    remember = getattr(client, "remember", None)  # a cached_kube.CachedKube keeps it in memory
    if remember is not None:
        remember(kube.SECRET, obj)


def _has_conflict(conditions: list[dict[str, Any]]) -> bool:
    return any(c.get("type") == "Ready" and c.get("reason") == "ChildConflict" for c in conditions)


def reconcile_apikey(body: dict[str, Any], client: kube.Kube, now: datetime | None = None) -> dict[str, Any]:
    """Make the Secret exist and publish the hash; return the status fields written (or {}).

    The Secret is never read (the operator has no `get` on Secrets): the hash is that of the key the
    operator generated, recorded in the status *before* the Secret is created, so that a later 409 is
    known to be this ApiKey's own Secret (an earlier pass may have died before its status write); a
    409 without that record is someone else's Secret (ChildConflict). A recorded Secret is checked
    to exist with a dry-run create once per process (it may never have been created)."""
    parsed = ApiKey.model_validate(body)  # raises pydantic.ValidationError on an invalid spec
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    now = now or datetime.now(UTC)
    old_status = dict(body.get("status") or {})
    sname = secret_name(name)
    conflict_before = _has_conflict(old_status.get("conditions") or [])
    recorded = (
        old_status.get("keyHash") if old_status.get("secretName") == sname and not conflict_before else None
    )
    known = client.get(kube.SECRET, ns, sname)

    def write(status: dict[str, Any]) -> dict[str, Any]:
        current = {k: old_status.get(k) for k in status}
        if current == status:
            return {}
        client.patch_status(APIKEY, ns, name, status)
        old_status.update(status)
        return status

    key_hash_value: str | None = None
    recorded_now: dict[str, Any] = {}
    if known is not None and _owned_by(known, body) and recorded:
        key_hash_value = str(recorded)
    elif recorded:
        probe_meta = {"name": sname, "namespace": ns}
        probe = {"apiVersion": "v1", "kind": "Secret", "metadata": probe_meta}
        if client.create(kube.SECRET, ns, probe, dry_run=True) is None:  # exists: ours, by the record
            key_hash_value = str(recorded)
            _remember(client, {"metadata": {**probe_meta, "ownerReferences": [owner_reference(body)]}})
        else:  # recorded but never created (the pass died in between): create it now
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            if client.create(kube.SECRET, ns, build_secret(body, key)) is not None:
                key_hash_value = key_hash(key)
    else:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        if not conflict_before:
            recorded_now = write(_status(parsed, body, key_hash(key), now, old_status))  # before the create
        if client.create(kube.SECRET, ns, build_secret(body, key)) is not None:
            key_hash_value = key_hash(key)
    return write(_status(parsed, body, key_hash_value, now, old_status)) or recorded_now


def _status(
    parsed: ApiKey, body: dict[str, Any], hash_: str | None, now: datetime, old_status: dict[str, Any]
) -> dict[str, Any]:
    meta = body["metadata"]
    ns, name, gen = meta["namespace"], meta["name"], meta.get("generation")
    old_conditions = old_status.get("conditions") or []
    status: dict[str, Any] = {"secretName": secret_name(name), "observedGeneration": gen}
    if hash_ is None:
        status.update(keyHash=None, keyId=None)
        cond = _condition(
            "False",
            "ChildConflict",
            f"Secret {secret_name(name)} exists and is not owned by this ApiKey; delete or rename it",
            gen,
            old_conditions,
        )
    else:
        status.update(keyHash=hash_, keyId=key_id(ns, name, meta["uid"]))
        if parsed.spec.disabled:
            cond = _condition(
                "False",
                "Disabled",
                "spec.disabled is true: the gateway refuses this key",
                gen,
                old_conditions,
            )
        elif parsed.spec.expires_at is not None and parsed.spec.expires_at <= now:
            cond = _condition(
                "False",
                "Expired",
                f"the key expired at {parsed.spec.expires_at.isoformat()}",
                gen,
                old_conditions,
            )
        else:
            cond = _condition(
                "True",
                "Active",
                f"key in Secret {secret_name(name)}; the gateway accepts it",
                gen,
                old_conditions,
            )
    status["conditions"] = [cond] + [c for c in old_conditions if c.get("type") != "Ready"]
    return status

"""Reconcile: one level-triggered, idempotent path for create, update, resume, the timer and child events.

`plan.plan` is pure: desired manifests and observed objects in, the smallest list of writes out (a
merge patch holds only what differs). `reconcile` reads, plans, writes, observes and patches the
status only when it changed, so a reconcile with nothing to do makes no write at all.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from berth.api.models import ModelDeployment
from berth.controller import builders, inference_pool, kube, names, policy
from berth.controller.cached_kube import CachedKube
from berth.controller.diagnosis import CHILD_CONFLICT, pod_events_needed, volume_events
from berth.controller.events import EventRecorder, EventSpec, emit, status_events
from berth.controller.plan import (
    Action,
    Desired,
    conflicts,
    gateway_key_rewrite,
    hold_gateway_key_record,
    owned_by,
    plan,
    prune,
)
from berth.controller.settings import OperatorSettings
from berth.controller.status import Observed, compute_status, managed_status
from berth.gateway.registry import instance_credential

log = logging.getLogger(__name__)


@dataclass
class Result:
    actions: list[Action] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    status_written: bool = False
    events: list[EventSpec] = field(default_factory=list)


def generate_api_key() -> str:
    return "sk-berth-" + secrets.token_urlsafe(32)


def gateway_key_child(md: ModelDeployment, settings: OperatorSettings) -> Desired:
    """The instance's gateway-credential Secret ([] when no gateway master key is mounted or auth is off).

    The master key file is read in every reconcile: after a rotation (the kubelet updates the mounted
    file) the next one wants the new credential, and `_gateway_key_secret` rewrites the Secret."""
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
    for _, _, secret in gateway_key:
        assert secret is not None
        deployment = builders.mount_gateway_key(deployment, md, builders.gateway_credential(secret))
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


def _remember(client: kube.Kube, kind: kube.Kind, obj: dict[str, Any]) -> None:
    if isinstance(client, CachedKube):
        client.remember(kind, obj)


def _forget(client: kube.Kube, namespace: str, name: str) -> None:
    if isinstance(client, CachedKube):
        client.forget(kube.SECRET, namespace, name)


def _fetch(client: kube.Kube, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
    """The object from the API server itself (a cache has no word on what its watch cannot show)."""
    return (
        client.fetch(kind, namespace, name)
        if isinstance(client, CachedKube)
        else client.get(kind, namespace, name)
    )


def _missing_secret(md: ModelDeployment, client: kube.Kube) -> str | None:
    """spec.auth.apiKeySecretRef when it names a Secret that does not exist.

    Without reading it: a dry-run create of that name answers 409 when it exists (nothing is stored;
    the operator needs `create`, not `get`, on Secrets). A Secret found once is remembered by name."""
    ref = md.spec.auth.api_key_secret_ref
    if md.spec.auth.mode != "apiKey" or not ref:
        return None
    if client.get(kube.SECRET, md.namespace, ref) is not None:
        return None
    probe = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": ref, "namespace": md.namespace}}
    try:
        would_create = client.create(kube.SECRET, md.namespace, probe, dry_run=True)
    except kube.Forbidden:  # e.g. a Secret quota that is full: cannot tell; the pods will say
        return None
    if would_create is None:
        _remember(client, kube.SECRET, probe)
        return None
    return ref


def _conflict_named(status: dict[str, Any], child: str) -> bool:
    ready = _ready(status)
    return ready.get("reason") == CHILD_CONFLICT and child in str(ready.get("message") or "")


def _generated_secret(
    md: ModelDeployment,
    client: kube.Kube,
    desired: Desired,
    previous: dict[str, Any],
    record: Callable[[], None],
) -> dict[str, Any] | None:
    """Create the generated API-key Secret (never read: the operator has no `get` on Secrets); the
    Secret as observed: the created one, a stub with this ModelDeployment's reference when a 409 is
    known to be its own Secret, a stub without it (someone else's: a ChildConflict) otherwise.

    Whose is a 409? The status records the Secret (status.apiKeySecret, written by `record` before
    the first create, and removed while the name is someone else's): a 409 after such a record is the
    operator's own Secret (created by an earlier reconcile, which may have died before its status
    write), one without it someone else's."""
    name = names.generated_api_key_secret_name(md)
    child = f"{kube.SECRET.kind}/{name}"
    recorded = previous.get("apiKeySecret") == name and not _conflict_named(previous, child)
    if not recorded and not _conflict_named(previous, child):
        record()  # from now on a 409 means "ours"
    manifest = next(m for k, n, m in desired if k is kube.SECRET and n == name)
    assert isinstance(manifest, _LazySecret)
    body = prune(manifest.materialise())
    created = client.create(kube.SECRET, md.namespace, body)
    if created is not None:
        log.info("create Secret %s/%s", md.namespace, name)
        return created
    stub = {"metadata": {"name": name, "namespace": md.namespace, "labels": body["metadata"].get("labels")}}
    if recorded:
        stub["metadata"]["ownerReferences"] = body["metadata"].get("ownerReferences")
        _remember(client, kube.SECRET, stub)
    return stub


@dataclass
class GatewayKey:
    """What `_gateway_key_secret` found: the Secret as observed (a stub; None: not known to exist), and
    why the current credential could not be written (None when the Secret holds it)."""

    secret: dict[str, Any] | None
    not_written: str | None = None


def _gateway_key_secret(
    md: ModelDeployment,
    client: kube.Kube,
    desired: Desired,
    secret: dict[str, Any] | None,
    deployment: dict[str, Any] | None,
) -> GatewayKey:
    """The instance's gateway-key Secret as observed (`secret`: remembered by the cache, or None), made
    to hold the current credential without reading it (the operator has no `get` on Secrets):

    - not known to exist: created; a 409 goes on as below;
    - this ModelDeployment's Deployment, or the stub the cache remembers from the operator's last write,
      records the fingerprint of the current credential: the Secret holds it; nothing written;
    - otherwise (the master key was rotated, or a 409 no record vouches for): the JSON Patch of
      plan.gateway_key_rewrite overwrites the credential, guarded by a test of the Secret's owner
      references. The API server refuses it (422, the patch does not apply: only the test can fail)
      for a Secret that is not this
      ModelDeployment's: the stub then has no owner reference (a ChildConflict; the Deployment is left
      as it is). Any other refusal (403 from an RBAC without `patch` on Secrets, an admission
      webhook) is `not_written`: the instance goes on with the credential it has, and the caller keeps
      the Deployment's record where it is and says why."""
    ns, name = md.namespace, names.gateway_key_secret_name(md)
    uid = str(md.metadata.get("uid") or "")
    manifest = next(m for k, n, m in desired if k is kube.SECRET and n == name)
    assert manifest is not None
    body = prune(manifest)
    meta = body["metadata"]
    fingerprint = builders.gateway_key_fingerprint(builders.gateway_credential(body))
    claimed = {"metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "ownerReferences")}}
    # what the cache remembers after a write: the record of the credential is in the cache only
    ours = {
        "metadata": {**claimed["metadata"], "annotations": {builders.GATEWAY_KEY_FINGERPRINT: fingerprint}}
    }
    foreign = {"metadata": {k: meta.get(k) for k in ("name", "namespace", "labels")}}
    if secret is not None and not owned_by(secret, uid):
        _forget(client, ns, name)  # remembered for an earlier ModelDeployment of this name
        secret = None
    if secret is None:
        created = client.create(kube.SECRET, ns, body)
        if created is not None:
            log.info("create Secret %s/%s", ns, name)
            _remember(client, kube.SECRET, ours)
            return GatewayKey(ours)
    ops = gateway_key_rewrite(body, uid, deployment, secret)
    if ops is None:
        if secret is None:  # a 409 the Deployment's record vouches for: remembered from now on
            _remember(client, kube.SECRET, ours)
        return GatewayKey(secret or ours)
    try:
        client.json_patch(kube.SECRET, ns, name, ops)
    except kube.NotFound:  # gone since it was remembered
        _forget(client, ns, name)
        if client.create(kube.SECRET, ns, body) is None:
            return GatewayKey(foreign)  # re-created by someone else in between: not known to be ours
        _remember(client, kube.SECRET, ours)
        return GatewayKey(ours)
    except kube.Rejected as e:
        if not e.patch_not_applicable:
            return GatewayKey(
                secret or claimed, f"the API server refused to rewrite Secret {name}: {e.message}"
            )
        _forget(client, ns, name)  # the owner test failed: someone else's Secret, left as it is
        log.warning("Secret %s/%s is not this ModelDeployment's: not rewritten", ns, name)
        return GatewayKey(foreign)
    except kube.Forbidden as e:
        return GatewayKey(secret or claimed, f"the operator may not rewrite Secret {name}: {e.message}")
    log.info("rewrite Secret %s/%s with the current gateway credential", ns, name)
    _remember(client, kube.SECRET, ours)
    return GatewayKey(ours)


def _settle_gateway_key(
    md: ModelDeployment,
    client: kube.Kube,
    desired: Desired,
    observed: dict[tuple[str, str], dict[str, Any] | None],
) -> tuple[Desired, EventSpec | None]:
    """Make the gateway-key Secret (when one is desired) hold the current credential, updating
    `observed`; `desired` with the Deployment's record held where it is, and a Warning, when the
    credential could not be written."""
    key = (kube.SECRET.kind, names.gateway_key_secret_name(md))
    if not any(k is kube.SECRET and n == key[1] for k, n, _ in desired):
        return desired, None
    deployment = observed.get((kube.DEPLOYMENT.kind, names.deployment_name(md)))
    found = _gateway_key_secret(md, client, desired, observed.get(key), deployment)
    observed[key] = found.secret
    if found.not_written is None:
        return desired, None
    log.warning("%s/%s: %s", md.namespace, md.name, found.not_written)
    event = EventSpec("Warning", "GatewayKeyNotWritten", found.not_written)
    return hold_gateway_key_record(desired, deployment), event


def _apply(
    action: Action,
    md: ModelDeployment,
    client: kube.Kube,
    deployment: dict[str, Any] | None,
    result: Result,
    taken: list[str],
) -> dict[str, Any] | None:
    """Make one write; returns the Deployment as it is after it (for the status). A create answered
    with 409 for an object the caches did not show is looked at: someone else's joins `taken`."""
    ns = md.namespace
    if action.verb == "create":
        manifest = action.body.materialise() if isinstance(action.body, _LazySecret) else action.body
        assert manifest is not None
        created = client.create(action.kind, ns, prune(manifest))
        if created is None and action.kind is kube.SECRET:
            # 409, and the operator may not read Secrets to tell whose it is: taken as its own. (Not
            # reached by the Secrets reconcile makes: the generated API-key Secret and the gateway-key
            # Secret are created before the plan, by _generated_secret and _gateway_key_secret, which
            # tell whose a 409 is.)
            _remember(client, kube.SECRET, {"metadata": {**prune(manifest)["metadata"]}})
            return deployment
        if created is None:  # it appeared since the read (409): observe the one that is there
            there = _fetch(client, action.kind, ns, action.name)
            if there is not None and not owned_by(there, str(md.metadata.get("uid") or "")):
                taken.append(f"{action.kind.kind}/{action.name}")
                return None if action.kind is kube.DEPLOYMENT else deployment
            if there is not None:
                _remember(client, action.kind, there)
            return there if action.kind is kube.DEPLOYMENT else deployment
        if action.kind is kube.DEPLOYMENT:
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
    recorder: EventRecorder | None = None,
) -> Result:
    """Bring the children of one ModelDeployment in line with its spec, then its status with the children.

    `client` is a `cached_kube.CachedKube` in the operator (reads from the watch caches, writes to the API),
    so a reconcile with nothing to do sends no request at all.
    Raises pydantic.ValidationError for a spec the operator cannot act on (the caller records it);
    kube.ApiError for a write the API server refused (the caller records it and backs off).
    """
    md = ModelDeployment.model_validate(
        {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec") if body.get(k) is not None}
    )
    policy.check(md, settings)
    ns = md.namespace
    result = Result()
    uid = str(md.metadata.get("uid") or "")
    previous = dict(body.get("status") or {})

    desired = desired_children(md, settings, api_key)
    pool = inference_pool.desired(md, settings, client)  # [] unless the cluster has the InferencePool CRD
    desired += pool
    observed: dict[tuple[str, str], dict[str, Any] | None] = {
        (kind.kind, name): client.get(kind, ns, name) for kind, name, _ in desired
    }
    secret_key = (kube.SECRET.kind, names.generated_api_key_secret_name(md))
    _forget_stale_secret(client, observed, secret_key, ns, uid)
    missing_secret = _missing_secret(md, client)
    deployment_key = (kube.DEPLOYMENT.kind, names.deployment_name(md))

    def observe(taken: list[str], deployment: dict[str, Any] | None) -> dict[str, Any]:
        if deployment is not None and not owned_by(deployment, uid):
            deployment = None  # someone else's Deployment says nothing about this ModelDeployment's instances
        pods = client.list(kube.POD, ns, names.selector_string(md)) if deployment is not None else []
        observed_now = Observed(deployment, pods, missing_secret, taken, _pod_events(client, ns, pods))
        status = compute_status(md, observed_now, settings, now, previous)
        if f"{kube.SECRET.kind}/{secret_key[1]}" in taken:
            status["apiKeySecret"] = None  # someone else's: no record that it is ours (_generated_secret)
        status["inferencePool"] = inference_pool.pool_status(
            md,
            observed.get((kube.INFERENCE_POOL.kind, names.inference_pool_name(md))),
            any(m for _, _, m in pool),
        )
        return status

    def write_status(status: dict[str, Any]) -> None:
        nonlocal previous
        if managed_status(status) != managed_status(previous):
            client.patch_status(kube.MODEL_DEPLOYMENT, ns, md.name, status)
            result.status_written = True
            previous = {**previous, **status}

    body_status = dict(previous)
    if names.generates_api_key_secret(md) and observed.get(secret_key) is None:

        def record() -> None:
            write_status(observe(conflicts(desired, observed, uid), observed.get(deployment_key)))

        observed[secret_key] = _generated_secret(md, client, desired, previous, record)
    desired, gateway_key_event = _settle_gateway_key(md, client, desired, observed)
    taken = conflicts(desired, observed, uid)
    if any(c.startswith(f"{kube.SECRET.kind}/") for c in taken):
        # someone else's Secret under the generated name: the instances must not mount it as their keys
        desired = [d for d in desired if d[0] is not kube.DEPLOYMENT]
    result.actions = plan(desired, observed, owner_uid=uid)
    deployment = observed.get(deployment_key)
    for action in result.actions:
        deployment = _apply(action, md, client, deployment, result, taken)
        log.info("%s %s %s/%s", action.verb, action.kind.kind, ns, action.name)

    status = observe(taken, deployment)
    result.status = status
    write_status(status)
    if taken and _ready(status).get("message") != _ready(body_status).get("message"):
        result.events.append(EventSpec("Warning", "ChildConflict", str(_ready(status).get("message", ""))))
    result.events += status_events(body_status, status)
    if gateway_key_event is not None:
        result.events.append(gateway_key_event)
    (recorder.emit if recorder is not None else emit)(client, body, result.events, now)
    return result


# (issue 14, tenancy helper) Why a pod stays ContainerCreating is only in its Events (Multi-Attach, a
# failed mount): they are read only while some pod is in that state, one LIST of the namespace's Events.
def _pod_events(client: kube.Kube, namespace: str, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not pod_events_needed(pods):
        return []
    return volume_events(client.list(kube.EVENT, namespace, ""))


def _forget_stale_secret(
    client: kube.Kube,
    observed: dict[tuple[str, str], dict[str, Any] | None],
    key: tuple[str, str],
    namespace: str,
    uid: str,
) -> None:
    """A generated Secret remembered for an earlier ModelDeployment of this name (it goes with that
    one): forget it and ask again."""
    stale = observed.get(key)
    if stale is not None and isinstance(client, CachedKube) and not owned_by(stale, uid):
        client.forget(kube.SECRET, namespace, key[1])
        observed[key] = None

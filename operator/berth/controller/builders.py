"""Pure builders: a ModelDeployment (and the operator's settings) in, a child manifest out.

No client, no kopf, no clock, no randomness (the generated API key is passed in), so every builder
is golden-file tested. Every child carries the `app.kubernetes.io/*` labels and a controller
ownerReference to its ModelDeployment, so the garbage collector removes it with its owner.

The Deployment wraps the instance pod of pod.py (composed there from small parts, one per concern:
the model source, auth, resources, probes and security contexts); the other children are here.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from berth.api.models import ModelDeployment
from berth.controller import names
from berth.controller.pod import pod_metadata, pod_spec
from berth.controller.settings import OperatorSettings

Manifest = dict[str, Any]


def _metadata(md: ModelDeployment, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": md.namespace,
        "labels": names.labels(md),
        "ownerReferences": [names.owner_reference(md)],
    }


# ---------------------------------------------------------------- the Deployment


def build_deployment(md: ModelDeployment, settings: OperatorSettings) -> Manifest:
    """The Deployment running `capacity` server instances."""
    spec = md.spec
    overrides = spec.pod_template
    recorded = {"labels": sorted(overrides.labels), "annotations": sorted(overrides.annotations)}
    metadata = _metadata(md, names.deployment_name(md))
    metadata["annotations"] = {names.POD_METADATA_KEYS: json.dumps(recorded, separators=(",", ":"))}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.capacity,
            "selector": {"matchLabels": names.selector_labels(md)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {
                    "maxSurge": spec.rollout.max_surge,
                    "maxUnavailable": spec.rollout.max_unavailable,
                },
            },
            "revisionHistoryLimit": 3,
            # Longer than one startup budget: a pod may spend a budget downloading its model and another
            # loading it; status.py never gives up on a pod still on its way, whatever the deadline says.
            "progressDeadlineSeconds": 2 * settings.startup_seconds,
            "template": {"metadata": pod_metadata(md, settings), "spec": pod_spec(md, settings)},
        },
    }


# ---------------------------------------------------------------- the other children


def build_service(md: ModelDeployment) -> Manifest:
    """The ClusterIP Service: port 80 (name http) to the server port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(md, names.service_name(md)),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector_labels(md),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_api_key_secret(md: ModelDeployment, key: str) -> Manifest:
    """The generated API-key Secret (entry name = key id). Created once; a reconcile never rewrites it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(md, names.generated_api_key_secret_name(md)),
        "type": "Opaque",
        "data": {"default": base64.b64encode(key.encode()).decode()},
    }


def build_network_policy(md: ModelDeployment, settings: OperatorSettings) -> Manifest | None:
    """Ingress allow-list from spec.access; None when access is not set."""
    access = md.spec.access
    if access is None:
        return None
    namespaces = sorted({md.namespace, settings.operator_namespace, *access.allowed_namespaces})
    peers: list[dict[str, Any]] = [
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}
                ]
            }
        }
    ]
    peers += [{"ipBlock": {"cidr": cidr}} for cidr in access.allowed_cidrs]
    peers.append(gateway_peer(settings))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(md, names.network_policy_name(md)),
        "spec": {
            "podSelector": {"matchLabels": names.selector_labels(md)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": settings.server_port}]}],
        },
    }


def build_pdb(md: ModelDeployment) -> Manifest | None:
    """At most one instance voluntarily disrupted at a time; None for capacity <= 1."""
    if md.spec.capacity <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(md, names.pdb_name(md)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": names.selector_labels(md)},
            # a crash-looping or never-ready instance never blocks a node drain
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


# ------------------------------------------------------------------------------------- the gateway

# The key id the server trusts to name the tenant's key (berth.server.auth.GATEWAY_KEY_ID; the
# operator imports no server code) and the label the chart puts on the gateway's pods.
GATEWAY_KEY_ID = "berth-gateway"
GATEWAY_POD_LABELS = {"berth.dev/gateway": "true"}


def gateway_peer(settings: OperatorSettings) -> dict[str, Any]:
    """The NetworkPolicy peer of the gateway's pods: an instance with spec.access always admits them."""
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.gateway_ns()}},
        "podSelector": {"matchLabels": dict(GATEWAY_POD_LABELS)},
    }


def build_gateway_key_secret(md: ModelDeployment, credential: str) -> Manifest | None:
    """The Secret with the instance's gateway credential (entry ``berth-gateway``, derived by HMAC from
    the gateway master key; no tenant holds it); None when the instance's auth is off."""
    if names.api_key_secret_name(md) is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(md, names.gateway_key_secret_name(md)),
        "type": "Opaque",
        "data": {GATEWAY_KEY_ID: base64.b64encode(credential.encode()).decode()},
    }


# The Deployment's record of the credential its gateway-key Secret holds: a fingerprint, on the
# Deployment's own metadata. Not on the pod template (a new value would roll every pod, and the
# server reloads its key directory without one), not in the ModelDeployment's status (a CRD field,
# recomputed each reconcile): the Deployment is the operator's own object, in its watch cache, and
# the plan's merge patch advances the record only after the Secret was written with that credential
# (reconcile.py: someone else's Secret keeps the Deployment out of the plan). A new Deployment is
# created with the record of the Secret it mounts. (A Deployment annotation bumps its generation, and
# the deployment controller copies it onto the ReplicaSet; the pod template and its hash stay.)
GATEWAY_KEY_FINGERPRINT = "berth.dev/gateway-key-sha256"


def gateway_key_fingerprint(credential: str) -> str:
    """The first 16 hex digits of SHA-256(credential): tells credentials apart and reveals nothing of
    one (the credential is a 256-bit HMAC output, not guessable from its hash)."""
    return hashlib.sha256(credential.encode()).hexdigest()[:16]


def gateway_credential(secret: Manifest) -> str:
    """The credential a build_gateway_key_secret manifest holds."""
    return base64.b64decode(secret["data"][GATEWAY_KEY_ID]).decode()


def mount_gateway_key(deployment: Manifest, md: ModelDeployment, credential: str) -> Manifest:
    """The Deployment with its API-key volume projected from the instance's keys *and* the gateway
    key Secret, so the server, which reads one directory, accepts both, and the fingerprint of the
    credential in its metadata (GATEWAY_KEY_FINGERPRINT). Unchanged when auth is off."""
    keys = names.api_key_secret_name(md)
    if keys is None:
        return deployment
    volume = {
        "name": "api-keys",
        "projected": {
            "defaultMode": 0o440,
            "sources": [
                {"secret": {"name": keys}},
                {
                    "secret": {
                        "name": names.gateway_key_secret_name(md),
                        "items": [{"key": GATEWAY_KEY_ID, "path": GATEWAY_KEY_ID}],
                    }
                },
            ],
        },
    }
    template = deployment["spec"]["template"]
    pod = template["spec"]
    volumes = [volume if v.get("name") == "api-keys" else v for v in pod.get("volumes") or []]
    metadata = deployment["metadata"]
    annotations = {
        **(metadata.get("annotations") or {}),
        GATEWAY_KEY_FINGERPRINT: gateway_key_fingerprint(credential),
    }
    return {
        **deployment,
        "metadata": {**metadata, "annotations": annotations},
        "spec": {**deployment["spec"], "template": {**template, "spec": {**pod, "volumes": volumes}}},
    }


# ---------------------------------------------------------------------------- the InferencePool

INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"


def build_inference_pool(md: ModelDeployment, settings: OperatorSettings) -> Manifest | None:
    """The InferencePool of the instances (selector and target port of their pods, the endpoint
    picker to ask); None when spec.inferencePool.enabled is false."""
    pool = md.spec.inference_pool
    if not pool.enabled:
        return None
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": _metadata(md, names.inference_pool_name(md)),
        "spec": {
            "selector": {"matchLabels": names.selector_labels(md)},
            "targetPorts": [{"number": settings.server_port}],
            "endpointPickerRef": {
                "name": pool.endpoint_picker or f"{md.name}-epp",
                "port": {"number": pool.endpoint_picker_port},
                "failureMode": pool.failure_mode,
            },
        },
    }

"""What a ModelDeployment's children are called and how they are found: names, labels, selectors,
the owner reference, the endpoint. Pure; the builders, the status and the handlers share them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from berth.api.models import API_VERSION, KIND, ModelDeployment
from berth.controller.settings import OperatorSettings

SELECTOR_LABEL = "berth.dev/model-deployment"
MANAGED_BY = "berth-operator"
# The label every object the operator creates carries (the handlers watch Deployments and Pods by it).
MANAGED_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}
# On the Deployment: the pod-template label and annotation keys that came from spec.podTemplate, so
# that the reconcile can remove a key the spec no longer names (others' keys, such as kubectl's
# restartedAt, are left alone).
POD_METADATA_KEYS = "berth.dev/pod-template-keys"


def labels(md: ModelDeployment) -> dict[str, str]:
    """The labels every child and every instance pod carries."""
    return {
        "app.kubernetes.io/name": "berth-server",
        "app.kubernetes.io/instance": md.name,
        "app.kubernetes.io/component": "inference-server",
        "app.kubernetes.io/part-of": "berth",
        **MANAGED_LABELS,
        SELECTOR_LABEL: md.name,
    }


def selector_labels(md: ModelDeployment) -> dict[str, str]:
    return {SELECTOR_LABEL: md.name}


def selector_string(md: ModelDeployment) -> str:
    """The instance pods' label selector in string form (status.selector, for the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(md).items()))


def owner_reference(md: ModelDeployment) -> dict[str, Any]:
    """The controller ownerReference every child carries (the garbage collector removes it with `md`)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": md.name,
        "uid": md.metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_name(obj: Mapping[str, Any]) -> str | None:
    """The name of the ModelDeployment that controls `obj`, or None when none does."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller"):
            return str(ref.get("name"))
    return None


def deployment_name(md: ModelDeployment) -> str:
    return md.name


def service_name(md: ModelDeployment) -> str:
    return md.name


def network_policy_name(md: ModelDeployment) -> str:
    return md.name


def pdb_name(md: ModelDeployment) -> str:
    return md.name


def generated_api_key_secret_name(md: ModelDeployment) -> str:
    """The Secret the operator generates when spec.auth.apiKeySecretRef is not set."""
    return f"{md.name}-api-keys"


def generates_api_key_secret(md: ModelDeployment) -> bool:
    return md.spec.auth.mode == "apiKey" and not md.spec.auth.api_key_secret_ref


def api_key_secret_name(md: ModelDeployment) -> str | None:
    """The Secret the instances read their keys from; None when auth is off."""
    if md.spec.auth.mode == "none":
        return None
    return md.spec.auth.api_key_secret_ref or generated_api_key_secret_name(md)


def gateway_key_secret_name(md: ModelDeployment) -> str:
    """The Secret with the instance's gateway credential (projected next to its API keys)."""
    return f"{md.name}-gateway-key"


def inference_pool_name(md: ModelDeployment) -> str:
    return md.name


def endpoint(md: ModelDeployment, settings: OperatorSettings) -> str:
    """The in-cluster OpenAI base URL (status.endpoint)."""
    return f"http://{service_name(md)}.{md.namespace}.svc.{settings.cluster_domain}/v1"

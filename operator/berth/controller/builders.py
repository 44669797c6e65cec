"""Pure builders: a ModelDeployment (and the operator's settings) in, a child manifest out.

No client, no kopf, no clock, no randomness (the generated API key is passed in), so every builder
is golden-file tested. Every child carries the `app.kubernetes.io/*` labels and a controller
ownerReference to its ModelDeployment, so the garbage collector removes it with its owner.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from berth.api.models import API_VERSION, KIND, ModelDeployment, ModelUri
from berth.controller.settings import OperatorSettings

Manifest = dict[str, Any]

MODEL_ROOT = "/models"
ADAPTER_ROOT = "/adapters"
API_KEY_DIR = "/etc/berth/api-keys"
SELECTOR_LABEL = "berth.dev/model-deployment"
MANAGED_BY = "berth-operator"
USER_ID = 1000
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
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SELECTOR_LABEL: md.name,
    }


def selector_labels(md: ModelDeployment) -> dict[str, str]:
    return {SELECTOR_LABEL: md.name}


def selector_string(md: ModelDeployment) -> str:
    """The instance pods' label selector in string form (status.selector, for the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(md).items()))


def owner_reference(md: ModelDeployment) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": md.name,
        "uid": md.metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(md: ModelDeployment, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": md.namespace,
        "labels": labels(md),
        "ownerReferences": [owner_reference(md)],
    }


def deployment_name(md: ModelDeployment) -> str:
    return md.name


def service_name(md: ModelDeployment) -> str:
    return md.name


def api_key_secret_name(md: ModelDeployment) -> str | None:
    """The Secret the instances read their keys from; None when auth is off."""
    if md.spec.auth.mode == "none":
        return None
    return md.spec.auth.api_key_secret_ref or f"{md.name}-api-keys"


def endpoint(md: ModelDeployment, settings: OperatorSettings) -> str:
    return f"http://{service_name(md)}.{md.namespace}.svc.{settings.cluster_domain}/v1"


def _mount(name: str, path: str, read_only: bool) -> dict[str, Any]:
    # readOnly only when true: the API server drops a false one, and the diff would see a change each time
    return (
        {"name": name, "mountPath": path, "readOnly": True}
        if read_only
        else {"name": name, "mountPath": path}
    )


def _source_volume(
    uri: ModelUri, volume: str, mount: str
) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
    """(volume, path the server reads, init container download spec or None) for one model or adapter source."""
    if uri.scheme == "pvc":
        vol = {"name": volume, "persistentVolumeClaim": {"claimName": uri.location, "readOnly": True}}
        return vol, f"{mount}/{uri.path}".rstrip("/"), None
    if uri.scheme == "hostpath":
        return {"name": volume, "hostPath": {"path": uri.location, "type": "Directory"}}, mount, None
    if uri.scheme == "hf":
        download = {"repo": uri.location, "revision": uri.path or "main", "dir": mount}
        return {"name": volume, "emptyDir": {}}, mount, download
    raise ValueError(f"no volume for {uri.scheme}://")


def _hf_init_container(
    md: ModelDeployment,
    image: str,
    downloads: list[tuple[str, dict[str, Any]]],
    pull_policy: str,
    resources: dict[str, Any],
) -> dict[str, Any]:
    """One init container that downloads every hf:// source into its cache volume."""
    script = " && ".join(
        f"hf download {d['repo']} --revision {d['revision']} --local-dir {d['dir']}" for _, d in downloads
    )
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": "/tmp/hf"}, {"name": "HOME", "value": "/tmp"}]
    ref = md.spec.model.hf_token_secret_ref
    if ref is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return {
        "name": "download-model",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["sh", "-c", script],
        "env": env,
        "volumeMounts": [{"name": vol, "mountPath": d["dir"]} for vol, d in downloads]
        + [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _container_security(),
    }


def cpu_threads(cpu: str) -> int:
    """Whole CPUs in a CPU quantity ("2" -> 2, "1500m" -> 2, "500m" -> 1): the server's torch thread count.

    torch sizes its thread pool from the node's cores, not the pod's limit; on a big node a small pod
    would oversubscribe its quota and stall every decode step.
    """
    from kubernetes.utils import parse_quantity

    try:
        threads: int = math.ceil(parse_quantity(cpu))  # type: ignore[no-untyped-call]
        return max(1, threads)
    except (ValueError, ArithmeticError):
        return 1


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def server_args(
    md: ModelDeployment, settings: OperatorSettings, model_path: str, adapters: list[str]
) -> list[str]:
    """The `berth serve` arguments of an instance."""
    spec = md.spec
    args = [
        "serve",
        "--model",
        model_path,
        "--served-model-name",
        md.served_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(settings.server_port),
        "--dtype",
        spec.model.dtype,
        "--device",
        "cuda" if spec.resources.gpus > 0 else "cpu",
        "--max-num-seqs",
        str(spec.engine.max_num_seqs),
        "--max-queue",
        str(spec.engine.max_queue),
        "--kv-cache-memory-fraction",
        str(spec.engine.kv_cache_memory_fraction),
        "--drain-timeout",
        str(max(settings.drain_seconds - 10, 1)),
    ]
    if spec.model.max_model_len is not None:
        args += ["--max-model-len", str(spec.model.max_model_len)]
    for adapter in adapters:
        args += ["--adapter", adapter]
    if api_key_secret_name(md) is not None:
        args += ["--api-key-dir", API_KEY_DIR]
    return args + list(spec.engine.extra_args)


def build_deployment(md: ModelDeployment, settings: OperatorSettings) -> Manifest:
    """The Deployment running `capacity` server instances."""
    spec = md.spec
    gpus = spec.resources.gpus
    image = spec.image or (settings.server_image if gpus > 0 else settings.server_cpu_image)

    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    downloads: list[tuple[str, dict[str, Any]]] = []

    uri = spec.model.parsed_uri
    if uri.scheme == "builtin":
        model_path = spec.model.uri
    else:
        vol, model_path, download = _source_volume(uri, "model", f"{MODEL_ROOT}/{uri.scheme}")
        volumes.append(vol)
        mounts.append(
            {"name": "model", "mountPath": f"{MODEL_ROOT}/{uri.scheme}", "readOnly": download is None}
        )
        if download:
            downloads.append(("model", download))

    adapter_args: list[str] = []
    for adapter in spec.model.adapters:
        vol_name = f"adapter-{adapter.name}"
        vol, path, download = _source_volume(
            ModelUri.parse(adapter.uri), vol_name, f"{ADAPTER_ROOT}/{adapter.name}"
        )
        volumes.append(vol)
        mounts.append(
            {"name": vol_name, "mountPath": f"{ADAPTER_ROOT}/{adapter.name}", "readOnly": download is None}
        )
        if download:
            downloads.append((vol_name, download))
        adapter_args.append(f"{adapter.name}={path}")

    secret = api_key_secret_name(md)
    if secret is not None:
        volumes.append({"name": "api-keys", "secret": {"secretName": secret, "defaultMode": 0o440}})
        mounts.append({"name": "api-keys", "mountPath": API_KEY_DIR, "readOnly": True})

    cpu = spec.resources.cpu or settings.default_cpu
    memory = spec.resources.memory or settings.default_memory
    cpu_memory: dict[str, Any] = {"cpu": cpu, "memory": memory}
    limits: dict[str, Any] = dict(cpu_memory)
    if gpus > 0:
        limits[spec.resources.gpu_resource_name] = gpus
    # Requests name every limit (the API server would otherwise copy the GPU limit into requests, and the
    # reconcile, which owns these maps whole, would see a key it did not ask for).
    requests: dict[str, Any] = dict(limits)

    env: list[dict[str, Any]] = [
        {"name": "OMP_NUM_THREADS", "value": str(cpu_threads(cpu))},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *spec.pod_template.env,
    ]
    port = settings.server_port
    container: dict[str, Any] = {
        "name": "server",
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": server_args(md, settings, model_path, adapter_args),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        # Started = the model is loaded and warmed up (so `started` tells a loading pod from one that
        # served and then lost readiness); liveness and readiness probes wait for it.
        "startupProbe": {
            "httpGet": {"path": "/health/ready", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": max(settings.startup_seconds // 5, 1),
        },
        "livenessProbe": {
            "httpGet": {"path": "/health/live", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/health/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        # Endpoints stop sending new requests before SIGTERM; then the server drains its in-flight streams.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
    }

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": settings.drain_seconds,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    overrides = spec.pod_template
    tolerations = list(overrides.tolerations)
    if gpus > 0 and not any(t.get("key") == spec.resources.gpu_resource_name for t in tolerations):
        tolerations.append(
            {"key": spec.resources.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"}
        )
    init = [
        _hf_init_container(
            md, image, downloads, settings.image_pull_policy, {"requests": cpu_memory, "limits": cpu_memory}
        )
    ]
    # Optional fields are None when unset (not left out), so that the merge patch removes them from an
    # existing Deployment when the spec stops asking for them (e.g. hf:// -> pvc:// drops the download).
    pod_spec.update(
        {
            "initContainers": init if downloads else None,
            "nodeSelector": dict(overrides.node_selector) or None,
            "tolerations": tolerations or None,
            "affinity": overrides.affinity or None,
            "priorityClassName": overrides.priority_class_name or None,
            "imagePullSecrets": [{"name": n} for n in overrides.image_pull_secrets] or None,
        }
    )

    pod_labels = {**overrides.labels, **labels(md)}
    pod_annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
        **overrides.annotations,
    }
    metadata = _metadata(md, deployment_name(md))
    metadata["annotations"] = {
        POD_METADATA_KEYS: json.dumps(
            {"labels": sorted(overrides.labels), "annotations": sorted(overrides.annotations)},
            separators=(",", ":"),
        )
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.capacity,
            "selector": {"matchLabels": selector_labels(md)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {
                    "maxSurge": spec.rollout.max_surge,
                    "maxUnavailable": spec.rollout.max_unavailable,
                },
            },
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": settings.startup_seconds,
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": pod_spec,
            },
        },
    }


def build_service(md: ModelDeployment, settings: OperatorSettings) -> Manifest:
    """The ClusterIP Service: port 80 (name http) to the server port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(md, service_name(md)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(md),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_api_key_secret(md: ModelDeployment, key: str) -> Manifest:
    """The generated API-key Secret (entry name = key id). Created once; a reconcile never rewrites it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(md, f"{md.name}-api-keys"),
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
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(md, md.name),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(md)},
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
        "metadata": _metadata(md, md.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(md)}},
    }

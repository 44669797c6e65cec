"""The instance pod, composed from small parts, one per concern: the model source (volumes, mounts and
the download init container), auth (the API-key volume), resources, probes, security contexts, the
server's arguments and the pod template overrides. Pure, like builders.py, which wraps the pod spec
and metadata into the Deployment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from berth.api.models import ModelDeployment, ModelUri
from berth.api.quantity import parse_quantity
from berth.controller import names
from berth.controller.settings import OperatorSettings

MODEL_ROOT = "/models"
ADAPTER_ROOT = "/adapters"
API_KEY_DIR = "/etc/berth/api-keys"
USER_ID = 1000
DOWNLOAD_CONTAINER = "download-model"
TERMINATION_LOG = "/dev/termination-log"

# The download init container's program (`python -c`; the server image has huggingface_hub). Arguments:
# the termination-message path, then (volume, repo, revision, dir) per source. Each revision (branch, tag or commit) is resolved to a commit
# first and exactly that commit is fetched; {volume: commit} goes to the termination message, where the
# operator reads it into status.modelRevision.
DOWNLOAD_SCRIPT = """\
import json, sys
from huggingface_hub import HfApi, snapshot_download
log_path, args, resolved = sys.argv[1], sys.argv[2:], {}
for volume, repo, revision, target in zip(args[0::4], args[1::4], args[2::4], args[3::4]):
    commit = HfApi().model_info(repo, revision=revision).sha
    print(f"{repo}@{revision} is commit {commit}: downloading into {target}", flush=True)
    snapshot_download(repo, revision=commit, local_dir=target)
    resolved[volume] = commit
with open(log_path, "w") as log:
    json.dump(resolved, log)
"""


@dataclass
class PodParts:
    """What one concern adds to the instance pod: volumes, server mounts, hf:// downloads."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    # (volume, {"repo", "revision", "dir"}) for each source the init container downloads
    downloads: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def add(self, other: PodParts) -> None:
        self.volumes += other.volumes
        self.mounts += other.mounts
        self.downloads += other.downloads


@dataclass
class ModelSource(PodParts):
    """The model and its adapters: where the server reads them, and the pod parts that put them there."""

    model_path: str = ""
    adapter_args: list[str] = field(default_factory=list)  # `--adapter name=path` values


def scratch() -> PodParts:
    """The writable directories of a read-only root filesystem: /tmp and a shared-memory /dev/shm."""
    return PodParts(
        volumes=[
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
        mounts=[{"name": "tmp", "mountPath": "/tmp"}, {"name": "shm", "mountPath": "/dev/shm"}],
    )


def _source(
    uri: ModelUri, volume: str, mount: str, cache_size: str = "", revision: str = ""
) -> tuple[PodParts, str]:
    """(pod parts, path the server reads) for one model or adapter source mounted at `mount`.

    hf:// sources download into an emptyDir of `cache_size` (its sizeLimit) at `revision` (else the
    uri's @revision, else main)."""
    if uri.scheme == "pvc":
        vol = {"name": volume, "persistentVolumeClaim": {"claimName": uri.location, "readOnly": True}}
        path = f"{mount}/{uri.path}".rstrip("/")
    elif uri.scheme == "hostpath":
        vol, path = {"name": volume, "hostPath": {"path": uri.location, "type": "Directory"}}, mount
    elif uri.scheme == "hf":
        download = {"repo": uri.location, "revision": revision or uri.path or "main", "dir": mount}
        parts = PodParts(
            volumes=[{"name": volume, "emptyDir": {"sizeLimit": cache_size} if cache_size else {}}],
            mounts=[{"name": volume, "mountPath": mount, "readOnly": False}],
            downloads=[(volume, download)],
        )
        return parts, mount
    else:
        raise ValueError(f"no volume for {uri.scheme}://")
    return PodParts(volumes=[vol], mounts=[{"name": volume, "mountPath": mount, "readOnly": True}]), path


def cache_size(md: ModelDeployment, settings: OperatorSettings) -> str:
    """Size of each hf:// download volume: spec.model.cacheSize, else the operator's default."""
    return md.spec.model.cache_size or settings.model_cache_size


def model_source(md: ModelDeployment, settings: OperatorSettings) -> ModelSource:
    """Volumes, mounts and downloads for spec.model (builtin:// is in the image) and its adapters."""
    model = md.spec.model
    source = ModelSource(model_path=model.uri)
    uri = model.parsed_uri
    size = cache_size(md, settings)
    if uri.scheme != "builtin":
        parts, source.model_path = _source(
            uri, "model", f"{MODEL_ROOT}/{uri.scheme}", size, model.revision or ""
        )
        source.add(parts)
    for adapter in model.adapters:
        parts, path = _source(
            ModelUri.parse(adapter.uri), f"adapter-{adapter.name}", f"{ADAPTER_ROOT}/{adapter.name}", size
        )
        source.add(parts)
        source.adapter_args.append(f"{adapter.name}={path}")
    return source


def auth(md: ModelDeployment) -> PodParts:
    """The API-key Secret mounted read-only where the server reads it (nothing when auth is off)."""
    secret = names.api_key_secret_name(md)
    if secret is None:
        return PodParts()
    return PodParts(
        volumes=[{"name": "api-keys", "secret": {"secretName": secret, "defaultMode": 0o440}}],
        mounts=[{"name": "api-keys", "mountPath": API_KEY_DIR, "readOnly": True}],
    )


def cpu_threads(cpu: str) -> int:
    """Whole CPUs in a CPU quantity ("2" -> 2, "1500m" -> 2, "500m" -> 1): the server's torch thread count.

    torch sizes its thread pool from the node's cores, not the pod's limit; on a big node a small pod
    would oversubscribe its quota and stall every decode step.
    """
    try:
        return max(1, math.ceil(parse_quantity(cpu)))
    except (ValueError, ArithmeticError):
        return 1


def _cpu_memory(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "cpu": md.spec.resources.cpu or settings.default_cpu,
        "memory": md.spec.resources.memory or settings.default_memory,
    }


def server_resources(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    """Requests = limits: CPU, memory and the GPUs of one instance."""
    limits = _cpu_memory(md, settings)
    if md.spec.resources.gpus > 0:
        limits[md.spec.resources.gpu_resource_name] = md.spec.resources.gpus
    # Requests name every limit (the API server would otherwise copy the GPU limit into requests, and the
    # reconcile, which owns these maps whole, would see a key it did not ask for).
    return {"requests": dict(limits), "limits": limits}


def download_resources(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    """The download init container's: an instance's CPU and memory, no GPU (a ResourceQuota on CPU or
    memory refuses a pod with any container that names none; the pod's request stays the server's),
    and the download volume's size as an ephemeral-storage request (the emptyDir lives on the node's
    disk: the scheduler must pick a node with room for the model)."""
    return {
        "requests": {**_cpu_memory(md, settings), "ephemeral-storage": cache_size(md, settings)},
        "limits": _cpu_memory(md, settings),
    }


def probes(settings: OperatorSettings) -> dict[str, Any]:
    """Startup, liveness and readiness probes and the preStop hook of the server container."""
    return {
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


def container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
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
        "--backend",
        spec.engine.backend,
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
    if spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    for adapter in adapters:
        args += ["--adapter", adapter]
    if names.api_key_secret_name(md) is not None:
        args += ["--api-key-dir", API_KEY_DIR]
    return args + list(spec.engine.extra_args)


def server_image(md: ModelDeployment, settings: OperatorSettings) -> str:
    if md.spec.image:
        return md.spec.image
    return settings.server_image if md.spec.resources.gpus > 0 else settings.server_cpu_image


def _server_container(
    md: ModelDeployment, settings: OperatorSettings, source: ModelSource, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "OMP_NUM_THREADS", "value": str(cpu_threads(_cpu_memory(md, settings)["cpu"]))},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *md.spec.pod_template.env,
    ]
    return {
        "name": "server",
        "image": server_image(md, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "args": server_args(md, settings, source.model_path, source.adapter_args),
        "ports": [{"name": "http", "containerPort": settings.server_port, "protocol": "TCP"}],
        "env": env,
        "resources": server_resources(md, settings),
        "volumeMounts": mounts,
        "securityContext": container_security(),
        **probes(settings),
    }


def _download_container(
    md: ModelDeployment, settings: OperatorSettings, downloads: list[tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    """One init container that downloads every hf:// source into its cache volume, each at a commit it
    resolves first and reports in its termination message (DOWNLOAD_SCRIPT)."""
    argv = [x for vol, d in downloads for x in (vol, d["repo"], d["revision"], d["dir"])]
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    ref = md.spec.model.hf_token_secret_ref
    if ref is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return {
        "name": DOWNLOAD_CONTAINER,
        "image": server_image(md, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-c", DOWNLOAD_SCRIPT, TERMINATION_LOG, *argv],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "env": env,
        "resources": download_resources(md, settings),
        "volumeMounts": [{"name": vol, "mountPath": d["dir"]} for vol, d in downloads]
        + [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": container_security(),
    }


def _tolerations(md: ModelDeployment) -> list[dict[str, Any]]:
    """spec.podTemplate.tolerations, plus one for the GPU taint when the instance asks for GPUs."""
    tolerations = list(md.spec.pod_template.tolerations)
    gpu = md.spec.resources.gpu_resource_name
    if md.spec.resources.gpus > 0 and not any(t.get("key") == gpu for t in tolerations):
        tolerations.append({"key": gpu, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def pod_spec(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    """The instance pod: the server container and whatever the model source and auth need."""
    source = model_source(md, settings)
    parts = scratch()
    parts.add(source)
    parts.add(auth(md))
    overrides = md.spec.pod_template
    init = [_download_container(md, settings, parts.downloads)] if parts.downloads else None
    return {
        "containers": [_server_container(md, settings, source, parts.mounts)],
        "volumes": parts.volumes,
        "terminationGracePeriodSeconds": settings.drain_seconds,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": pod_security(),
        # Optional fields are None when unset (not left out), so that the merge patch removes them from an
        # existing Deployment when the spec stops asking for them (e.g. hf:// -> pvc:// drops the download).
        "initContainers": init,
        "nodeSelector": dict(overrides.node_selector) or None,
        "tolerations": _tolerations(md) or None,
        "affinity": overrides.affinity or None,
        "priorityClassName": overrides.priority_class_name or None,
        "imagePullSecrets": [{"name": n} for n in overrides.image_pull_secrets] or None,
    }


def pod_metadata(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    """The pod template's labels (ours win over spec.podTemplate's) and annotations (Prometheus scraping)."""
    overrides = md.spec.pod_template
    return {
        "labels": {**overrides.labels, **names.labels(md)},
        "annotations": {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(settings.server_port),
            "prometheus.io/path": "/metrics",
            **overrides.annotations,
        },
    }

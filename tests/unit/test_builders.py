"""Builders: golden files for every child of representative specs, plus the rules the goldens must obey.

A golden file that is missing or differs fails the test. Regenerate the goldens after an intended change
with `BERTH_UPDATE_GOLDEN=1 make test-unit` (nothing else writes them), and read the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from berth.api import ModelDeployment
from berth.controller import builders, names
from berth.controller.pod import DOWNLOAD_SCRIPT
from berth.controller.settings import OperatorSettings

from .conftest import md_body

GOLDEN = Path(__file__).parent / "golden"

CASES: dict[str, dict[str, Any]] = {
    "cpu-builtin": {},
    "gpu-pvc": {
        "model": {
            "uri": "pvc://model-store/qwen2.5-7b-instruct",
            "servedName": "qwen-7b",
            "maxModelLen": 8192,
        },
        "capacity": 3,
        "resources": {"gpus": 2, "cpu": "8", "memory": "64Gi"},
        "engine": {"maxNumSeqs": 128, "extraArgs": ["--log-content"]},
        "podTemplate": {
            "nodeSelector": {"gpu.example/class": "h100"},
            "priorityClassName": "inference",
            "imagePullSecrets": ["regcred"],
            "env": [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}],
        },
        "rollout": {"maxSurge": 0, "maxUnavailable": "25%"},
    },
    "hf-lora": {
        "model": {
            "uri": "hf://Qwen/Qwen2.5-0.5B-Instruct",
            "hfTokenSecretRef": {"name": "hf-token"},
            "adapters": [
                {"name": "sql", "uri": "hf://acme/qwen-sql-lora"},
                {"name": "support", "uri": "pvc://adapters/support"},
            ],
        },
        "resources": {"gpus": 1},
    },
    "private-access": {
        "model": {"uri": "hostpath:///data/models/smollm2"},
        "capacity": 2,
        "auth": {"apiKeySecretRef": "team-keys"},
        "access": {"allowedNamespaces": ["apps"], "allowedCIDRs": ["10.20.0.0/16"]},
    },
    "open-no-auth": {"auth": {"mode": "none"}},
}


def build_all(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    children: dict[str, Any] = {
        "deployment": builders.build_deployment(md, settings),
        "service": builders.build_service(md),
        "networkpolicy": builders.build_network_policy(md, settings),
        "pdb": builders.build_pdb(md),
    }
    if names.generates_api_key_secret(md):
        children["secret"] = builders.build_api_key_secret(md, "sk-berth-golden")
    return children


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(name=case, spec=CASES[case]))
    text = yaml.safe_dump(build_all(md, settings), sort_keys=True, width=120)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("BERTH_UPDATE_GOLDEN") and os.environ.get("CI", "").lower() != "true":
        path.write_text(text)  # never under CI=true: there a missing or stale golden fails
    assert path.exists(), f"{path.name} is missing; BERTH_UPDATE_GOLDEN=1 writes it"
    assert text == path.read_text(), f"{path.name} differs; BERTH_UPDATE_GOLDEN=1 regenerates it"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_child_is_owned_and_labelled(case: str, settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(name=case, spec=CASES[case]))
    for kind, child in build_all(md, settings).items():
        if child is None:
            continue
        meta = child["metadata"]
        assert meta["namespace"] == "team-a", kind
        assert meta["labels"]["app.kubernetes.io/instance"] == case
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "berth-operator"
        (ref,) = meta["ownerReferences"]
        assert ref == {
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "ModelDeployment",
            "name": case,
            "uid": f"uid-{case}",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def _container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_gpu_deployment(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec=CASES["gpu-pvc"]))
    dep = builders.build_deployment(md, settings)
    c = _container(dep)
    assert dep["spec"]["replicas"] == 3
    assert c["image"] == "registry.example/berth-server:test"
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 2}
    args = c["args"]
    assert args[:3] == ["serve", "--model", "/models/pvc/qwen2.5-7b-instruct"]
    assert args[args.index("--served-model-name") + 1] == "qwen-7b"
    assert args[args.index("--max-model-len") + 1] == "8192"
    assert args[args.index("--device") + 1] == "cuda"
    assert args[-1] == "--log-content"
    pod = dep["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True}} in pod[
        "volumes"
    ]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": "25%"}


def test_cpu_deployment_defaults_and_hardening(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body())
    dep = builders.build_deployment(md, settings)
    c = _container(dep)
    pod = dep["spec"]["template"]["spec"]
    assert c["image"] == "registry.example/berth-server-cpu:test"
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert pod["tolerations"] is None and pod["initContainers"] is None  # absent (and removed if there)
    assert c["args"][c["args"].index("--model") + 1] == "builtin://smollm2-135m-instruct"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["startupProbe"]["httpGet"]["path"] == "/health/ready"  # started = model loaded
    # the startup budget covers settings.startup_seconds of model download and load
    assert (
        c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= settings.startup_seconds
    )
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert pod["terminationGracePeriodSeconds"] == settings.drain_seconds
    drain = int(c["args"][c["args"].index("--drain-timeout") + 1])
    assert drain < settings.drain_seconds
    keys = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert keys["secret"]["secretName"] == "chat-api-keys"
    assert {"name": "api-keys", "mountPath": "/etc/berth/api-keys", "readOnly": True} in c["volumeMounts"]


def test_hf_and_adapters(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec=CASES["hf-lora"]))
    dep = builders.build_deployment(md, settings)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][:4] == ["python", "-c", DOWNLOAD_SCRIPT, "/dev/termination-log"]
    assert init["command"][4:] == [
        "model", "Qwen/Qwen2.5-0.5B-Instruct", "main", "/models/hf",
        "adapter-sql", "acme/qwen-sql-lora", "main", "/adapters/sql",
    ]  # fmt: skip
    assert init["terminationMessagePath"] == "/dev/termination-log"
    token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
    # the download counts against a namespace's CPU/memory quota like the server (no GPU)
    # and requests the download volume's size as ephemeral storage (the emptyDir is on the node's disk)
    assert init["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "50Gi"},
        "limits": {"cpu": "2", "memory": "8Gi"},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["emptyDir"] == {"sizeLimit": "50Gi"}
    assert volumes["adapter-sql"]["emptyDir"] == {"sizeLimit": "50Gi"}
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    args = _container(dep)["args"]
    assert args[args.index("--adapter") : args.index("--adapter") + 2] == ["--adapter", "sql=/adapters/sql"]
    assert (
        "support=/adapters/support/support" in args
    )  # claim "adapters" at /adapters/support, path "support"


def test_hf_revision_pinned_and_cache_sized(settings: OperatorSettings) -> None:
    spec = {"model": {"uri": "hf://acme/tiny", "revision": "v1.2", "cacheSize": "12Gi"}}
    md = ModelDeployment.model_validate(md_body(spec=spec))
    dep = builders.build_deployment(md, settings)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][4:] == ["model", "acme/tiny", "v1.2", "/models/hf"]
    assert init["resources"]["requests"]["ephemeral-storage"] == "12Gi"
    assert next(v for v in pod["volumes"] if v["name"] == "model")["emptyDir"] == {"sizeLimit": "12Gi"}
    # the uri's @revision is the same pin; both given must agree; revision needs an hf:// model
    at = ModelDeployment.model_validate(md_body(spec={"model": {"uri": "hf://acme/tiny@abc123"}}))
    (init,) = builders.build_deployment(at, settings)["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][4:] == ["model", "acme/tiny", "abc123", "/models/hf"]
    with pytest.raises(ValueError, match="contradicts"):
        ModelDeployment.model_validate(md_body(spec={"model": {"uri": "hf://acme/tiny@a", "revision": "b"}}))
    with pytest.raises(ValueError, match=r"hf:// model\.uri only"):
        ModelDeployment.model_validate(md_body(spec={"model": {"uri": "pvc://c/p", "revision": "b"}}))


def test_progress_deadline_outlasts_a_download_and_a_load(settings: OperatorSettings) -> None:
    dep = builders.build_deployment(ModelDeployment.model_validate(md_body()), settings)
    assert dep["spec"]["progressDeadlineSeconds"] == 2 * settings.startup_seconds


STUB_HUB = """
import json, os
LOG = os.environ["STUB_LOG"]
def _log(*a):
    with open(LOG, "a") as f:
        f.write(json.dumps(a) + "\\n")
class _Info:
    def __init__(self, sha): self.sha = sha
class HfApi:
    def model_info(self, repo, revision=None):
        _log("info", repo, revision)
        return _Info("c0ffee" + str(len(repo)) if revision in ("main", "v1") else revision)
def snapshot_download(repo, revision=None, local_dir=None):
    _log("download", repo, revision, local_dir)
    os.makedirs(local_dir, exist_ok=True)
"""


def test_download_script_fetches_the_resolved_commit_and_reports_it(tmp_path: Path) -> None:
    """The init container's program, run for real against a stand-in huggingface_hub."""
    import json
    import subprocess
    import sys

    (tmp_path / "huggingface_hub.py").write_text(STUB_HUB)
    calls, term = tmp_path / "calls.jsonl", tmp_path / "termination-log"
    argv = [
        "model",
        "acme/tiny",
        "main",
        str(tmp_path / "m"),
        "adapter-a",
        "acme/lora",
        "f00d",
        str(tmp_path / "a"),
    ]
    subprocess.run(
        [sys.executable, "-c", DOWNLOAD_SCRIPT, str(term), *argv],
        check=True,
        env={"PYTHONPATH": str(tmp_path), "STUB_LOG": str(calls), "PATH": os.environ.get("PATH", "")},
        timeout=60,
    )
    logged = [json.loads(line) for line in calls.read_text().splitlines()]
    assert logged == [
        ["info", "acme/tiny", "main"],
        ["download", "acme/tiny", "c0ffee9", str(tmp_path / "m")],  # the commit, not the branch
        ["info", "acme/lora", "f00d"],
        ["download", "acme/lora", "f00d", str(tmp_path / "a")],
    ]
    assert json.loads(term.read_text()) == {"model": "c0ffee9", "adapter-a": "f00d"}


def test_service_network_policy_pdb(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec=CASES["private-access"]))
    svc = builders.build_service(md)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == {"berth.dev/model-deployment": "chat"}
    np = builders.build_network_policy(md, settings)
    assert np is not None
    peers = np["spec"]["ingress"][0]["from"]
    assert peers[0]["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "apps",
        "berth-system",
        "team-a",
    ]
    assert peers[1] == {"ipBlock": {"cidr": "10.20.0.0/16"}}
    pdb = builders.build_pdb(md)
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1
    assert builders.build_pdb(ModelDeployment.model_validate(md_body())) is None
    assert builders.build_network_policy(ModelDeployment.model_validate(md_body()), settings) is None
    args = _container(builders.build_deployment(md, settings))["args"]
    assert "--api-key-dir" in args
    assert names.api_key_secret_name(md) == "team-keys"


def test_auth_none_mounts_no_keys(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"auth": {"mode": "none"}}))
    dep = builders.build_deployment(md, settings)
    assert "--api-key-dir" not in _container(dep)["args"]
    assert all(v["name"] != "api-keys" for v in dep["spec"]["template"]["spec"]["volumes"])


@pytest.mark.parametrize(("cpu", "threads"), [("2", 2), ("1500m", 2), ("500m", 1), ("0.5", 1), ("16", 16)])
def test_server_threads_follow_the_cpu_limit(settings: OperatorSettings, cpu: str, threads: int) -> None:
    md = ModelDeployment.model_validate(md_body(spec={"resources": {"cpu": cpu}}))
    env = {e["name"]: e.get("value") for e in _container(builders.build_deployment(md, settings))["env"]}
    assert env["OMP_NUM_THREADS"] == str(threads)


def test_builders_are_pure(settings: OperatorSettings) -> None:
    md = ModelDeployment.model_validate(md_body(spec=CASES["gpu-pvc"]))
    assert builders.build_deployment(md, settings) == builders.build_deployment(md, settings)
    secret = builders.build_api_key_secret(md, "sk-1")
    assert secret["data"] == {"default": "c2stMQ=="}

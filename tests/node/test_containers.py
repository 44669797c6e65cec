"""The images run as the pods would run them (Docker, no node needed).

- server-cpu: `docker run` of the exact container the operator's Deployment describes for
  examples/smollm2-cpu.yaml (berth.controller.builders.build_deployment: user, read-only root,
  tmpfs volumes, the API-key Secret as files, env, args, limits), waited on with its own startup and
  readiness probes, then asked with the openai SDK.
- operator: the image against the local control plane, with the chart's ServiceAccount token, RBAC,
  env and args (helm template), as in a pod: it turns a ModelDeployment into its children.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import harness

from .conftest import CHART, ROOT, docker_ok, unavailable, wait_for
from .podrun import container_port, docker_run_argv

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"docker {' '.join(args)}: {r.stderr}")
    return r


@pytest.fixture
def container_names() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for n in names:
        docker("rm", "-f", n, check=False)


def example_md(name: str = "smollm2-cpu.yaml", namespace: str = "berth-test") -> Any:
    from berth.api import ModelDeployment

    body = next(
        d
        for d in yaml.safe_load_all((ROOT / "examples" / name).read_text())
        if d["kind"] == "ModelDeployment"
    )
    body["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), generation=1)
    return ModelDeployment.model_validate(body)


def http_status(url: str, timeout: float = 3.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def test_server_cpu_image_runs_as_the_deployment_runs_it(
    docker_images: dict[str, str], tmp_path: Path, container_names: list[str]
) -> None:
    import openai

    from berth.controller import builders
    from berth.controller.settings import OperatorSettings

    settings = OperatorSettings()
    md = example_md()
    deployment = builders.build_deployment(md, settings)
    pod = deployment["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "server")
    assert server["image"] == docker_images["server-cpu"]
    key = "sk-" + secrets.token_hex(16)
    secret = builders.build_api_key_secret(md, key)
    name = f"berth-podrun-{uuid.uuid4().hex[:8]}"
    container_names.append(name)
    argv = docker_run_argv(pod, "server", {secret["metadata"]["name"]: secret}, tmp_path, name)
    docker(*argv[1:])
    ip = docker("inspect", "--format", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()
    assert ip, "the container has no address on Docker's bridge"

    def probe_ok(probe: dict[str, Any]) -> bool:
        get = probe["httpGet"]
        return http_status(f"http://{ip}:{container_port(server, get['port'])}{get['path']}") == 200

    def running() -> bool:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
        if not state["Running"]:
            pytest.fail(f"container exited ({state}):\n{docker('logs', name, check=False).stderr[-3000:]}")
        return True

    startup = server["startupProbe"]
    wait_for(
        lambda: running() and probe_ok(startup),
        startup["periodSeconds"] * startup["failureThreshold"],
        "the startup probe",
        interval=startup["periodSeconds"] / 5,
    )
    assert probe_ok(server["readinessProbe"]) and probe_ok(server["livenessProbe"])

    port = container_port(server, "http")
    client = openai.OpenAI(base_url=f"http://{ip}:{port}/v1", api_key=key, timeout=120, max_retries=0)
    resp = client.chat.completions.create(
        model=md.spec.model.served_name or md.name, messages=FRANCE, max_tokens=20, temperature=0
    )
    assert "Paris" in (resp.choices[0].message.content or ""), resp
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://{ip}:{port}/v1", api_key="sk-wrong", max_retries=0).models.list()

    # The process runs as the pod's user and cannot write its image.
    ids = docker("exec", name, "id", "-u").stdout.strip(), docker("exec", name, "id", "-G").stdout.split()
    assert ids[0] == str(pod["securityContext"]["runAsUser"])
    assert str(pod["securityContext"]["fsGroup"]) in ids[1]
    denied = docker("exec", name, "sh", "-c", "echo x > /probe", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied
    # Docker itself makes the mount points of the volumes (and their parents) in the container layer.
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    made = {str(Path(m).parents[i]) for m in mounts for i in range(len(Path(m).parents) - 1)} | mounts
    changed = [line.split(" ", 1)[1] for line in docker("diff", name).stdout.splitlines()]
    assert [c for c in changed if c not in made] == [], "the container changed its image's filesystem"


# ---------------------------------------------------------------------------------------------------
# the operator image against the local control plane


@pytest.fixture(scope="module")
def control_plane() -> Iterator[harness.LocalCluster]:
    if not docker_ok():
        unavailable("no Docker engine answers `docker info`")
    try:
        bin_dir = harness.ensure_binaries(build=False)
    except FileNotFoundError as e:
        unavailable(str(e))
    with harness.LocalCluster(bin_dir=bin_dir) as c:
        yield c


def test_operator_image_runs_with_the_charts_service_account(
    docker_images: dict[str, str],
    control_plane: harness.LocalCluster,
    tmp_path: Path,
    container_names: list[str],
) -> None:
    c = control_plane
    ns_op = "berth-system"
    health, metrics = harness.free_port(), harness.free_port()  # the container shares the machine's network
    rendered = subprocess.run(
        [
            str(c.bin_dir / "helm"),
            "template",
            "berth",
            str(CHART),
            "--namespace",
            ns_op,
            "--set",
            f"health.port={health}",
            "--set",
            f"metrics.port={metrics}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    )
    c.kubectl("create", "namespace", ns_op, check=True)
    c.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": [d for d in docs if d["kind"] != "Deployment"]}
        ),
        check=True,
    )
    pod = deployment["spec"]["template"]["spec"]
    sa = pod["serviceAccountName"]
    token = c.kubectl("create", "token", sa, "-n", ns_op, "--duration=1h", check=True).stdout.strip()
    assert c.pki is not None
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(token)
    (sa_dir / "ca.crt").write_bytes(c.pki.ca_cert.read_bytes())
    (sa_dir / "namespace").write_text(ns_op)
    for f in sa_dir.iterdir():
        f.chmod(0o644)
    # What kubelet adds to every pod: the downward-API values the chart asks for and the in-cluster
    # API address (here the apiserver on loopback, reached through the machine's network).
    container = next(x for x in pod["containers"] if x["name"] == "operator")
    fields = {
        "metadata.namespace": ns_op,
        "metadata.name": "berth-operator-container-test",
    }  # the downward API
    container["env"] = [
        {"name": e["name"], "value": fields[e["valueFrom"]["fieldRef"]["fieldPath"]]}
        if "valueFrom" in e
        else e
        for e in container["env"]
    ] + [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": str(c.ports["apiserver"])},
    ]
    assert container["image"] == docker_images["operator"]
    name = f"berth-operator-{uuid.uuid4().hex[:8]}"
    container_names.append(name)
    # the chart's Secrets the operator mounts (the gateway master key), as rendered
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    argv = docker_run_argv(pod, "operator", secrets, tmp_path, name)
    argv[argv.index("bridge")] = "host"
    argv[argv.index(container["image"]) : argv.index(container["image"])] = [
        "--mount",
        f"type=bind,source={sa_dir},destination=/var/run/secrets/kubernetes.io/serviceaccount,readonly",
    ]
    docker(*argv[1:])

    def alive_and_healthy() -> bool:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
        if not state["Running"]:
            pytest.fail(f"operator container exited:\n{docker('logs', name, check=False).stderr[-3000:]}")
        return http_status(f"http://127.0.0.1:{health}/healthz") == 200

    wait_for(alive_and_healthy, 60, "the operator's /healthz")

    since = time.time()
    ns = f"t-op-{uuid.uuid4().hex[:6]}"
    c.kubectl("create", "namespace", ns, check=True)
    c.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / "smollm2-cpu.yaml"), check=True)

    def phase() -> str | None:
        r = c.kubectl("get", "md", "smollm2", "-n", ns, "-o", "jsonpath={.status.phase}")
        return r.stdout.strip() if r.stdout.strip() == "Running" else None

    wait_for(phase, 90, "ModelDeployment smollm2 Running (kwok pods)")
    dep = json.loads(c.kubectl("get", "deployment", "smollm2", "-n", ns, "-o", "json", check=True).stdout)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == docker_images["server-cpu"]
    writers = c.audit_writes(since)
    assert writers[f"system:serviceaccount:{ns_op}:{sa}"] >= 3, writers  # Deployment, Service, Secret, status
    ids = docker("exec", name, "id", "-u").stdout.strip()
    assert ids == str(pod["securityContext"]["runAsUser"])

"""The Helm chart: `helm lint` clean, and `helm template` renders exactly the operator the code expects.

RBAC is checked against the calls the operator makes (kube.py kinds, kopf's watches), the env against
OperatorSettings (1:1), the CRD template against crds/. Without the helm binary (`make cluster-bin` /
tools/cluster/build.sh builds it) every test skips with that reason on a developer's machine, and fails
under CI=true and in `make test` (tests/prerequisites.py): never a silent pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from berth.api.crd import render as render_crd
from berth.cli import SUBCOMMANDS
from berth.controller import builders, kube
from berth.controller.settings import OperatorSettings
from tests.prerequisites import unavailable

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "berth"
NS = "berth-system"


def _helm() -> str | None:
    candidates = []
    if os.environ.get("BERTH_CLUSTER_BIN"):
        candidates.append(Path(os.environ["BERTH_CLUSTER_BIN"]) / "helm")
    try:
        out = subprocess.run(
            [str(ROOT / "tools" / "cluster" / "build.sh"), "--dir"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        candidates.append(Path(out) / "helm")
    except (OSError, subprocess.SubprocessError):
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("helm")


HELM = _helm()
NO_HELM = "helm is not built: run make cluster-bin (tools/cluster/build.sh)"


@pytest.fixture(autouse=True)
def _helm_present() -> None:
    if HELM is None:
        unavailable(NO_HELM)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if HELM is None:  # also reached from module fixtures, before the autouse check
        unavailable(NO_HELM)
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/berth-helm-cache",
        "HELM_CONFIG_HOME": "/tmp/berth-helm-config",
    }
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check, timeout=120, env=env)


def template(*sets: str) -> list[dict[str, Any]]:
    args = ["template", "berth", str(CHART), "--namespace", NS]
    for s in sets:
        args += ["--set", s]
    docs = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = one(docs, "Deployment", "berth-operator")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def env_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs)["env"]}


def allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
        for r in rules
    )


def triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return template()


@pytest.fixture(scope="module")
def ha() -> list[dict[str, Any]]:
    return template("replicaCount=2", "monitoring.serviceMonitor.enabled=true")


# ---------------------------------------------------------------- lint and the set of objects


@pytest.mark.parametrize(
    "sets",
    [[], ["replicaCount=2", "monitoring.serviceMonitor.enabled=true"], ["watchNamespaces={team-a,team-b}"]],
)
def test_helm_lint_is_clean(sets: list[str]) -> None:
    args = ["lint", str(CHART), "--strict"]
    for s in sets:
        args += ["--set", s]
    out = helm(*args, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout


def test_default_render_objects(default: list[dict[str, Any]]) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in default)
    assert kinds == [
        ("ClusterRole", "berth-gateway"),
        ("ClusterRole", "berth-operator"),
        ("ClusterRole", "berth-operator-cluster"),
        ("ClusterRoleBinding", "berth-gateway"),
        ("ClusterRoleBinding", "berth-operator"),
        ("ClusterRoleBinding", "berth-operator-cluster"),
        ("CustomResourceDefinition", "apikeys.berth.dev"),
        ("CustomResourceDefinition", "modeldeployments.berth.dev"),
        ("Deployment", "berth-gateway"),
        ("Deployment", "berth-operator"),
        ("PodDisruptionBudget", "berth-gateway"),
        ("Role", "berth-operator-leader"),
        ("RoleBinding", "berth-operator-leader"),
        ("Secret", "berth-gateway-master"),
        ("Service", "berth-gateway"),
        ("Service", "berth-operator-metrics"),
        ("ServiceAccount", "berth"),
        ("ServiceAccount", "berth-gateway"),
        ("ValidatingAdmissionPolicy", "berth-tenancy"),
        ("ValidatingAdmissionPolicyBinding", "berth-tenancy"),
    ]
    cluster_scoped = (
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
    )
    for d in default:
        if not d["kind"].startswith(cluster_scoped):
            assert d["metadata"]["namespace"] == NS


def test_crd_template_equals_generated_crd(default: list[dict[str, Any]]) -> None:
    rendered = one(default, "CustomResourceDefinition", "modeldeployments.berth.dev")
    committed = yaml.safe_load((ROOT / "crds" / "modeldeployments.berth.dev.yaml").read_text())
    assert rendered == committed
    assert rendered == yaml.safe_load(render_crd())
    spec = importlib.util.spec_from_file_location("render_chart_crd", ROOT / "tools" / "render_chart_crd.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.TEMPLATE.read_text() == tool.render(), "chart CRD template is stale: run make crds"


def test_admission_policy_follows_the_policy_values() -> None:
    assert not [
        d for d in template("policy.admissionPolicy=false") if d["kind"].startswith("ValidatingAdmission")
    ]
    docs = template(
        "policy.hostPathPrefixes={/models/}", "watchNamespaces={team-a}", "policy.allowRemoteCode=true"
    )
    policy = one(docs, "ValidatingAdmissionPolicy")
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert variables["hostPrefixes"] == '["/models"]'
    assert (
        variables["images"]
        == '["ghcr.io/berth-dev/berth-server:0.1.0","ghcr.io/berth-dev/berth-server-cpu:0.1.0"]'
    )
    assert not any("trustRemoteCode" in v["expression"] for v in policy["spec"]["validations"])
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    selector = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]
    assert selector["values"] == ["team-a"]


def test_crd_switches() -> None:
    assert not [d for d in template("crds.install=false") if d["kind"] == "CustomResourceDefinition"]
    kept = [d for d in template("crds.keep=true") if d["kind"] == "CustomResourceDefinition"]
    assert sorted(d["metadata"]["name"] for d in kept) == ["apikeys.berth.dev", "modeldeployments.berth.dev"]
    for crd in kept:
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


# ---------------------------------------------------------------- the operator Deployment


def test_env_maps_operator_settings_one_to_one(default: list[dict[str, Any]]) -> None:
    env = env_of(default)
    berth_env = {k: v for k, v in env.items() if k.startswith("BERTH_")}
    expected = {"BERTH_" + name.upper() for name in OperatorSettings.model_fields}
    assert set(berth_env) == expected
    assert berth_env["BERTH_OPERATOR_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert berth_env["BERTH_PEERING"] == ""  # one replica: standalone
    # The chart's defaults are the operator's defaults, so the chart and `berth operator` agree.
    plain = {k: v for k, v in berth_env.items() if isinstance(v, str)}
    from_chart = OperatorSettings(**{k.removeprefix("BERTH_").lower(): v for k, v in plain.items()})
    defaults = OperatorSettings()
    for name in OperatorSettings.model_fields:
        if name == "operator_namespace":
            continue
        assert getattr(from_chart, name) == getattr(defaults, name), name


def test_values_reach_env() -> None:
    docs = template(
        "server.image.repository=registry.example/srv",
        "server.image.tag=v9",
        "server.defaultMemory=16Gi",
        "watchNamespaces={team-a,team-b}",
        "reconcile.resyncSeconds=12.5",
        "server.startupSeconds=3600",
        "logLevel=DEBUG",
    )
    env = env_of(docs)
    assert env["BERTH_SERVER_IMAGE"] == "registry.example/srv:v9"
    assert env["BERTH_SERVER_CPU_IMAGE"] == "ghcr.io/berth-dev/berth-server-cpu:0.1.0"
    assert env["BERTH_DEFAULT_MEMORY"] == "16Gi"
    assert env["BERTH_NAMESPACES"] == "team-a,team-b"
    assert env["BERTH_RESYNC_SECONDS"] == "12.5"
    assert env["BERTH_STARTUP_SECONDS"] == "3600"
    assert env["BERTH_LOG_LEVEL"] == "DEBUG"
    s = OperatorSettings(namespaces=env["BERTH_NAMESPACES"], resync_seconds=env["BERTH_RESYNC_SECONDS"])
    assert s.namespaces == ["team-a", "team-b"] and s.resync_seconds == 12.5


def test_operator_container_is_locked_down(default: list[dict[str, Any]]) -> None:
    dep = one(default, "Deployment", "berth-operator")
    pod = dep["spec"]["template"]["spec"]
    c = container(default)
    assert c["image"] == "ghcr.io/berth-dev/berth-operator:0.1.0"
    assert c["args"] == ["operator"] and "operator" in SUBCOMMANDS
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pod["serviceAccountName"] == "berth"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    settings = OperatorSettings()
    assert ports == {"metrics": settings.metrics_port, "health": settings.health_port}
    probe = c["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    svc = one(default, "Service", "berth-operator-metrics")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


def test_health_and_metrics_can_be_turned_off() -> None:
    docs = template("health.port=0", "metrics.port=0")
    c = container(docs)
    assert "livenessProbe" not in c and not c.get("ports")
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Service"] == [
        "berth-gateway"
    ]  # the operator's is gone
    env = env_of(docs)
    assert env["BERTH_HEALTH_PORT"] == "0" and env["BERTH_METRICS_PORT"] == "0"


# ---------------------------------------------------------------- RBAC

# Exactly the calls of kube.py/reconcile.py/events.py/autoscaler.py/cache.py (the watches), plus kopf's.
EXPECTED_OPERATOR_RULES = {
    ("berth.dev", "modeldeployments", "get"),
    ("berth.dev", "modeldeployments", "list"),
    ("berth.dev", "modeldeployments", "watch"),
    ("berth.dev", "modeldeployments", "patch"),
    ("berth.dev", "modeldeployments/status", "patch"),
    ("berth.dev", "modeldeployments/scale", "patch"),
    ("berth.dev", "modeldeployments/finalizers", "update"),  # blockOwnerDeletion on the children
    ("berth.dev", "apikeys", "get"),
    ("berth.dev", "apikeys", "list"),
    ("berth.dev", "apikeys", "watch"),
    ("berth.dev", "apikeys", "patch"),
    ("berth.dev", "apikeys/status", "patch"),
    ("apps", "deployments", "get"),
    ("apps", "deployments", "list"),
    ("apps", "deployments", "watch"),
    ("apps", "deployments", "create"),
    ("apps", "deployments", "patch"),
    ("", "services", "get"),
    ("", "services", "list"),
    ("", "services", "watch"),
    ("", "services", "create"),
    ("", "services", "patch"),
    ("", "secrets", "create"),  # no get, list or watch: the operator reads no Secret
    ("", "secrets", "patch"),  # the gateway-key credential after a master key rotation (owner-tested)
    ("networking.k8s.io", "networkpolicies", "get"),
    ("networking.k8s.io", "networkpolicies", "list"),
    ("networking.k8s.io", "networkpolicies", "watch"),
    ("networking.k8s.io", "networkpolicies", "create"),
    ("networking.k8s.io", "networkpolicies", "patch"),
    ("networking.k8s.io", "networkpolicies", "delete"),
    ("policy", "poddisruptionbudgets", "get"),
    ("policy", "poddisruptionbudgets", "list"),
    ("policy", "poddisruptionbudgets", "watch"),
    ("policy", "poddisruptionbudgets", "create"),
    ("policy", "poddisruptionbudgets", "patch"),
    ("policy", "poddisruptionbudgets", "delete"),
    ("inference.networking.k8s.io", "inferencepools", "get"),
    ("inference.networking.k8s.io", "inferencepools", "list"),
    ("inference.networking.k8s.io", "inferencepools", "watch"),
    ("inference.networking.k8s.io", "inferencepools", "create"),
    ("inference.networking.k8s.io", "inferencepools", "patch"),
    ("inference.networking.k8s.io", "inferencepools", "delete"),
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "events", "create"),
    ("", "events", "list"),  # why a pod stays ContainerCreating (Multi-Attach), only then
    ("autoscaling", "horizontalpodautoscalers", "list"),  # the autoscaler stands aside for an HPA
    ("autoscaling", "horizontalpodautoscalers", "watch"),  # (read from the watch cache, not listed per tick)
}


def test_rbac_rules_are_exactly_what_the_operator_uses(default: list[dict[str, Any]]) -> None:
    role = one(default, "ClusterRole", "berth-operator")
    assert triples(role["rules"]) == EXPECTED_OPERATOR_RULES
    cluster = one(default, "ClusterRole", "berth-operator-cluster")
    assert triples(cluster["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    for name in ("berth-operator", "berth-operator-cluster"):
        binding = one(default, "ClusterRoleBinding", name)
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "berth", "namespace": NS}]
    # Nothing broad: no wildcards, no secrets listing, no update (but of the owner's finalizers, for
    # blockOwnerDeletion) or deletecollection anywhere.
    every = triples(role["rules"]) | triples(cluster["rules"])
    assert not any("*" in t for t in every)
    assert not any(
        v in ("update", "deletecollection", "escalate", "bind", "impersonate")
        for _, r, v in every
        if (r, v) != ("modeldeployments/finalizers", "update")
    )
    assert ("", "secrets", "list") not in every and ("", "secrets", "watch") not in every


def test_rbac_covers_every_kind_the_client_knows(default: list[dict[str, Any]]) -> None:
    """A kind added to kube.py without a chart rule fails here (and would fail in the cluster)."""
    rules = one(default, "ClusterRole", "berth-operator")["rules"]
    for k in kube.KINDS_BY_NAME.values():
        group = "" if k.prefix == "api/v1" else k.prefix.split("/")[1]
        assert allowed(rules, group, k.plural, "create" if k in (kube.EVENT, kube.SECRET) else "get"), k
    assert not any(allowed(rules, "", "secrets", v) for v in ("get", "list", "watch"))  # never read


def test_rbac_covers_kopf_watches(default: list[dict[str, Any]]) -> None:
    """Every resource a kopf handler is registered for can be listed and watched."""
    import kopf

    import berth.controller.apikey_handlers
    import berth.controller.handlers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    handlers = (
        registry._watching.get_all_handlers()
        + registry._changing.get_all_handlers()
        + registry._spawning.get_all_handlers()
    )
    selectors = {
        (h.selector.group or "", h.selector.plural or h.selector.any_name) for h in handlers if h.selector
    }
    assert ("berth.dev", "apikeys") in selectors
    # and every kind the operator's own watch caches list and watch (cache.operator_specs)
    from berth.controller.cache import operator_specs

    read_only = set()  # watched, never fetched one by one: the HPAs the autoscaler stands aside for
    for spec in operator_specs():
        prefix = spec.kind.prefix
        selector = ("" if prefix == "api/v1" else prefix.split("/")[1], spec.kind.plural)
        (read_only if spec.optional else selectors).add(selector)
    assert ("berth.dev", "modeldeployments") in selectors and ("", "pods") in selectors
    assert read_only == {("autoscaling", "horizontalpodautoscalers")}
    rules = one(default, "ClusterRole", "berth-operator")["rules"]
    for group, plural in selectors | read_only:
        for verb in ("list", "watch") if (group, plural) in read_only else ("list", "watch", "get"):
            assert allowed(rules, group, plural, verb), (group, plural, verb)


def test_namespaced_mode_binds_only_the_watched_namespaces() -> None:
    docs = template("watchNamespaces={team-a,team-b}")
    assert not [
        d for d in docs if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"] == "berth-operator"
    ]
    assert not [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "berth-operator"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "berth-operator"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(
        b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "berth-operator"}
        for b in bindings
    )
    # Roles only: the operator's rules live in a Role of each watched namespace, the same as cluster-wide
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "berth-operator"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    leader = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "berth-operator-leader"]
    assert [r["metadata"]["namespace"] for r in leader] == [
        NS
    ]  # the leader Lease lives in the release namespace
    assert all(triples(r["rules"]) == EXPECTED_OPERATOR_RULES for r in roles)
    cluster = one(docs, "ClusterRole", "berth-operator-cluster")
    assert ("", "namespaces", "list") in triples(cluster["rules"])
    assert ("", "namespaces", "watch") in triples(cluster["rules"])


# ---------------------------------------------------------------- peering and monitoring


def test_two_replicas_use_kopf_peering(ha: list[dict[str, Any]]) -> None:
    env = env_of(ha)
    assert env["BERTH_PEERING"] == "berth"
    dep = one(ha, "Deployment", "berth-operator")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    crds = {d["metadata"]["name"]: d for d in ha if d["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {
        "apikeys.berth.dev",
        "modeldeployments.berth.dev",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    peering = one(ha, "ClusterKopfPeering", "berth")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    cluster = one(ha, "ClusterRole", "berth-operator-cluster")
    for verb in ("get", "list", "watch", "patch"):
        assert ("kopf.dev", "clusterkopfpeerings", verb) in triples(cluster["rules"])
    # Namespaced peering: one KopfPeering per watched namespace, and the namespaced rule.
    docs = template("replicaCount=3", "watchNamespaces={team-a}")
    assert one(docs, "KopfPeering", "berth")["metadata"]["namespace"] == "team-a"
    assert ("kopf.dev", "kopfpeerings", "patch") in triples(one(docs, "Role", "berth-operator")["rules"])


def test_service_monitors_select_what_the_operator_creates(ha: list[dict[str, Any]]) -> None:
    servers = one(ha, "ServiceMonitor", "berth-servers")
    from berth.api.models import ModelDeployment

    md = ModelDeployment.model_validate({"metadata": {"name": "chat", "namespace": "team-a", "uid": "u1"}})
    svc = builders.build_service(md)
    wanted = servers["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= svc["metadata"]["labels"].items()
    assert servers["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert servers["spec"]["namespaceSelector"] == {"any": True}
    operator_sm = one(ha, "ServiceMonitor", "berth-operator")
    svc_op = one(ha, "Service", "berth-operator-metrics")
    assert operator_sm["spec"]["selector"]["matchLabels"].items() <= svc_op["metadata"]["labels"].items()


def _server_metric_names() -> set[str]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from berth.server.engine.types import EngineStats
    from berth.server.metrics import ServerMetrics

    sm = ServerMetrics()

    class _Stats:
        def stats(self) -> EngineStats:
            return EngineStats(
                running=1, waiting=2, kv_cache_usage=0.5, steps=3, num_prefill_tokens=4, num_decode_tokens=5
            )

    sm.bind_engine(_Stats())
    sm.prompt_tokens.labels("k", "m").inc()
    sm.generation_tokens.labels("k", "m").inc()
    sm.requests.labels("/v1/completions", "200").inc()
    sm.e2e_latency.labels("/v1/completions").observe(1.0)
    for labelled in (sm.image_requests, sm.images, sm.image_tokens, sm.image_cached_prompt_tokens):
        labelled.labels("m").inc()
    from berth.gateway.metrics import GatewayMetrics

    gm = GatewayMetrics()
    gm.requests.labels("ns", "m", "k", "200").inc()
    gm.tokens.labels("ns", "m", "k", "prompt").inc()
    gm.rate_limited.labels("ns", "k", "rpm").inc()
    gm.retries.labels("ns", "m", "connect").inc()
    gm.waiting.labels("ns", "md", "m").set(1)
    gm.ttfb.labels("ns", "m").observe(0.01)
    names = set()
    for text in (sm.render().decode(), generate_latest(gm.registry).decode()):
        for family in text_string_to_metric_families(text):
            names |= {s.name for s in family.samples}
    return names


def test_grafana_dashboard_uses_real_metric_names(ha: list[dict[str, Any]]) -> None:
    import re

    from berth.controller import metrics as op_metrics

    cm = one(ha, "ConfigMap", "berth-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["berth.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(berth_[a-z_]+)\b", e)}
    known = _server_metric_names()
    known |= {
        m._name
        for m in vars(op_metrics).values()
        if hasattr(m, "_name") and str(m._name).startswith("berth_")
    }
    assert used, "the dashboard queries nothing"
    assert used <= known, f"unknown metrics in the dashboard: {sorted(used - known)}"
    for needed in (
        "berth_time_to_first_token_seconds_bucket",
        "berth_generation_tokens_total",
        "berth_waiting_requests",
        "berth_kv_cache_usage_ratio",
        "berth_image_requests_total",
        "berth_image_preprocess_seconds_bucket",
        "berth_gateway_requests_total",
        "berth_gateway_tokens_total",
        "berth_gateway_waiting_requests",
    ):
        assert needed in used
    assert any("key_id" in e for e in exprs), "per-key usage panel missing"


def test_values_schema_rejects_bad_values() -> None:
    for bad in (
        "replicaCount=0",
        "server.port=99999",
        "logLevel=LOUD",
        "watchNamespaces={Bad_NS}",
        "nosuchkey=1",
    ):
        out = helm("template", "berth", str(CHART), "--set", bad, check=False)
        assert out.returncode != 0, bad
        assert "values don't meet the specifications of the schema" in out.stderr, out.stderr


def test_notes_tell_the_next_command(tmp_path: Path) -> None:
    """NOTES.txt renders (helm template skips it, so a copy of the chart renders it as a YAML block)."""
    chart = tmp_path / "berth"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    wrapped = "notes: |\n" + "".join("  " + line for line in notes.splitlines(keepends=True))
    (chart / "templates" / "notes-check.yaml").write_text(wrapped)
    out = helm(
        "template", "berth", str(chart), "--namespace", NS, "--show-only", "templates/notes-check.yaml"
    )
    text = yaml.safe_load(out.stdout)["notes"]
    example = yaml.safe_load((ROOT / "examples" / "smollm2-cpu.yaml").read_text())
    assert "kubectl apply -f examples/smollm2-cpu.yaml" in text
    assert "kubectl get md" in text
    assert f"kubectl scale md/{example['metadata']['name']} " in text
    assert "kubectl -n berth-system rollout status deployment/berth-operator" in text
    assert "whole cluster" in text and "peering" not in text


def test_leader_lease_rules_are_namespaced_and_named(default: list[dict[str, Any]]) -> None:
    role = one(default, "Role", "berth-operator-leader")
    assert role["metadata"]["namespace"] == NS
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["berth-operator"],
            "verbs": ["get", "patch"],
        },
    ]
    for d in default:  # no cluster-wide lease access
        if d["kind"] == "ClusterRole":
            assert not [r for r in d["rules"] if "leases" in r.get("resources", [])]


def test_gateway_is_installed_with_two_replicas_a_pdb_and_least_privilege(
    default: list[dict[str, Any]],
) -> None:
    dep = one(default, "Deployment", "berth-gateway")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "berth-gateway"
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"] == ["gateway"]
    sel = dep["spec"]["selector"]["matchLabels"]
    operator_sel = one(default, "Deployment", "berth-operator")["spec"]["selector"]["matchLabels"]
    assert sel != operator_sel and sel["app.kubernetes.io/component"] == "gateway"
    svc = one(default, "Service", "berth-gateway")
    assert svc["spec"]["selector"] == sel and svc["spec"]["ports"][0]["port"] == 80
    assert one(default, "PodDisruptionBudget", "berth-gateway")["spec"]["minAvailable"] == 1
    rules = triples(one(default, "ClusterRole", "berth-gateway")["rules"])
    assert rules == {
        ("berth.dev", "modeldeployments", "get"),
        ("berth.dev", "modeldeployments", "list"),
        ("berth.dev", "modeldeployments", "watch"),
        ("berth.dev", "apikeys", "get"),
        ("berth.dev", "apikeys", "list"),
        ("berth.dev", "apikeys", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("berth.dev", "modeldeployments/scale", "patch"),
        ("berth.dev", "apikeys/status", "get"),
        ("berth.dev", "apikeys/status", "patch"),
    }
    assert not any(r == "secrets" for _, r, _ in rules)
    single = template("gateway.replicas=1")
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"]
    assert not [d for d in template("gateway.enabled=false") if "gateway" in d["metadata"]["name"]]


# ---------------------------------------------------------------- docs/operations.md's RBAC table

ROLES = {
    "operator": "berth-operator",
    "operator-cluster": "berth-operator-cluster",
    "operator-leader": "berth-operator-leader",
    "gateway": "berth-gateway",
}


def documented_rules() -> list[tuple[str, str, set[tuple[str, str, str]]]]:
    """(role, when, triples) for each row of the permissions table in docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("| role | API group | resource | verbs | when | what for |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.strip().splitlines()[1:]:
        role, group, resources, verbs, when, why = (c.strip() for c in line.strip().strip("|").split("|"))
        assert why, line
        g = "" if group == "(core)" else group.strip("`")
        res = [r.strip().strip("`") for r in resources.split(",")]
        vs = [v.strip() for v in verbs.split("(")[0].split(",")]
        rows.append((role, when, {(g, r, v) for r in res for v in vs}))
    return rows


def _documented(role: str, whens: set[str]) -> set[tuple[str, str, str]]:
    return {t for r, w, ts in documented_rules() if r == role and w in whens for t in ts}


@pytest.mark.parametrize(
    ("sets", "whens", "operator_kind"),
    [
        ((), {"always", "`gateway.enabled`"}, "ClusterRole"),
        (
            ("replicaCount=2",),
            {"always", "`gateway.enabled`", "`replicaCount > 1`, cluster-wide"},
            "ClusterRole",
        ),
        (
            ("replicaCount=2", "watchNamespaces={team-a}"),
            {
                "always",
                "`gateway.enabled`",
                "`watchNamespaces`",
                "`replicaCount > 1` with `watchNamespaces`",
                "`gateway.enabled` with `watchNamespaces`",
            },
            "Role",
        ),
        (("gateway.enabled=false",), {"always"}, "ClusterRole"),
    ],
)
def test_operations_md_states_every_rbac_rule_exactly(
    sets: tuple[str, ...], whens: set[str], operator_kind: str
) -> None:
    docs = template(*sets)
    rendered: dict[str, set[tuple[str, str, str]]] = {}
    for d in docs:
        if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"] in ROLES.values():
            rendered.setdefault(d["metadata"]["name"], set()).update(triples(d["rules"]))
    assert one(docs, operator_kind, "berth-operator")
    for role, name in ROLES.items():
        assert rendered.get(name, set()) == _documented(role, whens), role

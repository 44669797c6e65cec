"""What the platform allows beyond the schema: a violation fails the ModelDeployment, nothing is created."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from berth.controller.context import OperatorContext
from berth.controller.policy import PolicyViolation, host_path_allowed
from berth.controller.reconcile import reconcile
from berth.controller.settings import OperatorSettings

from .conftest import RecordingKube, md_body, reconcile_key

NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)
REMOTE = {"model": {"uri": "pvc://models/chatglm3", "trustRemoteCode": True}}


def test_remote_code_is_refused_unless_the_operator_allows_it(settings: OperatorSettings) -> None:
    client = RecordingKube()
    with pytest.raises(PolicyViolation) as exc:
        reconcile(md_body(spec=REMOTE), client, settings, NOW)
    assert exc.value.field == "spec.model.trustRemoteCode"
    assert "BERTH_ALLOW_REMOTE_CODE" in exc.value.message
    assert client.writes() == []  # no child is created or changed


def test_allowed_remote_code_reaches_the_server(settings: OperatorSettings) -> None:
    allowed = settings.model_copy(update={"allow_remote_code": True})
    client = RecordingKube()
    reconcile(md_body(spec=REMOTE), client, allowed, NOW)
    deployment = client.objects[("Deployment", "team-a", "chat")]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--trust-remote-code" in args
    assert args[args.index("--backend") + 1] == "auto"


def test_the_handler_records_failed_policy_violation(settings: OperatorSettings) -> None:
    client = RecordingKube()
    body = md_body(spec=REMOTE)
    client.objects[("ModelDeployment", "team-a", "chat")] = copy.deepcopy(body)
    ctx = OperatorContext.create(settings, client=client)
    assert reconcile_key(ctx, client) is None  # no retry: only an edit can fix it
    status = client.objects[("ModelDeployment", "team-a", "chat")]["status"]
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "PolicyViolation"
    assert "spec.model.trustRemoteCode" in ready["message"]
    kinds = {k for k, _, _ in client.objects}
    assert kinds <= {"ModelDeployment", "Event"}


# (spec, the field the violation names, a word of the message)
VIOLATIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"model": {"uri": "hostpath:////"}}, "spec.model.uri", "hostpath://"),
    (
        {"model": {"uri": "pvc://models/base", "adapters": [{"name": "a", "uri": "hostpath:///etc"}]}},
        "spec.model.adapters[0].uri",
        "hostpath://",
    ),
    ({"image": "docker.io/evil/miner:latest"}, "spec.image", "BERTH_ALLOWED_IMAGE_PREFIXES"),
    (
        {"podTemplate": {"tolerations": [{"operator": "Exists"}]}},
        "spec.podTemplate.tolerations[0].key",
        "no key",
    ),
    (
        {
            "podTemplate": {
                "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]
            }
        },
        "spec.podTemplate.tolerations[0].key",
        "control-plane",
    ),
    (
        {"podTemplate": {"nodeSelector": {"kubernetes.io/hostname": "admin-node"}}},
        "spec.podTemplate.nodeSelector[kubernetes.io/hostname]",
        "BERTH_ALLOWED_NODE_SELECTOR_KEYS",
    ),
    (
        {
            "podTemplate": {
                "annotations": {"container.apparmor.security.beta.kubernetes.io/server": "unconfined"}
            }
        },
        "spec.podTemplate.annotations[container.apparmor.security.beta.kubernetes.io/server]",
        "BERTH_ALLOWED_ANNOTATION_KEYS",
    ),
    (
        {
            "podTemplate": {
                "env": [{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "billing-db", "key": "pw"}}}]
            }
        },
        "spec.podTemplate.env[0].valueFrom",
        "envSecrets",
    ),
    (
        {
            "podTemplate": {
                "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}]
            }
        },
        "spec.podTemplate.env[0].valueFrom",
        "secretKeyRef",
    ),
    (
        {
            "podTemplate": {
                "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]
            }
        },
        "spec.podTemplate.env[0].valueFrom",
        "secretKeyRef",
    ),
]


@pytest.mark.parametrize(("spec", "field", "word"), VIOLATIONS, ids=[v[1] for v in VIOLATIONS])
def test_each_violation_names_its_field_and_creates_nothing(
    settings: OperatorSettings, spec: dict[str, Any], field: str, word: str
) -> None:
    client = RecordingKube()
    with pytest.raises(PolicyViolation) as exc:
        reconcile(md_body(spec=spec), client, settings, NOW)
    assert exc.value.field == field
    assert word in exc.value.message
    assert client.writes() == []


def test_what_the_platform_allows_passes(settings: OperatorSettings) -> None:
    allowed = settings.model_copy(
        update={
            "allowed_model_schemes": ["builtin", "pvc", "hf", "hostpath"],
            "allowed_host_path_prefixes": ["/models/"],
        }
    )
    spec = {
        "model": {"uri": "hostpath:///models/smollm2"},
        "image": "registry.example/berth-server:test",
        "podTemplate": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "annotations": {"prometheus.io/scrape": "true"},
            "env": [
                {"name": "PLAIN", "value": "1"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "team-token", "key": "t"}}},
            ],
            "envSecrets": ["team-token"],
        },
    }
    client = RecordingKube()
    reconcile(md_body(spec=spec), client, allowed, NOW)
    assert ("Deployment", "team-a", "chat") in client.objects


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/models/smollm2", True),
        ("/models", True),
        ("/models/../etc", False),
        ("/modelsx/a", False),
        ("//models/a", False),
        ("/models/a/", False),
        ("/", False),
    ],
)
def test_host_paths_are_normalised_before_the_prefix_check(path: str, ok: bool) -> None:
    assert host_path_allowed(path, ["/models/"]) is ok


def test_hostpath_needs_the_scheme_and_a_prefix(settings: OperatorSettings) -> None:
    only_scheme = settings.model_copy(update={"allowed_model_schemes": ["hostpath"]})
    with pytest.raises(PolicyViolation, match="BERTH_ALLOWED_HOST_PATH_PREFIXES: none"):
        reconcile(md_body(spec={"model": {"uri": "hostpath:///models/a"}}), RecordingKube(), only_scheme, NOW)


def test_settings_read_comma_separated_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTH_ALLOWED_MODEL_SCHEMES", "builtin, hostpath")
    monkeypatch.setenv("BERTH_ALLOWED_IMAGE_PREFIXES", "registry.corp/berth/")
    s = OperatorSettings()
    assert s.allowed_model_schemes == ["builtin", "hostpath"]
    assert s.image_prefixes() == ["registry.corp/berth/"]
    assert OperatorSettings().allowed_host_path_prefixes == []

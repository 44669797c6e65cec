"""Reconcile against a recording client: creates once, patches minimally, and writes nothing when nothing changed."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pydantic
import pytest

from berth.controller import kube
from berth.controller.context import MEMO_KEY, OperatorContext, from_memo
from berth.controller.plan import diff
from berth.controller.reconcile import reconcile
from berth.controller.settings import OperatorSettings

from .conftest import RecordingKube, feed, md_body, reconcile_key

NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)


def _store_md(client: RecordingKube, body: dict[str, Any]) -> None:
    client.objects[("ModelDeployment", body["metadata"]["namespace"], body["metadata"]["name"])] = (
        copy.deepcopy(body)
    )


def _current(client: RecordingKube, name: str = "chat", ns: str = "team-a") -> dict[str, Any]:
    return copy.deepcopy(client.objects[("ModelDeployment", ns, name)])


def _edit_spec(client: RecordingKube, **spec: Any) -> dict[str, Any]:
    body = _current(client)
    body["spec"].update(spec)
    body["metadata"]["generation"] += 1
    _store_md(client, body)
    return body


def test_first_reconcile_creates_children_and_status(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = md_body(spec={"capacity": 2})
    _store_md(recording, body)
    result = reconcile(body, recording, settings, NOW, api_key=lambda: "sk-test")
    created = [(c[1], c[2]) for c in recording.writes() if c[0] == "create" and c[1] != "Event"]
    assert created == [
        ("Secret", "chat-api-keys"),
        ("Deployment", "chat"),
        ("Service", "chat"),
        ("PodDisruptionBudget", "chat"),
    ]
    assert result.status_written and result.status["phase"] == "Pending"
    assert [e.reason for e in result.events] == ["Deployed"]


def test_scale_2_to_5_patches_only_deployment_replicas_then_nothing(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = md_body(spec={"capacity": 2})
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    recording.clear()

    body = _edit_spec(recording, capacity=5)
    reconcile(body, recording, settings, NOW + timedelta(seconds=1))
    child_writes = [c for c in recording.writes() if c[1] not in ("Event", "ModelDeployment")]
    assert child_writes == [("patch", "Deployment", "chat", {"spec": {"replicas": 5}})]

    recording.clear()
    reconcile(_current(recording), recording, settings, NOW + timedelta(seconds=2))
    assert recording.writes() == []


def test_unchanged_reconcile_makes_no_write(recording: RecordingKube, settings: OperatorSettings) -> None:
    body = md_body(spec={"capacity": 1, "access": {"allowedNamespaces": ["apps"]}})
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    recording.clear()
    for i in range(3):
        reconcile(_current(recording), recording, settings, NOW + timedelta(seconds=10 * (i + 1)))
    assert recording.writes() == []
    assert {c[0] for c in recording.calls} == {"get", "list"}


def test_generated_key_is_never_rotated(recording: RecordingKube, settings: OperatorSettings) -> None:
    body = md_body()
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW, api_key=lambda: "sk-first")
    secret = recording.objects[("Secret", "team-a", "chat-api-keys")]
    reconcile(_edit_spec(recording, capacity=2), recording, settings, NOW, api_key=lambda: "sk-second")
    assert recording.objects[("Secret", "team-a", "chat-api-keys")]["data"] == secret["data"]


def test_removing_access_deletes_the_network_policy(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = md_body(spec={"access": {"allowedCIDRs": ["10.0.0.0/8"]}, "capacity": 2})
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    assert ("NetworkPolicy", "team-a", "chat") in recording.objects
    recording.clear()
    body = _current(recording)
    del body["spec"]["access"]
    body["spec"]["capacity"] = 1
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    deletes = sorted((c[1], c[2]) for c in recording.writes() if c[0] == "delete")
    assert deletes == [("NetworkPolicy", "chat"), ("PodDisruptionBudget", "chat")]


def test_invalid_edit_raises_and_deletes_nothing(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = md_body(spec={"capacity": 2})
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    recording.clear()
    bad = _edit_spec(recording, autoscaling={"enabled": True, "minCapacity": 3, "maxCapacity": 1})
    with pytest.raises(pydantic.ValidationError):
        reconcile(bad, recording, settings, NOW)
    assert recording.writes() == []
    assert ("Deployment", "team-a", "chat") in recording.objects


def test_missing_user_secret_is_reported(recording: RecordingKube, settings: OperatorSettings) -> None:
    body = md_body(spec={"auth": {"apiKeySecretRef": "team-keys"}})
    _store_md(recording, body)
    result = reconcile(body, recording, settings, NOW)
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "APIKeySecretNotFound"
    assert "spec.auth.apiKeySecretRef: Secret 'team-keys' not found" in ready["message"]
    assert not any(c[1] == "Secret" and c[0] == "create" for c in recording.writes())


def test_existing_child_409_is_success(recording: RecordingKube, settings: OperatorSettings) -> None:
    body = md_body()
    _store_md(recording, body)

    class Racing(RecordingKube):
        def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
            return None if kind.kind == "Service" else super().get(kind, namespace, name)

    racing = Racing()
    racing.objects = recording.objects
    reconcile(body, racing, settings, NOW)
    reconcile(_current(racing), racing, settings, NOW)  # Service create answered 409: no error
    assert ("Service", "team-a", "chat") in racing.objects


def test_diff_tolerates_server_defaults_and_quantities() -> None:
    desired = {
        "spec": {
            "replicas": 2,
            "template": {
                "spec": {
                    "containers": [
                        {"name": "s", "resources": {"limits": {"cpu": "0.5", "nvidia.com/gpu": 1}}, "env": []}
                    ]
                }
            },
        }
    }
    observed = {
        "spec": {
            "replicas": 2,
            "progressDeadlineSeconds": 600,
            "template": {
                "spec": {
                    "dnsPolicy": "ClusterFirst",
                    "containers": [
                        {
                            "name": "s",
                            "imagePullPolicy": "IfNotPresent",
                            "resources": {"limits": {"cpu": "500m", "nvidia.com/gpu": "1"}},
                        }
                    ],
                }
            },
        }
    }
    assert diff(desired, observed) is diff({}, {})  # the same sentinel: nothing to patch
    observed["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "1"
    patch = diff(desired, observed)
    assert list(patch) == ["spec"] and list(patch["spec"]) == ["template"]


def test_dropping_an_optional_field_removes_it(recording: RecordingKube, settings: OperatorSettings) -> None:
    body = md_body(
        spec={
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "podTemplate": {"nodeSelector": {"topology.kubernetes.io/zone": "a"}},
        }
    )
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    created = recording.objects[("Deployment", "team-a", "chat")]["spec"]["template"]["spec"]
    assert "initContainers" in created and "nodeSelector" in created
    assert "tolerations" not in created  # None values are not sent on create
    recording.clear()
    body = _current(recording)
    body["spec"]["model"] = {"uri": "pvc://models/qwen"}
    body["spec"]["podTemplate"] = {}
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    (patch,) = [c[3] for c in recording.writes() if c[:2] == ("patch", "Deployment")]
    pod = patch["spec"]["template"]["spec"]
    assert pod["initContainers"] is None and pod["nodeSelector"] is None  # merge patch: null removes
    after = recording.objects[("Deployment", "team-a", "chat")]["spec"]["template"]["spec"]
    assert "initContainers" not in after and "nodeSelector" not in after


def test_diff_treats_dropped_false_and_empty_as_same_and_quantities_only_in_resources() -> None:
    desired = {
        "volumeMounts": [{"name": "m", "mountPath": "/m", "readOnly": False}],
        "env": [{"name": "A", "value": ""}],
    }
    observed = {"volumeMounts": [{"name": "m", "mountPath": "/m"}], "env": [{"name": "A"}]}
    assert diff(desired, observed) is diff({}, {})
    assert diff({"env": [{"name": "N", "value": "1k"}]}, {"env": [{"name": "N", "value": "1000"}]}) != diff(
        {}, {}
    )
    same = diff({"resources": {"limits": {"memory": "1k"}}}, {"resources": {"limits": {"memory": "1000"}}})
    assert same is diff({}, {})


def test_reconcile_keeps_the_autoscalers_status_fields(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = md_body()
    body["status"] = {"desiredCapacity": 3, "lastScaleTime": "2026-11-23T10:00:00Z"}
    _store_md(recording, body)
    result = reconcile(body, recording, settings, NOW)
    assert "desiredCapacity" not in result.status  # never written back from a possibly stale copy
    assert recording.objects[("ModelDeployment", "team-a", "chat")]["status"]["desiredCapacity"] == 3


def _server(recording: RecordingKube) -> dict[str, Any]:
    dep = recording.objects[("Deployment", "team-a", "chat")]
    container: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    return container


def test_gpus_to_zero_removes_the_gpu_limit_and_request(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = md_body(spec={"model": {"uri": "pvc://models/qwen"}, "resources": {"gpus": 2}})
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    res = _server(recording)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2 and res["requests"]["nvidia.com/gpu"] == 2
    recording.clear()

    body = _current(recording)
    body["spec"]["resources"] = {"gpus": 0}
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW + timedelta(seconds=1))
    (patch,) = [c[3] for c in recording.writes() if c[:2] == ("patch", "Deployment")]
    sent = patch["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in sent["limits"] and "nvidia.com/gpu" not in sent["requests"]
    res = _server(recording)["resources"]
    assert set(res["limits"]) == set(res["requests"]) == {"cpu", "memory"}


def test_diff_removes_keys_only_inside_owned_maps() -> None:
    desired = {"spec": {"nodeSelector": {"pool": "a"}, "affinity": {"x": {"y": 1}}, "template": {"k": 1}}}
    observed = {
        "spec": {
            "nodeSelector": {"pool": "a", "zone": "z1"},
            "affinity": {"x": {"y": 1, "z": 2}},
            "template": {"k": 1, "defaulted": True},
        }
    }
    assert diff(desired, observed) == {
        "spec": {"nodeSelector": {"zone": None}, "affinity": {"x": {"z": None}}}
    }


def test_dropped_pod_template_labels_and_annotations_are_removed_and_others_kept(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    body = md_body(
        spec={
            "podTemplate": {"labels": {"team": "a", "cost": "x"}, "annotations": {"prometheus.io/note": "n"}}
        }
    )
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW)
    dep = recording.objects[("Deployment", "team-a", "chat")]
    dep["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = (
        "2026-11-23T10:01:00Z"
    )
    recording.clear()

    body = _current(recording)
    body["spec"]["podTemplate"] = {"labels": {"team": "a"}}
    _store_md(recording, body)
    reconcile(body, recording, settings, NOW + timedelta(seconds=1))
    (patch,) = [c[3] for c in recording.writes() if c[:2] == ("patch", "Deployment")]
    meta = patch["spec"]["template"]["metadata"]
    assert meta == {"labels": {"cost": None}, "annotations": {"prometheus.io/note": None}}
    after = recording.objects[("Deployment", "team-a", "chat")]["spec"]["template"]["metadata"]
    assert after["labels"]["team"] == "a" and "cost" not in after["labels"]
    assert "prometheus.io/note" not in after["annotations"]
    assert after["annotations"]["kubectl.kubernetes.io/restartedAt"] == "2026-11-23T10:01:00Z"

    recording.clear()
    reconcile(_current(recording), recording, settings, NOW + timedelta(seconds=2))
    assert recording.writes() == []


def test_api_errors_are_typed_by_status() -> None:
    assert type(kube.ApiError.for_status(400, "BadRequest", "x")) is kube.Rejected
    assert type(kube.ApiError.for_status(422, "Invalid", "x")) is kube.Rejected
    assert type(kube.ApiError.for_status(404, "NotFound", "x")) is kube.NotFound
    assert type(kube.ApiError.for_status(409, "AlreadyExists", "x")) is kube.Conflict
    other = kube.ApiError.for_status(503, "ServiceUnavailable", "etcd away")
    assert (
        type(other) is kube.ApiError
        and other.status == 503
        and str(other) == "503 ServiceUnavailable: etcd away"
    )


def test_handlers_share_one_context_through_kopfs_memo(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    ctx = OperatorContext.create(settings, namespaces=["team-a"], priority=7, client=recording)
    memo = kopf.Memo({MEMO_KEY: ctx})
    assert from_memo(copy.copy(memo)) is ctx  # kopf hands each object a shallow copy of the operator's memo
    assert ctx.client.client is recording and ctx.autoscaler.client is ctx.client
    with pytest.raises(RuntimeError, match="no OperatorContext"):
        from_memo(kopf.Memo())


def test_a_refused_child_is_recorded_and_retried_with_backoff(
    recording: RecordingKube, settings: OperatorSettings
) -> None:
    _store_md(recording, md_body())

    class Refusing(RecordingKube):
        def create(
            self, kind: kube.Kind, namespace: str, body: dict[str, Any], dry_run: bool = False
        ) -> dict[str, Any] | None:
            if kind.kind == "Deployment":
                raise kube.Rejected(422, "Invalid", 'Deployment.apps "chat" is invalid: spec.template: bad')
            return super().create(kind, namespace, body, dry_run)

    refusing = Refusing()
    refusing.objects = recording.objects
    ctx = OperatorContext.create(settings, client=refusing)
    delays = [reconcile_key(ctx, refusing) for _ in range(3)]
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4 and 3.2 <= delays[2] <= 4.8  # doubling, jitter
    status = refusing.objects[("ModelDeployment", "team-a", "chat")]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert status["phase"] == "Failed" and ready["reason"] == "ChildRejected"
    assert ready["message"].startswith("the API server refused a child: Deployment.apps")
    events = [c[3] for c in refusing.writes() if c[:2] == ("create", "Event")]
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "ChildRejected")]  # once, not per retry


class Failing(RecordingKube):
    """Answers creates of one kind with an API error (a given number of times)."""

    def __init__(self, kind: str, error: kube.ApiError, times: int = 1_000) -> None:
        super().__init__()
        self.kind, self.error, self.times = kind, error, times

    def create(
        self, kind: kube.Kind, namespace: str, body: dict[str, Any], dry_run: bool = False
    ) -> dict[str, Any] | None:
        if kind.kind == self.kind and self.times > 0:
            self.times -= 1
            self.calls.append(("create", kind.kind, str(body["metadata"].get("name")), None))
            raise self.error
        return super().create(kind, namespace, body, dry_run)


QUOTA = 'services "chat" is forbidden: exceeded quota: no-services, requested: services=1, used: services=0, limited: services=0'


def test_a_403_becomes_a_false_condition_quoting_the_api_and_backs_off(settings: OperatorSettings) -> None:
    api = Failing("Service", kube.Forbidden(403, "Forbidden", QUOTA))
    _store_md(api, md_body())
    ctx = OperatorContext.create(settings, client=api)
    first = reconcile_key(ctx, api)
    status = api.objects[("ModelDeployment", "team-a", "chat")]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Forbidden"
    assert ready["message"] == f"the API server forbade a write: {QUOTA}"
    api.clear()
    second = reconcile_key(ctx, api)
    assert first is not None and second is not None and second > first  # backing off, not a fixed retry loop
    assert [c[:2] for c in api.writes()] == [("create", "Service")]  # only the retry: no new status or Event
    api.times = 0  # the quota is lifted
    assert reconcile_key(ctx, api) is None
    ready = next(
        c
        for c in api.objects[("ModelDeployment", "team-a", "chat")]["status"]["conditions"]
        if c["type"] == "Ready"
    )
    assert ready["reason"] != "Forbidden"
    assert ctx.backoff.failures(("team-a", "chat")) == 0


def test_a_429_waits_at_least_the_retry_after_and_records_no_failure(settings: OperatorSettings) -> None:
    api = Failing("Deployment", kube.TooManyRequests(429, "TooManyRequests", "slow down", retry_after=7.0))
    _store_md(api, md_body())
    ctx = OperatorContext.create(settings, client=api)
    assert reconcile_key(ctx, api) == pytest.approx(7.0)
    assert not [c for c in api.writes() if c[0] == "patch_status" and c[3].get("phase") == "Failed"]
    api.times = 0
    assert reconcile_key(ctx, api) is None
    assert ("Deployment", "team-a", "chat") in api.objects


def test_steady_state_from_the_caches_sends_no_request(settings: OperatorSettings) -> None:
    api = RecordingKube()
    _store_md(api, md_body(spec={"capacity": 2, "access": {"allowedNamespaces": ["apps"]}}))
    ctx = OperatorContext.create(settings, client=api)
    assert reconcile_key(ctx, api) is None
    assert not any(c[:2] == ("get", "Secret") or c[0] == "list" for c in api.calls)  # no Secret read, no LIST
    for _ in range(3):
        api.clear()
        assert reconcile_key(ctx, api) is None
        assert api.calls == []  # everything from the caches: no read, no write


def test_status_needs_no_pod_list_and_a_fresh_reconcile_writes_status_once(
    settings: OperatorSettings,
) -> None:
    api = RecordingKube()
    _store_md(api, md_body(spec={"capacity": 1}))
    ctx = OperatorContext.create(settings, client=api)
    reconcile_key(ctx, api)
    assert [c[0] for c in api.calls if c[1] == "ModelDeployment"] == ["patch_status"]  # the record, once
    pod = {
        "metadata": {
            "name": "chat-1",
            "namespace": "team-a",
            "labels": {"berth.dev/model-deployment": "chat", "app.kubernetes.io/managed-by": "berth"},
            "resourceVersion": "9",
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "server"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    dep = api.objects[("Deployment", "team-a", "chat")]
    dep["status"] = {
        "replicas": 1,
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "availableReplicas": 1,
        "observedGeneration": 1,
    }
    dep["metadata"]["resourceVersion"] = "10"
    api.objects[("Pod", "team-a", "chat-1")] = pod
    api.clear()
    reconcile_key(ctx, api)
    assert [c[0] for c in api.calls if c[0] in ("get", "list")] == []
    (written,) = [c[3] for c in api.calls if c[0] == "patch_status"]
    assert written["phase"] == "Running" and written["readyCapacity"] == 1


def _cached(settings: OperatorSettings, api: RecordingKube) -> OperatorContext:
    ctx = OperatorContext.create(settings, client=api)
    feed(ctx, api)
    return ctx


def test_the_generated_secret_is_created_never_read_and_a_409_without_record_is_someone_elses(
    settings: OperatorSettings,
) -> None:
    api = RecordingKube()
    body = md_body()
    _store_md(api, body)
    api.objects[("Secret", "team-a", "chat-api-keys")] = {
        "metadata": {"name": "chat-api-keys", "namespace": "team-a"},
        "data": {"billing": "eA=="},
    }
    ctx = _cached(settings, api)
    result = reconcile(_current(api), ctx.client, settings, NOW)
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict" and "Secret/chat-api-keys" in ready["message"]
    assert ("Deployment", "team-a", "chat") not in api.objects  # the foreign Secret is not mounted
    assert not [c for c in api.calls if c[:2] == ("get", "Secret")]
    api.clear()
    feed(ctx, api)
    reconcile(_current(api), ctx.client, settings, NOW + timedelta(seconds=3))
    assert [c[:2] for c in api.writes()] == [("create", "Secret")]  # asks again, writes nothing else
    del api.objects[("Secret", "team-a", "chat-api-keys")]  # its owner removes it
    feed(ctx, api)
    result = reconcile(_current(api), ctx.client, settings, NOW + timedelta(seconds=6))
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] != "ChildConflict" and ("Deployment", "team-a", "chat") in api.objects
    assert (
        api.objects[("Secret", "team-a", "chat-api-keys")]["metadata"]["ownerReferences"][0]["uid"]
        == "uid-chat"
    )


def test_a_409_after_the_record_is_the_operators_own_secret(settings: OperatorSettings) -> None:
    """The operator died after creating the Secret, before its status write: a new process gets 409
    and, as the status recorded the Secret before the create, keeps it (no conflict, no new key)."""
    api = RecordingKube()
    _store_md(api, md_body())
    first = _cached(settings, api)
    reconcile(_current(api), first.client, settings, NOW, api_key=lambda: "sk-first")
    key = api.objects[("Secret", "team-a", "chat-api-keys")]["data"]
    restarted = _cached(settings, api)  # a new process: its Secret memory is empty
    result = reconcile(_current(api), restarted.client, settings, NOW, api_key=lambda: "sk-second")
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] != "ChildConflict"
    assert api.objects[("Secret", "team-a", "chat-api-keys")]["data"] == key
    api.clear()
    reconcile(_current(api), restarted.client, settings, NOW, api_key=lambda: "sk-third")
    assert api.calls == []  # remembered: no create again


def test_a_referenced_secret_is_checked_with_a_dry_run_create_not_a_read(settings: OperatorSettings) -> None:
    api = RecordingKube()
    _store_md(api, md_body(spec={"auth": {"apiKeySecretRef": "team-keys"}}))
    ctx = _cached(settings, api)
    result = reconcile(_current(api), ctx.client, settings, NOW)
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "APIKeySecretNotFound"
    assert [c[:3] for c in api.calls if c[1] == "Secret"] == [("dry-run create", "Secret", "team-keys")]
    assert ("Secret", "team-a", "team-keys") not in api.objects  # a dry run stores nothing
    api.objects[("Secret", "team-a", "team-keys")] = {
        "metadata": {"name": "team-keys", "namespace": "team-a"}
    }
    feed(ctx, api)
    result = reconcile(_current(api), ctx.client, settings, NOW + timedelta(seconds=3))
    assert (
        next(c for c in result.status["conditions"] if c["type"] == "Ready")["reason"]
        != "APIKeySecretNotFound"
    )
    api.clear()
    feed(ctx, api)
    reconcile(_current(api), ctx.client, settings, NOW + timedelta(seconds=6))
    assert [c for c in api.calls if c[1] == "Secret"] == []  # found once: remembered


def test_a_foreign_secret_stays_foreign_after_an_invalid_edit_in_between(settings: OperatorSettings) -> None:
    """The record of the generated Secret is removed while the name is someone else's, so a Failed
    status in between (which replaces the ChildConflict condition) does not turn the 409 into "ours"."""
    api = RecordingKube()
    _store_md(api, md_body())
    api.objects[("Secret", "team-a", "chat-api-keys")] = {
        "metadata": {"name": "chat-api-keys", "namespace": "team-a"}
    }
    ctx = _cached(settings, api)
    result = reconcile(_current(api), ctx.client, settings, NOW)
    assert "apiKeySecret" not in api.objects[("ModelDeployment", "team-a", "chat")]["status"]
    assert result.status["apiKeySecret"] is None
    body = _current(api)
    body["status"]["conditions"] = [
        {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": "x"}
    ]  # what a Failed status leaves
    _store_md(api, body)
    feed(ctx, api)
    result = reconcile(_current(api), ctx.client, settings, NOW + timedelta(seconds=5))
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ChildConflict"
    assert ("Deployment", "team-a", "chat") not in api.objects


def test_a_restarted_operator_reads_no_secret_for_the_gateway_key_either(
    settings: OperatorSettings, tmp_path: Any
) -> None:
    (tmp_path / "master").write_bytes(b"the-gateway-master-key\n")
    gw = settings.model_copy(update={"gateway_master_key_file": str(tmp_path / "master")})
    api = RecordingKube()
    _store_md(api, md_body())
    reconcile(_current(api), _cached(gw, api).client, gw, NOW)
    assert ("Secret", "team-a", "chat-gateway-key") in api.objects
    api.clear()
    restarted = _cached(gw, api)
    reconcile(_current(api), restarted.client, gw, NOW)
    assert [c[:2] for c in api.calls if c[1] == "Secret"] == [
        ("create", "Secret"),
        ("create", "Secret"),
    ]  # 409s
    api.clear()
    reconcile(_current(api), restarted.client, gw, NOW)
    assert api.calls == []

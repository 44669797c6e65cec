"""ApiKey reconcile: the key goes into an owned Secret, only its hash into the status."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from berth.api.apikey import ApiKeySpec
from berth.api.apikey_crd import build_crd
from berth.controller import kube
from berth.controller.apikeys import APIKEY, reconcile_apikey, secret_name
from tests.unit.conftest import RecordingKube


def ak_body(name: str = "ci", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "ApiKey",
        "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}", "generation": 1},
        "spec": spec or {},
    }


def test_generates_an_owned_secret_and_publishes_only_the_hash() -> None:
    api = RecordingKube()
    body = ak_body()
    status = reconcile_apikey(body, api)
    secret = api.objects[("Secret", "team-a", "ci-apikey")]
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-ci"
    assert secret["metadata"]["ownerReferences"][0]["controller"] is True
    key = base64.b64decode(secret["data"]["key"]).decode()
    assert key.startswith("bk-") and len(key) > 40
    assert status["keyHash"] == hashlib.sha256(key.encode()).hexdigest()
    assert status["keyId"].startswith("ak-") and status["conditions"][0]["reason"] == "Active"
    assert key not in repr(api.objects[("ApiKey", "team-a", "ci")])
    # idempotent: the same key, no second write
    api.objects[("ApiKey", "team-a", "ci")].update(body)
    body["status"] = api.objects[("ApiKey", "team-a", "ci")]["status"]
    api.clear()
    assert reconcile_apikey(body, api) == {}
    assert api.writes() == []


def test_a_foreign_secret_is_a_conflict_not_adopted() -> None:
    api = RecordingKube()
    api.create(kube.SECRET, "team-a", {"metadata": {"name": secret_name("ci")}, "data": {"key": "eA=="}})
    status = reconcile_apikey(ak_body(), api)
    assert status["keyHash"] is None and status["conditions"][0]["reason"] == "ChildConflict"
    assert api.objects[("Secret", "team-a", "ci-apikey")]["data"] == {"key": "eA=="}


def test_disabled_and_expired_keys_say_so() -> None:
    api = RecordingKube()
    assert reconcile_apikey(ak_body(spec={"disabled": True}), api)["conditions"][0]["reason"] == "Disabled"
    later = datetime(2031, 1, 1, tzinfo=UTC)
    status = reconcile_apikey(ak_body("old", {"expiresAt": "2030-01-01T00:00:00Z"}), api, now=later)
    assert status["conditions"][0]["reason"] == "Expired" and status["keyHash"]


def test_status_patch_never_names_usage() -> None:
    api = RecordingKube()
    reconcile_apikey(ak_body(), api)
    patches = [c[3] for c in api.calls if c[0] == "patch_status" and c[1] == APIKEY.kind]
    assert patches and all("usage" not in p for p in patches)


def test_spec_defaults_and_validation() -> None:
    spec = ApiKeySpec.model_validate({})
    assert (
        spec.limits.requests_per_minute,
        spec.limits.tokens_per_minute,
        spec.limits.max_concurrent_requests,
    ) == (
        600,
        1_000_000,
        32,
    )
    with pytest.raises(pydantic.ValidationError):
        ApiKeySpec.model_validate({"models": ["Not_A_Name"]})
    with pytest.raises(pydantic.ValidationError):
        ApiKeySpec.model_validate({"limits": {"requestsPerMinute": 0}})


def test_crd_is_committed_and_has_the_printer_columns() -> None:
    from pathlib import Path

    from berth.api.apikey_crd import render

    root = Path(__file__).resolve().parents[2]
    assert (root / "crds" / "apikeys.berth.dev.yaml").read_text() == render()
    cols = [c["name"] for c in build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols == ["Models", "RPM", "TPM", "Requests", "Tokens", "Last-Used", "Age"]

"""The generated CRD: committed copy up to date, structural, scale subresource, printer columns, CEL rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from berth.api.crd import build_crd, render

ROOT = Path(__file__).resolve().parents[2]


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version


def test_berth_crd_output_equals_committed_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "berth.cli", "crd"], capture_output=True, text=True, check=True
    ).stdout
    assert out == (ROOT / "crds" / "modeldeployments.berth.dev.yaml").read_text()
    assert out == render()


def test_names_scope_and_subresources() -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "modeldeployments.berth.dev"
    assert crd["spec"]["names"]["shortNames"] == ["md"]
    assert crd["spec"]["scope"] == "Namespaced"
    version = _version(crd)
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.capacity",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["MODEL", "PHASE", "CAPACITY", "READY", "ENDPOINT", "AGE"]


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in (node.get("properties") or {}).items():
        out += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    schema = _version(build_crd())["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    for forbidden in ("$ref", "anyOf", "allOf", "oneOf", "$defs", "title:"):
        assert forbidden not in text, forbidden
    for path, node in _walk(schema):
        typed = (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{path} has no type"
        if path.startswith(".spec") and path.count(".") <= 3 and not path.endswith(("[]", "}")):
            assert node.get("description"), f"{path} has no description (kubectl explain shows it)"


def test_cel_rules_cover_the_cross_field_checks() -> None:
    schema = _version(build_crd())["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    rules = [r["message"] for r in spec["x-kubernetes-validations"]]
    rules += [r["message"] for r in spec["properties"]["model"]["x-kubernetes-validations"]]
    assert any("minCapacity must not exceed" in r for r in rules)
    assert any("within [spec.autoscaling.minCapacity" in r for r in rules)
    assert any("model.uri must be one of" in r for r in rules)
    assert any("adapter names must be unique" in r for r in rules)
    assert spec["properties"]["capacity"]["minimum"] == 0


def _validator() -> jsonschema.Draft4Validator:
    # The CRD's subset of OpenAPI v3 is JSON Schema draft 4 (boolean exclusiveMinimum included).
    return jsonschema.Draft4Validator(_version(build_crd())["schema"]["openAPIV3Schema"])


def test_every_example_validates_against_the_schema() -> None:
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    checked = 0
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ModelDeployment" and "invalid" not in path.name:
                errors = [e.message for e in _validator().iter_errors(doc)]
                assert errors == [], f"{path.name}: {errors}"
                checked += 1
    if examples:
        assert checked > 0


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"capacity": -1}, "-1 is less than the minimum of 0"),
        ({"model": {"dtype": "int3"}}, "'int3' is not one of"),
        ({"rollout": {"maxSurge": "25%"}}, None),
    ],
)
def test_schema_rejects_bad_values(spec: dict[str, Any], words: str | None) -> None:
    doc = {"apiVersion": "berth.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {}, "spec": spec}
    errors = [e.message for e in _validator().iter_errors(doc)]
    if words is None:
        assert errors == []
    else:
        assert any(words in e for e in errors), errors

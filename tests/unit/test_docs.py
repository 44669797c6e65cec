"""Docs and examples stay true: docs/api.md is generated and current, the troubleshooting guide covers
every reason the operator can report, every example says what it shows and is valid (or, for the
`invalid-*` ones, is rejected with the message its header promises), and relative links resolve."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml

from berth.api import crd
from berth.api import models as m
from berth.controller import builders
from berth.controller.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
RENDER_API_DOCS = ROOT / "tools" / "render_api_docs.py"
_spec = importlib.util.spec_from_file_location("render_api_docs", RENDER_API_DOCS)
assert _spec is not None and _spec.loader is not None
docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs)
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = [p for p in EXAMPLES if p.name.startswith("invalid-")]
VALID = [p for p in EXAMPLES if not p.name.startswith("invalid-")]


# ---------------------------------------------------------------- docs/api.md


def test_api_md_is_up_to_date() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == docs.render(), "docs/api.md is stale: run make docs"
    r = subprocess.run([sys.executable, str(RENDER_API_DOCS), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _models() -> list[type[pydantic.BaseModel]]:
    return docs._order()


def test_api_md_documents_every_field() -> None:
    text = docs.render()
    for model in _models():
        assert f"## {model.__name__}\n" in text
        section = text.split(f"## {model.__name__}\n", 1)[1].split("\n## ", 1)[0]
        for name, field in model.model_fields.items():
            wire = field.alias or name
            row = next((ln for ln in section.splitlines() if ln.startswith(f"| `{wire}` |")), None)
            assert row is not None, f"{model.__name__}.{wire} missing"
            if field.description:
                assert field.description.replace("|", "\\|") in row
    assert "| `capacity` | integer | `1` | min 0; max 1000 |" in text
    assert "one of `auto`, `float32`, `bfloat16`, `float16`" in text
    for rule in crd.CEL_RULES["spec"] + crd.CEL_RULES["spec.model"]:
        assert rule["message"] in text
    for name in OperatorSettings.model_fields:
        assert f"| `BERTH_{name.upper()}` |" in text


def test_docs_type_and_default_rendering() -> None:
    assert docs.type_name(int | None) == "integer"
    assert docs.type_name(list[m.Adapter]) == "list of [Adapter](#adapter)"
    assert docs.type_name(dict[str, str]) == "map of string to string"
    assert docs.type_name(m.IntOrPercent) == "integer or string"
    assert docs.default_text(m.Autoscaling.model_fields["max_capacity"]) == "`4`"
    assert docs.default_text(m.SecretKeyRef.model_fields["name"]) == "required"
    assert docs.validation_text({"minimum": 0, "exclusiveMinimum": True, "maximum": 1}) == "> 0; max 1"


# ---------------------------------------------------------------- operations.md troubleshooting


def _status_reasons() -> set[str]:
    """Every condition reason the status modules (status.py, conditions.py, diagnosis.py) can write."""
    from berth.controller import conditions, diagnosis, status

    trees = [ast.parse(Path(m.__file__).read_text()) for m in (status, conditions, diagnosis)]
    reasons: set[str] = set(diagnosis.IMAGE_PULL_REASONS | diagnosis.CONFIG_REASONS)
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Cause", "_condition"):
            args = node.args if node.func.id == "Cause" else node.args[3:4]  # type: ignore[attr-defined]
            for arg in args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    reasons.add(arg.value)
        if isinstance(node, ast.Tuple) and len(node.elts) == 3:
            first, second = node.elts[0], node.elts[1]
            if (
                isinstance(first, ast.Constant)
                and first.value in ("True", "False")
                and isinstance(second, ast.Constant)
                and isinstance(second.value, str)
            ):
                reasons.add(second.value)
    # failed_status takes its reason from the work queue's reconciler that records the failure
    loops = ast.parse((Path(status.__file__).parent / "loops.py").read_text())
    for node in ast.walk(loops):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_failed":
            reasons.update(
                a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            )
    reasons.discard("")
    return reasons


def test_troubleshooting_covers_every_reason_and_phase() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    guide = text.split("## Troubleshooting", 1)[1]
    reasons = _status_reasons()
    assert {
        "Unschedulable",
        "CrashLoopBackOff",
        "APIKeySecretNotFound",
        "InvalidSpec",
        "ChildRejected",
        "ScaledToZero",
    } <= reasons
    missing = sorted(r for r in reasons if f"`{r}`" not in guide)
    assert missing == [], f"operations.md does not explain: {missing}"
    for phase in m.PHASES:
        assert f"| `{phase}` |" in guide, phase


# ---------------------------------------------------------------- examples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_has_a_header(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# {path.name}: "), "first line: '# <file>: what it shows'"
    assert len(lines[0]) > len(path.name) + 20


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_example_parses_and_builds(path: Path) -> None:
    mds = [d for d in _docs(path) if d["kind"] == "ModelDeployment"]
    assert len(mds) == 1
    body = mds[0]
    md = m.ModelDeployment.model_validate({**body, "metadata": {**body["metadata"], "uid": "u1"}})
    deployment = builders.build_deployment(md, OperatorSettings())
    assert deployment["spec"]["replicas"] == md.spec.capacity
    for other in _docs(path):
        if other["kind"] == "HorizontalPodAutoscaler":
            ref = other["spec"]["scaleTargetRef"]
            assert (ref["apiVersion"], ref["kind"], ref["name"]) == (m.API_VERSION, m.KIND, md.name)
        if other["kind"] == "Secret":
            assert md.spec.auth.api_key_secret_ref == other["metadata"]["name"]
            assert other.get("stringData") or other.get("data")


def test_examples_cover_the_issue() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "smollm2-cpu.yaml",
        "gpu-pvc.yaml",
        "lora-adapter.yaml",
        "autoscaling.yaml",
        "private-access.yaml",
        "hpa.yaml",
        "invalid-negative-capacity.yaml",
        "invalid-min-gt-max.yaml",
        "invalid-model-scheme.yaml",
        "invalid-duplicate-adapter.yaml",
    } <= names
    cpu = _docs(ROOT / "examples" / "smollm2-cpu.yaml")[0]
    assert cpu["spec"]["model"]["uri"] == m.BUILTIN_MODEL and cpu["spec"]["capacity"] == 1
    gpu = _docs(ROOT / "examples" / "gpu-pvc.yaml")[0]
    assert gpu["spec"]["resources"]["gpus"] >= 1 and gpu["spec"]["model"]["uri"].startswith("pvc://")


def _expected_error(path: Path) -> str:
    found = re.findall(r"^# expect-error: (.+)$", path.read_text(), flags=re.MULTILINE)
    assert len(found) == 1, "an invalid example needs one '# expect-error: <message>' line"
    return found[0].strip()


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_rejected_as_documented(path: Path) -> None:
    expected = _expected_error(path)
    (body,) = _docs(path)
    with pytest.raises(pydantic.ValidationError):
        m.ModelDeploymentSpec.model_validate(body["spec"])
    crd_doc = crd.build_crd()
    schema = crd_doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema_errors = [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(body)]
    cel_messages = [
        r["message"] for rules in crd.CEL_RULES.values() for r in rules if expected in r["message"]
    ]
    if schema_errors:  # the structural schema catches it: the API server's wording for the bound
        assert "greater than or equal to 0" in expected and any(
            "less than the minimum" in e for e in schema_errors
        )
    else:  # a CEL rule catches it: its message is what kubectl prints
        assert cel_messages, f"no CEL rule says {expected!r}"


# ---------------------------------------------------------------- links


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
        if re.match(r"^[a-z]+://", target):
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


# -------------------------------------------------------------- docs/models.md


def test_models_md_is_generated_from_the_registry_and_current() -> None:
    tool = ROOT / "tools" / "render_models_doc.py"
    spec = importlib.util.spec_from_file_location("render_models_doc", tool)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "models.md").read_text() == module.render(), (
        "run python tools/render_models_doc.py"
    )


def test_every_family_in_the_registry_is_tested() -> None:
    from berth.server.engine import families
    from tests.server import tiny_models

    assert set(tiny_models.ARCHITECTURES) == set(families.BY_TYPE)
    assert set(tiny_models.NATIVE) == set(families.NATIVE_MODEL_TYPES)


def test_every_vision_family_in_the_registry_is_tested() -> None:
    from berth.server.engine import families
    from tests.server import tiny_vlms

    assert set(tiny_vlms.MODEL_TYPES) == {f.model_type for f in families.VISION_FAMILIES}

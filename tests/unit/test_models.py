"""The ModelDeployment pydantic models: defaults, parsing, and the messages bad input gets."""

from __future__ import annotations

import pydantic
import pytest

from berth.api import ModelDeploymentSpec, ModelUri


def test_defaults_make_a_servable_instance() -> None:
    spec = ModelDeploymentSpec()
    assert spec.model.uri == "builtin://smollm2-135m-instruct"
    assert spec.capacity == 1
    assert spec.resources.gpus == 0
    assert spec.resources.gpu_resource_name == "nvidia.com/gpu"
    assert spec.auth.mode == "apiKey"
    assert spec.access is None
    assert spec.autoscaling.enabled is False
    assert spec.rollout.max_surge == 1 and spec.rollout.max_unavailable == 0


def test_camel_case_on_the_wire() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"uri": "pvc://models/qwen", "servedName": "qwen", "maxModelLen": 4096}, "capacity": 3}
    )
    assert spec.model.served_name == "qwen"
    assert spec.model.max_model_len == 4096
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["model"]["servedName"] == "qwen"
    assert "served_name" not in dumped["model"]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("builtin://smollm2-135m-instruct", ModelUri("builtin", "smollm2-135m-instruct")),
        ("pvc://model-store/qwen2.5-0.5b", ModelUri("pvc", "model-store", "qwen2.5-0.5b")),
        ("pvc://model-store", ModelUri("pvc", "model-store", "")),
        ("hostpath:///data/models/llama", ModelUri("hostpath", "/data/models/llama")),
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", ModelUri("hf", "Qwen/Qwen2.5-0.5B-Instruct", "")),
        ("hf://Qwen/Qwen2.5-0.5B-Instruct@v1", ModelUri("hf", "Qwen/Qwen2.5-0.5B-Instruct", "v1")),
    ],
)
def test_model_uri_parse(uri: str, expected: ModelUri) -> None:
    assert ModelUri.parse(uri) == expected


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"capacity": -1}, "capacity", "greater than or equal to 0"),
        ({"model": {"uri": "s3://bucket/model"}}, "model.uri", "model.uri must be one of"),
        ({"model": {"uri": "builtin://gpt-5"}}, "model.uri", "unknown built-in model"),
        (
            {"model": {"adapters": [{"name": "a", "uri": "pvc://x/a"}, {"name": "a", "uri": "pvc://x/b"}]}},
            "model",
            "adapter names must be unique; repeated: a",
        ),
        (
            {"autoscaling": {"minCapacity": 3, "maxCapacity": 1}},
            "autoscaling",
            "must not exceed maxCapacity (1)",
        ),
        (
            {"capacity": 9, "autoscaling": {"enabled": True, "minCapacity": 1, "maxCapacity": 4}},
            "",
            "capacity 9 is outside autoscaling bounds [1, 4]",
        ),
        ({"access": {"allowedCIDRs": ["10.0.0.0/33"]}}, "access.allowedCIDRs", "is not a CIDR"),
        ({"engine": {"kvCacheMemoryFraction": 0}}, "engine.kvCacheMemoryFraction", "greater than 0"),
        ({"resources": {"memory": "lots"}}, "resources.memory", "should match pattern"),
        ({"unknownField": 1}, "unknownField", "Extra inputs are not permitted"),
    ],
)
def test_bad_input_names_the_field(spec: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ModelDeploymentSpec.model_validate(spec)
    errors = info.value.errors()
    locs = [".".join(str(p) for p in e["loc"]) for e in errors]
    assert any(loc == field or loc.startswith(field + ".") for loc in locs), locs
    assert any(words in e["msg"] for e in errors), [e["msg"] for e in errors]


def test_every_field_is_described() -> None:
    def walk(model: type[pydantic.BaseModel], path: str) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(f"{path}.{name}")
            ann = info.annotation
            for arg in (ann, *getattr(ann, "__args__", ())):
                if isinstance(arg, type) and issubclass(arg, pydantic.BaseModel):
                    missing += walk(arg, f"{path}.{name}")
        return missing

    assert walk(ModelDeploymentSpec, "spec") == []

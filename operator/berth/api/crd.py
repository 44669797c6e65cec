"""Generate the ModelDeployment CustomResourceDefinition from the pydantic models.

`berth crd` prints it; crds/ and the Helm chart hold the committed copy (`make verify` checks it).
The pydantic JSON schema is turned into a Kubernetes *structural* schema: references inlined,
Optional collapsed, int-or-string marked, object defaults reduced to `{}` so nested defaults apply,
and the cross-field rules added as CEL (`x-kubernetes-validations`).
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import yaml

from berth.api import models as m

# Keywords a structural schema may keep; everything else pydantic emits (title, $defs, ...) is dropped.
_KEEP = {
    "type",
    "description",
    "properties",
    "items",
    "additionalProperties",
    "required",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "nullable",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def _rule(
    rule: str, message: str, field_path: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


_URI_ANY = "|".join(f"({p.strip('^$')})" for p in m.URI_PATTERNS.values())

# CEL rules by the JSON-pointer-ish path of the object they sit on.
CEL_RULES: dict[str, list[dict[str, Any]]] = {
    "spec": [
        _rule(
            "!has(self.autoscaling) || !has(self.autoscaling.minCapacity) || !has(self.autoscaling.maxCapacity)"
            " || self.autoscaling.minCapacity <= self.autoscaling.maxCapacity",
            "spec.autoscaling.minCapacity must not exceed spec.autoscaling.maxCapacity",
            ".autoscaling.minCapacity",
        ),
        _rule(
            "!has(self.autoscaling) || !has(self.autoscaling.enabled) || !self.autoscaling.enabled"
            " || !has(self.capacity)"
            " || (self.capacity >= self.autoscaling.minCapacity && self.capacity <= self.autoscaling.maxCapacity)",
            "spec.capacity must lie within [spec.autoscaling.minCapacity, spec.autoscaling.maxCapacity]"
            " while autoscaling is enabled",
            ".capacity",
        ),
    ],
    "spec.model": [
        _rule(
            f"!has(self.uri) || self.uri.matches('^({_URI_ANY})$')",
            "spec." + m.URI_HELP,
            ".uri",
        ),
        _rule(
            "!has(self.uri) || !self.uri.startsWith('builtin://') || self.uri in ["
            + ", ".join(f"'builtin://{b}'" for b in m.BUILTIN_MODELS)
            + "]",
            "spec.model.uri: unknown built-in model; built-in models: " + ", ".join(m.BUILTIN_MODELS),
            ".uri",
        ),
        _rule(
            "!has(self.revision) || (has(self.uri) && self.uri.startsWith('hf://')"
            " && (!self.uri.contains('@') || self.uri.endsWith('@' + self.revision)))",
            "spec.model.revision applies to an hf:// uri, and must equal the uri's @revision when both are given",
            ".revision",
        ),
        _rule(
            "!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            "spec.model.adapters: adapter names must be unique",
            ".adapters",
        ),
    ],
    "spec.model.adapters[]": [
        _rule(
            f"self.uri.matches('^({_URI_ANY})$') && !self.uri.startsWith('builtin://')",
            "spec.model.adapters[].uri must be pvc://<claim>/<path>, hostpath:///<dir> or hf://<org>/<name>",
            ".uri",
        ),
    ],
}


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline `$ref`s (pydantic may put description/default beside a $ref or wrap it in allOf)."""
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    if "allOf" in schema and len(schema["allOf"]) == 1:
        inner = _resolve(schema["allOf"][0], defs)
        extra = {k: v for k, v in schema.items() if k != "allOf"}
        return {**inner, **extra}
    return schema


def _int_or_string(schema: dict[str, Any]) -> dict[str, Any] | None:
    """`int | str` (or a field marked x-kubernetes-int-or-string) as an IntOrString; None for other unions."""
    types = {o.get("type") for o in schema["anyOf"] if o.get("type") != "null"}
    if not schema.get("x-kubernetes-int-or-string") and types != {"integer", "string"}:
        return None
    out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
    out.update({k: v for k, v in schema.items() if k in ("description", "default")})
    return out


def _optional(schema: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """`X | None` as X (absent means None; a None default is dropped)."""
    options = [o for o in schema["anyOf"] if o.get("type") != "null"]
    if len(options) != 1:
        raise ValueError(f"{path}: a union of {options} has no structural form")
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    out = {**_resolve(options[0], defs), **rest}
    if out.get("default", 0) is None:
        del out["default"]
    return out


def _property(sub: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    prop = _structural(sub, defs, path)
    resolved = _resolve(sub, defs)
    # optional, or a free-form object that only names some fields (an EnvVar's valueFrom): no default
    optional = "anyOf" in resolved or resolved.get("additionalProperties") is True
    if prop.get("type") == "object" and "properties" in prop and "default" not in prop and not optional:
        prop["default"] = {}  # a default_factory sub-object: let its fields default
    return prop


def _keyword(key: str, value: Any, defs: dict[str, Any], path: str) -> dict[str, Any]:
    """One kept keyword of a schema, its sub-schemas made structural."""
    if key == "properties":
        return {
            key: {
                name: _property(sub, defs, f"{path}.{name}" if path else name) for name, sub in value.items()
            }
        }
    if key == "items":
        return {key: _structural(value, defs, f"{path}[]")}
    if key == "additionalProperties":
        if value is True or value == {}:
            return {"x-kubernetes-preserve-unknown-fields": True}
        return {} if value is False else {key: _structural(value, defs, f"{path}{{}}")}
    return {key: value}


def _finish(out: dict[str, Any], schema: dict[str, Any], path: str) -> dict[str, Any]:
    """OpenAPI v3 bounds, free-form objects, defaults reduced so nested ones apply, the CEL rules."""
    if "exclusiveMinimum" in schema:  # JSON Schema 2020 number -> OpenAPI v3 boolean form
        out["minimum"] = schema["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in schema:
        out["maximum"] = schema["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if isinstance(out.get("default"), dict):
        out["default"] = {}  # nested defaults then apply field by field
    if isinstance(out.get("default"), list) and out["default"]:
        out["default"] = []
    if path in CEL_RULES:
        out["x-kubernetes-validations"] = CEL_RULES[path]
    return out


def _structural(schema: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        int_or_string = _int_or_string(schema)
        if int_or_string is not None:
            return int_or_string
        schema = _optional(schema, defs, path)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _KEEP:
            out.update(_keyword(key, value, defs, path))
    return _finish(out, schema, path)


def openapi_schema() -> dict[str, Any]:
    """The structural openAPIV3Schema of the ModelDeployment resource."""
    spec_schema = m.ModelDeploymentSpec.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    status_schema = m.ModelDeploymentStatus.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    spec_defs = spec_schema.pop("$defs", {})
    status_defs = status_schema.pop("$defs", {})
    spec = _structural(spec_schema, spec_defs, "spec")
    spec.pop("required", None)
    spec["description"] = (m.ModelDeploymentSpec.__doc__ or "").strip()
    status = _structural(status_schema, status_defs, "status")
    status["description"] = (m.ModelDeploymentStatus.__doc__ or "").strip()
    status.pop("required", None)
    return {
        "type": "object",
        "description": (m.ModelDeployment.__doc__ or "").strip(),
        # The name becomes the Service's (a DNS-1035 label) and a label value: at most 63 characters.
        "x-kubernetes-validations": [
            _rule(
                "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63",
                "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a "
                "letter, at most 63 characters): it names the instance's Service",
            )
        ],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: berth.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: ModelDeployment."},
            "metadata": {"type": "object"},
            "spec": {**spec, "default": {}},
            "status": status,
        },
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "description": "Model source"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase"},
    {
        "name": "Capacity",
        "type": "integer",
        "jsonPath": ".spec.capacity",
        "description": "Instances asked for",
    },
    {
        "name": "Ready",
        "type": "integer",
        "jsonPath": ".status.readyCapacity",
        "description": "Instances ready",
    },
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "description": "OpenAI base URL"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition for modeldeployments.berth.dev."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{m.PLURAL}.{m.GROUP}",
            "labels": {"app.kubernetes.io/name": "berth", "app.kubernetes.io/part-of": "berth"},
        },
        "spec": {
            "group": m.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": m.KIND,
                "listKind": f"{m.KIND}List",
                "plural": m.PLURAL,
                "singular": m.SINGULAR,
                "shortNames": list(m.SHORT_NAMES),
                "categories": ["berth", "all"],
            },
            "versions": [
                {
                    "name": m.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.capacity",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def render() -> str:
    """The CRD as YAML, exactly as committed in crds/."""
    header = "# Generated by `berth crd` from operator/berth/api/models.py. Do not edit: run `make crds`.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth crd", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")
    parser.add_argument("--kind", choices=["ModelDeployment", "ApiKey"], default="ModelDeployment")
    args = parser.parse_args(argv)
    if args.kind == "ApiKey":
        from berth.api import apikey_crd

        text = apikey_crd.render()
    else:
        text = render()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0

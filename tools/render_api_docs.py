#!/usr/bin/env python3
"""Generate docs/api.md, the ModelDeployment and ApiKey API reference, from the pydantic models.

    python tools/render_api_docs.py -o docs/api.md    regenerate (`make docs`)
    python tools/render_api_docs.py --check           exit 1 when docs/api.md is stale (`make verify`)

Every field of every model reachable from ModelDeploymentSpec and ModelDeploymentStatus gets a row:
its wire name, type, default, what the API server validates (read from the generated CRD schema, so
the page says what admission really enforces), and its description. Cross-field rules (CEL) and the
checks only the operator makes (pydantic validators) follow each table. The operator's BERTH_*
settings close the page, with the Helm value each one comes from when the chart is in the tree.
The ApiKey (the gateway's team keys) follows the ModelDeployment, the same way.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))  # this tree's berth, wherever the venv's install points

from berth.api import apikey as ak  # noqa: E402
from berth.api import apikey_crd, crd  # noqa: E402
from berth.api import models as m  # noqa: E402
from berth.controller.settings import OperatorSettings  # noqa: E402

API_MD = ROOT / "docs" / "api.md"
CHART_DEPLOYMENT = ROOT / "charts" / "berth" / "templates" / "deployment.yaml"

_VALIDATION_KEYS = (
    ("minimum", "min"),
    ("maximum", "max"),
    ("minLength", "min length"),
    ("maxLength", "max length"),
    ("minItems", "min items"),
    ("maxItems", "max items"),
    ("pattern", "pattern"),
    ("enum", "one of"),
)


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models mentioned anywhere in a type annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        out += _models_in(arg)
    return out


def type_name(annotation: Any) -> str:
    """A short, readable name for a field's type; nested models link to their section."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if {get_origin(o) or o for o in options} == {int, str}:
            return "integer or string"
        return " or ".join(type_name(o) for o in options)
    if origin is Literal:
        return "string (enum)" if all(isinstance(a, str) for a in args) else "enum"
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        if args and args[1] is Any:
            return "object"
        return f"map of {type_name(args[0])} to {type_name(args[1])}" if args else "object"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{_anchor(annotation)})"
    if annotation is Any:
        return "any"
    names = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        datetime: "string (RFC 3339 time)",
    }
    return names.get(annotation, str(annotation))


def _optional(annotation: Any) -> bool:
    return get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in get_args(annotation)


def default_text(field: FieldInfo) -> str:
    """The default as a user would write it in YAML (`—` when there is none)."""
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "`{}` (every field at its default)"
        return f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "—"
    return f"`{json.dumps(field.default)}`"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def validation_text(node: dict[str, Any]) -> str:
    """What the CRD schema enforces on one property (and on its items)."""
    parts: list[str] = []
    for key, label in _VALIDATION_KEYS:
        if key in node:
            value = node[key]
            if key == "enum":
                parts.append(f"{label} {', '.join(f'`{v}`' for v in value)}")
            elif key == "pattern":
                parts.append(f"{label} `{value}`")
            else:
                exclusive = node.get("exclusiveMinimum" if key == "minimum" else "exclusiveMaximum")
                if key in ("minimum", "maximum") and exclusive is True:
                    parts.append(f"{'>' if key == 'minimum' else '<'} {value}")
                else:
                    parts.append(f"{label} {value}")
    items = node.get("items")
    if isinstance(items, dict) and "properties" not in items:
        inner = validation_text(items)
        if inner:
            parts.append(f"each item: {inner}")
    return "; ".join(parts)


def _schema_at(root: dict[str, Any], path: list[str]) -> dict[str, Any]:
    node = root
    for part in path:
        step = node.get("items") if part == "[]" else (node.get("properties") or {}).get(part)
        node = step or {}
    return node


def _validators(model: type[BaseModel]) -> list[str]:
    """Operator-side checks (pydantic validators): the validator's docstring, else its name."""
    out: list[str] = []
    decorators = model.__pydantic_decorators__
    for name, dec in sorted(decorators.field_validators.items()):
        fields = ", ".join(f"`{model.model_fields[f].alias or f}`" for f in dec.info.fields)
        doc = inspect.getdoc(dec.func)
        what = doc.splitlines()[0] if doc else name.strip("_").replace("_", " ")
        out.append(f"{fields}: {what}")
    for name, model_dec in sorted(decorators.model_validators.items()):
        doc = inspect.getdoc(model_dec.func)
        out.append(doc.splitlines()[0] if doc else name.strip("_").replace("_", " "))
    return out


def _section(
    model: type[BaseModel], wire_path: list[str], schema_root: dict[str, Any], lines: list[str]
) -> list[tuple[type[BaseModel], list[str]]]:
    """Append one model's table; return the nested models (with their wire paths) to document next."""
    shown = ".".join(wire_path).replace(".[]", "[]")
    lines += [f"## {model.__name__}", "", f"`{shown}`" if shown else "", ""]
    doc = inspect.getdoc(model)
    if doc:
        lines += [doc, ""]
    lines += ["| Field | Type | Default | Validation | Description |", "|---|---|---|---|---|"]
    nested: list[tuple[type[BaseModel], list[str]]] = []
    for name, field in model.model_fields.items():
        wire = field.alias or name
        annotation = field.annotation
        node = _schema_at(schema_root, [*wire_path, wire])
        type_text = type_name(annotation)
        if _optional(annotation):
            type_text += " (optional)"
        lines.append(
            "| `{}` | {} | {} | {} | {} |".format(
                wire,
                type_text,
                default_text(field),
                _md_escape(validation_text(node)) or "",
                _md_escape(field.description or ""),
            )
        )
        for sub in _models_in(annotation):
            is_list = get_origin(annotation) is list or any(
                get_origin(a) is list for a in get_args(annotation)
            )
            nested.append((sub, [*wire_path, wire, *(["[]"] if is_list else [])]))
    rules = _schema_at(schema_root, wire_path).get("x-kubernetes-validations") or []
    if rules:
        lines += ["", "Rejected by the API server (CEL):", ""]
        lines += [f"- {_md_escape(r['message'])}" for r in rules]
    checks = _validators(model)
    if checks:
        lines += [
            "",
            "Also checked by the operator (an invalid spec sets phase Failed, reason InvalidSpec):",
            "",
        ]
        lines += [f"- {_md_escape(c)}" for c in checks]
    lines.append("")
    return nested


def _chart_values() -> dict[str, str]:
    """BERTH_* env var -> the chart value it comes from, read from the chart's Deployment template."""
    if not CHART_DEPLOYMENT.exists():
        return {}
    out: dict[str, str] = {}
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in CHART_DEPLOYMENT.read_text(encoding="utf-8").splitlines():
        named = re.match(r"\s*- name: (\S+)", line)
        if named:
            current = blocks.setdefault(named.group(1), []) if named.group(1).startswith("BERTH_") else None
        elif current is not None:
            current.append(line)
    for env, body_lines in blocks.items():
        body = "\n".join(body_lines)
        values = re.findall(r"\.Values\.([A-Za-z0-9_.]+)", body)
        if "fieldRef" in body:
            out[env] = "the pod's namespace (downward API)"
        elif env == "BERTH_PEERING":
            out[env] = "`peering.name` when `replicaCount` > 1, else empty"
        elif env in ("BERTH_SERVER_IMAGE", "BERTH_SERVER_CPU_IMAGE"):
            image = re.search(r'"image" (\.Values\.[A-Za-z.]+)', body)
            base = image.group(1).removeprefix(".Values.") if image else "?"
            out[env] = f"`{base}.repository`:`{base}.tag` (tag default: appVersion)"
        elif values:
            out[env] = ", ".join(f"`{v}`" for v in dict.fromkeys(values))
    return out


def _settings_section(lines: list[str]) -> None:
    chart = _chart_values()
    lines += [
        "## Operator settings",
        "",
        "The operator reads one settings object at start (`berth.controller.settings.OperatorSettings`),",
        "from `BERTH_*` environment variables. The Helm chart sets every one of them from its values.",
        "",
        "| Variable | Type | Default | Helm value | Description |",
        "|---|---|---|---|---|",
    ]
    prefix = str(OperatorSettings.model_config.get("env_prefix") or "")
    for name, field in OperatorSettings.model_fields.items():
        env = (prefix + name).upper()
        lines.append(
            f"| `{env}` | {type_name(field.annotation)} | {default_text(field)} | "
            f"{chart.get(env, '')} | {_md_escape(field.description or '')} |"
        )
    lines.append("")


def render() -> str:
    """The whole of docs/api.md."""
    schema = crd.openapi_schema()
    version = crd.build_crd()["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    lines = [
        "<!-- Generated by `python tools/render_api_docs.py` from operator/berth/api/models.py. "
        "Do not edit: run `make docs`. -->",
        "",
        f"# ModelDeployment API reference ({m.API_VERSION})",
        "",
        f"`kind: {m.KIND}`, plural `{m.PLURAL}`, short name "
        + ", ".join(f"`{s}`" for s in m.SHORT_NAMES)
        + ", namespaced. The pydantic models in `operator/berth/api/models.py` are the source of the "
        "CRD (`berth crd`), of this page and of the operator's parsing; defaults apply at admission.",
        "",
        f"- Scale subresource: `spec.replicas` ↔ `{scale['specReplicasPath']}`, "
        f"`status.replicas` ↔ `{scale['statusReplicasPath']}`, selector ↔ `{scale['labelSelectorPath']}` "
        "(so `kubectl scale md/<name> --replicas=N` and HorizontalPodAutoscalers work).",
        "- `kubectl get md` columns: "
        + ", ".join(f"{c['name'].upper()} (`{c['jsonPath']}`)" for c in version["additionalPrinterColumns"])
        + ".",
        f"- Model sources (`model.uri`): {m.URI_HELP.removeprefix('model.uri must be one of ')}.",
        f"- Phases (`status.phase`): {', '.join(m.PHASES)}.",
        "",
        "Contents: "
        + ", ".join(f"[{c.__name__}](#{_anchor(c)})" for c in _order())
        + ", [ApiKey](#apikey-api-reference-berthdevv1alpha1), [Operator settings](#operator-settings).",
        "",
    ]
    queue: list[tuple[type[BaseModel], list[str]]] = [
        (m.ModelDeploymentSpec, ["spec"]),
        (m.ModelDeploymentStatus, ["status"]),
    ]
    seen: set[type[BaseModel]] = set()
    while queue:
        model, path = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        queue += _section(model, path, schema, lines)
    _apikey_sections(lines, seen)
    _settings_section(lines)
    return "\n".join(lines).rstrip("\n") + "\n"


def _apikey_sections(lines: list[str], seen: set[type[BaseModel]]) -> None:
    """The ApiKey resource: its facts, then a table per model (those already shown are not repeated)."""
    version = apikey_crd.build_crd()["spec"]["versions"][0]
    lines += [
        f"# ApiKey API reference ({m.API_VERSION})",
        "",
        f"`kind: {ak.APIKEY_KIND}`, plural `{ak.APIKEY_PLURAL}`, short name "
        + ", ".join(f"`{s}`" for s in ak.APIKEY_SHORT_NAMES)
        + ", namespaced: a team's key for the gateway (docs/gateway.md). The operator generates the key into "
        "the Secret `<name>-apikey` (key `key`), owned by the ApiKey, and publishes only its SHA-256 in "
        "`status.keyHash`; the gateway matches presented keys on that hash and reads no Secrets.",
        "",
        "- `kubectl get apikeys` columns: "
        + ", ".join(f"{c['name'].upper()} (`{c['jsonPath']}`)" for c in version["additionalPrinterColumns"])
        + ".",
        "",
    ]
    schema = apikey_crd.openapi_schema()
    queue: list[tuple[type[BaseModel], list[str]]] = [
        (ak.ApiKeySpec, ["spec"]),
        (ak.ApiKeyStatus, ["status"]),
    ]
    while queue:
        model, path = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        queue += _section(model, path, schema, lines)


def _order() -> list[type[BaseModel]]:
    """Models in the order their sections appear (breadth-first from spec, then status)."""
    queue: list[type[BaseModel]] = [m.ModelDeploymentSpec, m.ModelDeploymentStatus]
    out: list[type[BaseModel]] = []
    while queue:
        model = queue.pop(0)
        if model in out:
            continue
        out.append(model)
        for field in model.model_fields.values():
            queue += _models_in(field.annotation)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"fail when {API_MD} is stale")
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = API_MD.read_text(encoding="utf-8") if API_MD.exists() else ""
        if current != text:
            print("docs/api.md is stale: run make docs", file=sys.stderr)
            return 1
        return 0
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

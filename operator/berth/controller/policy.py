"""What the platform allows a ModelDeployment to ask for, beyond what its schema validates.

The schema (the CRD, from api/models.py) says what is well-formed; the policy says what this
installation permits, from the operator's settings. A violation is reported on the resource
(phase Failed, reason PolicyViolation, the field named) and no child is created or changed.
"""

from __future__ import annotations

import posixpath
from typing import Any

from berth.api.models import ModelDeployment, ModelUri
from berth.controller.settings import OperatorSettings


class PolicyViolation(Exception):
    """A spec field this installation does not allow; ``field`` is its path (``spec.model.trustRemoteCode``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _listed(values: list[str]) -> str:
    return ", ".join(values) if values else "none"


def key_allowed(key: str, allowed: list[str]) -> bool:
    """`key` is in `allowed`: an exact entry, an entry ending in / as a prefix, or *."""
    return any(a == "*" or a == key or (a.endswith("/") and key.startswith(a)) for a in allowed)


def host_path_allowed(path: str, prefixes: list[str]) -> bool:
    """A normalised absolute path (no ., .., // or trailing /) at or under one of `prefixes`."""
    if not path.startswith("/") or path.startswith("//") or posixpath.normpath(path) != path:
        return False
    for prefix in prefixes:
        base = prefix.rstrip("/")
        if base and (path == base or path.startswith(base + "/")):
            return True
    return False


def _check_uri(field: str, uri: str, settings: OperatorSettings) -> None:
    parsed = ModelUri.parse(uri)
    if parsed.scheme not in settings.allowed_model_schemes:
        raise PolicyViolation(
            field,
            f"scheme {parsed.scheme}:// is not allowed on this platform (BERTH_ALLOWED_MODEL_SCHEMES: "
            f"{_listed(settings.allowed_model_schemes)})",
        )
    if parsed.scheme == "hostpath" and not host_path_allowed(
        parsed.location, settings.allowed_host_path_prefixes
    ):
        raise PolicyViolation(
            field,
            f"host path {parsed.location!r} is not under an allowed directory "
            f"(BERTH_ALLOWED_HOST_PATH_PREFIXES: {_listed(settings.allowed_host_path_prefixes)})",
        )


def _check_env(md: ModelDeployment) -> None:
    named = md.spec.pod_template.env_secrets
    for i, var in enumerate(md.spec.pod_template.env):
        source = var.get("valueFrom")
        if source is None:
            continue
        field = f"spec.podTemplate.env[{i}].valueFrom"
        ref: Any = source.get("secretKeyRef") if isinstance(source, dict) else None
        if not isinstance(source, dict) or set(source) != {"secretKeyRef"} or not isinstance(ref, dict):
            raise PolicyViolation(field, "env takes plain values; valueFrom only as a secretKeyRef")
        if ref.get("name") not in named:
            raise PolicyViolation(
                field,
                f"Secret {ref.get('name')!r} is not listed in spec.podTemplate.envSecrets ({_listed(named)})",
            )


def check(md: ModelDeployment, settings: OperatorSettings) -> None:
    """Raise PolicyViolation for the first field the operator's settings do not allow."""
    spec = md.spec
    if spec.model.trust_remote_code and not settings.allow_remote_code:
        raise PolicyViolation(
            "spec.model.trustRemoteCode",
            "running a model repository's own code is not allowed on this platform "
            "(the operator setting BERTH_ALLOW_REMOTE_CODE is off)",
        )
    _check_uri("spec.model.uri", spec.model.uri, settings)
    for i, adapter in enumerate(spec.model.adapters):
        _check_uri(f"spec.model.adapters[{i}].uri", adapter.uri, settings)
    prefixes = settings.image_prefixes()
    if spec.image is not None and not any(spec.image.startswith(p) for p in prefixes):
        raise PolicyViolation(
            "spec.image",
            f"image {spec.image!r} does not start with an allowed prefix "
            f"(BERTH_ALLOWED_IMAGE_PREFIXES: {_listed(prefixes)})",
        )
    template = spec.pod_template
    for i, toleration in enumerate(template.tolerations):
        key = str(toleration.get("key") or "")
        if not (
            key_allowed(key, settings.allowed_toleration_keys)
            if key
            else "*" in settings.allowed_toleration_keys
        ):
            raise PolicyViolation(
                f"spec.podTemplate.tolerations[{i}].key",
                f"toleration of taint key {key or '(any: no key)'!r} is not allowed "
                f"(BERTH_ALLOWED_TOLERATION_KEYS: {_listed(settings.allowed_toleration_keys)})",
            )
    keyed = (
        (
            "nodeSelector",
            template.node_selector,
            "node label",
            settings.allowed_node_selector_keys,
            "NODE_SELECTOR",
        ),
        (
            "annotations",
            template.annotations,
            "pod annotation",
            settings.allowed_annotation_keys,
            "ANNOTATION",
        ),
    )
    for field_name, keys, what, allowed, env in keyed:
        for key in keys:
            if not key_allowed(key, allowed):
                raise PolicyViolation(
                    f"spec.podTemplate.{field_name}[{key}]",
                    f"{what} key {key!r} is not allowed (BERTH_ALLOWED_{env}_KEYS: {_listed(allowed)})",
                )
    _check_env(md)

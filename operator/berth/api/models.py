"""The ModelDeployment API (berth.dev/v1alpha1) as pydantic models.

These models are the single source of truth: the CRD schema (`berth crd`), the generated API
reference (docs/api.md) and the operator's parsing of a resource body all come from them.
Field names are snake_case in Python and camelCase on the wire (Kubernetes convention).

The models live in one module per part of the resource: base.py (group, version, kind, shared
patterns, `ApiModel`), source.py (spec.model), spec.py (the rest of the spec), status.py (the
status). This module gathers them with `ModelDeployment` and is the API's import surface:
`from berth.api.models import ...` names any of them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from berth.api.base import (
    API_VERSION,
    BUILTIN_MODEL,
    BUILTIN_MODELS,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    URI_HELP,
    URI_PATTERNS,
    URI_SCHEMES,
    VERSION,
    ApiModel,
    IntOrPercent,
    Quantity,
)
from berth.api.source import (
    Adapter,
    ModelSpec,
    ModelUri,
    SecretKeyRef,
)
from berth.api.spec import (
    Access,
    Auth,
    Autoscaling,
    EngineSpec,
    InferencePool,
    ModelDeploymentSpec,
    PodTemplate,
    Resources,
    Rollout,
)
from berth.api.status import (
    CONDITION_TYPES,
    PHASES,
    AutoscalerStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    InferencePoolStatus,
    ModelDeploymentStatus,
    Phase,
)

__all__ = [
    "API_VERSION",
    "BUILTIN_MODEL",
    "BUILTIN_MODELS",
    "CONDITION_TYPES",
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "GROUP",
    "KIND",
    "PHASES",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "URI_HELP",
    "URI_PATTERNS",
    "URI_SCHEMES",
    "VERSION",
    "Access",
    "Adapter",
    "ApiModel",
    "Auth",
    "AutoscalerStatus",
    "Autoscaling",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "EngineSpec",
    "InferencePool",
    "InferencePoolStatus",
    "IntOrPercent",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
    "ModelSpec",
    "ModelUri",
    "Phase",
    "PodTemplate",
    "Quantity",
    "Resources",
    "Rollout",
    "SecretKeyRef",
]


class ModelDeployment(ApiModel):
    """A private model instance."""

    api_version: str = Field(API_VERSION, description="berth.dev/v1alpha1")
    kind: str = Field(KIND, description="ModelDeployment")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ModelDeploymentSpec = Field(
        default_factory=ModelDeploymentSpec, description="What the user asks for."
    )
    status: ModelDeploymentStatus = Field(
        default_factory=ModelDeploymentStatus, description="What the operator saw."
    )

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", "default"))

    @property
    def served_name(self) -> str:
        return self.spec.model.served_name or self.name

"""The ModelDeployment status: phases, conditions, the autoscaler's and the InferencePool's reports, and
`ModelDeploymentStatus`, which says which fields the reconcile writes and which the autoscaler does."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar, Literal, get_args

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from berth.api.base import ApiModel

Phase = Literal["Pending", "Deploying", "Running", "Updating", "Degraded", "Failed", "Idle"]


PHASES: tuple[Phase, ...] = get_args(Phase)


ConditionType = Literal["Ready", "Available", "Progressing", "Degraded", "Autoscaling"]


CONDITION_TYPES: tuple[ConditionType, ...] = get_args(ConditionType)


ConditionStatus = Literal["True", "False", "Unknown"]


def _either(names: tuple[str, ...], conjunction: str) -> str:
    """`A, B or C`."""
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


class Condition(ApiModel):
    """A status condition (Kubernetes API conventions)."""

    type: str = Field(description="What the condition is about; one condition of each type.")
    status: ConditionStatus = Field(description=f"{_either(get_args(ConditionStatus), 'or')}.")
    reason: str = Field("", description="One CamelCase word for machines.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The spec generation this condition is about.")


class InferencePoolStatus(ApiModel):
    """The InferencePool's state as the gateways that route to it report it."""

    name: str = Field(description="The InferencePool (same namespace).")
    accepted: ConditionStatus = Field(
        description="True when every Gateway that references the pool accepted it; Unknown with none yet."
    )
    reason: str = Field("", description="One CamelCase word for machines.")
    message: str = Field("", description="What the gateways said, for people.")


class AutoscalerStatus(ApiModel):
    """What the built-in autoscaler saw at its last sample (the reconcile turns it into the Autoscaling
    condition)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    external_autoscaler: str | None = Field(
        None,
        description=(
            "HorizontalPodAutoscaler/<name> whose scaleTargetRef is this ModelDeployment: while it "
            "exists the built-in autoscaler stands aside."
        ),
    )
    read_pods: int = Field(0, description="Ready instances whose /metrics the last sample read.")
    unreadable_pods: list[str] = Field(
        default_factory=list,
        description=(
            "Ready instances whose /metrics the last sample could not read (in time, within the size "
            "cap, with finite values); each counts as loaded at the target."
        ),
    )


class ModelDeploymentStatus(ApiModel):
    """What the operator observed."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    # Who writes what: the autoscaler writes these fields (status.desiredCapacity, status.lastScaleTime),
    # the reconcile every other one. A merge patch from either leaves the other's fields as they are.
    AUTOSCALER_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"desired_capacity", "last_scale_time", "autoscaler"}
    )

    phase: Phase | None = Field(None, description=f"{_either(PHASES, 'or')}.")
    capacity: int | None = Field(None, description="Capacity the operator is working towards.")
    ready_capacity: int | None = Field(None, description="Instances ready to serve.")
    replicas: int | None = Field(
        None, description="Instances that exist (scale subresource statusReplicasPath)."
    )
    selector: str | None = Field(
        None, description="Label selector of the instance pods (for the scale subresource)."
    )
    endpoint: str | None = Field(None, description="In-cluster OpenAI base URL, ending in /v1.")
    served_model_name: str | None = Field(None, description="The `model` value clients send.")
    api_key_secret: str | None = Field(None, description="Secret holding the API keys.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description=(
            f"{_either(CONDITION_TYPES, 'and')} (Autoscaling only while spec.autoscaling.enabled: "
            "the built-in autoscaler's state, from status.autoscaler), one of each type."
        ),
        # a map keyed by type: server-side apply and `kubectl` merge them entry by entry
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, description="The spec generation last reconciled.")
    ready_at: str | None = Field(None, description="When the instance first became Running (RFC 3339).")
    time_to_ready_seconds: float | None = Field(
        None, description="From creation to first Running, in seconds."
    )
    compute_unit_hours: float | None = Field(
        None, description="Compute units used so far (ready instances x hours)."
    )
    metered_at: str | None = Field(None, description="When computeUnitHours was last brought up to date.")
    model_revision: str | None = Field(
        None,
        description=(
            "hf:// models: the commit the instances downloaded (model.revision resolved by the download "
            "init container, read from its termination message)."
        ),
    )
    desired_capacity: int | None = Field(None, description="Capacity the autoscaler last asked for.")
    last_scale_time: str | None = Field(None, description="When the autoscaler last changed capacity.")
    autoscaler: AutoscalerStatus | None = Field(
        None, description="The built-in autoscaler's last sample (spec.autoscaling.enabled only)."
    )
    inference_pool: InferencePoolStatus | None = Field(
        None, description="The InferencePool made for the instances (when the cluster has its CRD)."
    )

    @classmethod
    def reconciled_fields(cls) -> tuple[str, ...]:
        """The fields the reconcile writes (Python names, in schema order)."""
        return tuple(name for name in cls.model_fields if name not in cls.AUTOSCALER_FIELDS)

    @classmethod
    def wire_names(cls, fields: Collection[str]) -> tuple[str, ...]:
        """The camelCase keys of `fields` as stored in the resource (schema order)."""
        return tuple(f.alias or name for name, f in cls.model_fields.items() if name in fields)

    def patch(self, fields: Collection[str]) -> dict[str, Any]:
        """A merge patch setting exactly `fields` (camelCase, JSON values; None removes a key)."""
        return self.model_dump(mode="json", by_alias=True, include=set(fields))

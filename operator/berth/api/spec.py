"""The rest of the ModelDeployment spec: resources, autoscaling, auth, access, engine, pod template
overrides, rollout, InferencePool, and `ModelDeploymentSpec`, which gathers them with spec.model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from berth.api.base import DNS_LABEL, DNS_SUBDOMAIN, ApiModel, IntOrPercent, Quantity
from berth.api.source import ModelSpec


class Resources(ApiModel):
    """Compute per instance (one pod each)."""

    gpus: int = Field(0, description="GPUs per instance; 0 runs on CPU.", ge=0, le=16)
    gpu_resource_name: str = Field(
        "nvidia.com/gpu",
        description="Extended resource name the GPUs are requested under.",
        max_length=253,
        pattern=r"^[a-z0-9.-]+/[a-z0-9._-]+$",
    )
    cpu: Quantity | None = Field(
        None, description="CPU request and limit per instance. Default: the operator's BERTH_DEFAULT_CPU."
    )
    memory: Quantity | None = Field(
        None,
        description="Memory request and limit per instance. Default: the operator's BERTH_DEFAULT_MEMORY.",
    )


class Autoscaling(ApiModel):
    """Capacity that follows load (in-flight requests per instance)."""

    enabled: bool = Field(False, description="Let the operator set spec.capacity from load.")
    min_capacity: int = Field(
        1, description="Lowest capacity the autoscaler sets (0 allowed).", ge=0, le=1000
    )
    max_capacity: int = Field(4, description="Highest capacity the autoscaler sets.", ge=1, le=1000)
    target_in_flight_per_instance: int = Field(
        8, description="In-flight requests (running + waiting) per instance to aim for.", ge=1, le=100000
    )
    scale_down_delay_seconds: int = Field(
        300, description="How long load must stay low before capacity goes down.", ge=0, le=86400
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_capacity > self.max_capacity:
            raise ValueError(
                f"autoscaling.minCapacity ({self.min_capacity}) must not exceed maxCapacity ({self.max_capacity})"
            )
        return self


class Auth(ApiModel):
    """Who may call the instance."""

    mode: Literal["apiKey", "none"] = Field(
        "apiKey", description="apiKey: every call needs `Authorization: Bearer <key>`; none: open."
    )
    api_key_secret_ref: str | None = Field(
        None,
        description=(
            "Secret with the API keys (one key per data entry, entry name = key id). "
            "Default: a generated `<name>-api-keys` Secret."
        ),
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )


class Access(ApiModel):
    """Network allow-lists, enforced by a NetworkPolicy (the hosted products' VPC whitelist)."""

    allowed_namespaces: list[Annotated[str, Field(max_length=63, pattern=DNS_LABEL)]] = Field(
        default_factory=list,
        description="Namespaces whose pods may connect (the instance's own namespace is always allowed).",
        max_length=64,
    )
    allowed_cidrs: list[Annotated[str, Field(max_length=49)]] = Field(
        default_factory=list,
        alias="allowedCIDRs",
        description="IP blocks (CIDR) that may connect.",
        max_length=64,
    )

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        import ipaddress

        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError as e:
                raise ValueError(f"access.allowedCIDRs: {c!r} is not a CIDR ({e})") from None
        return v


class EngineSpec(ApiModel):
    """Inference engine tuning, passed to every instance's server."""

    backend: Literal["auto", "native", "transformers"] = Field(
        "auto",
        description=(
            "Model runner: native (Berth's own Llama-family forward, the fast path), transformers (any "
            "decoder transformers can build, over Berth's paged KV cache) or auto (native where it covers "
            "the model type, transformers for everything else). See docs/models.md."
        ),
    )
    max_num_seqs: int = Field(32, description="Requests decoded together per instance.", ge=1, le=4096)
    max_queue: int = Field(
        256,
        description="Requests waiting per instance before it answers 429 with Retry-After.",
        ge=0,
        le=100000,
    )
    kv_cache_memory_fraction: float = Field(
        0.9, description="Share of free accelerator memory given to the KV cache.", gt=0, le=1
    )
    extra_args: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, description="Extra `berth serve` arguments.", max_length=64
    )


def _free_object(**properties: dict[str, Any]) -> dict[str, Any]:
    """An object schema that names the fields the admission policy reads and keeps any other."""
    return {"type": "object", "properties": properties, "additionalProperties": True}


_STR: dict[str, Any] = {"type": "string"}


_TOLERATION_SCHEMA = _free_object(key=_STR, operator=_STR, value=_STR, effect=_STR)


_ENV_VAR_SCHEMA = _free_object(
    name=_STR,
    value=_STR,
    valueFrom=_free_object(
        secretKeyRef=_free_object(name=_STR, key=_STR),
        configMapKeyRef=_free_object(name=_STR, key=_STR),
        fieldRef=_free_object(fieldPath=_STR),
        resourceFieldRef=_free_object(resource=_STR),
        fileKeyRef=_free_object(path=_STR),
    ),
)


class PodTemplate(ApiModel):
    """Overrides for the instance pods."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Annotated[dict[str, Any], WithJsonSchema(_TOLERATION_SCHEMA)]] = Field(
        default_factory=list, description="Pod tolerations (core/v1 Toleration)."
    )
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity (core/v1 Affinity).")
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.", max_length=253)
    image_pull_secrets: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, description="Names of Secrets used to pull the server image."
    )
    env: list[Annotated[dict[str, Any], WithJsonSchema(_ENV_VAR_SCHEMA)]] = Field(
        default_factory=list,
        description="Extra environment variables of the server container (core/v1 EnvVar).",
    )
    env_secrets: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list,
        description=(
            "Secrets of the namespace that env may read with valueFrom.secretKeyRef; any other valueFrom "
            "is refused by the platform's policy."
        ),
    )
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")


class Rollout(ApiModel):
    """How a changed spec is rolled out to the instances."""

    max_surge: IntOrPercent = Field(
        1, description="Instances created above capacity during a rollout (number or percent)."
    )
    max_unavailable: IntOrPercent = Field(
        0, description="Instances that may be unavailable during a rollout (number or percent)."
    )
    min_available: int = Field(
        1,
        description=(
            "Instances that must serve for the Available condition to be True (capped at capacity, at "
            "least 1): Available stays True through a scale-up or a rollout while this many are ready, "
            "where Ready (all asked-for instances serve) turns False."
        ),
        ge=1,
        le=1000,
    )


class InferencePool(ApiModel):
    """The Gateway API Inference Extension's InferencePool (inference.networking.k8s.io/v1) for the
    instances, so a conformant gateway (Istio, NGINX Gateway Fabric, ...) can route to them."""

    enabled: bool = Field(
        True,
        description="Create an InferencePool selecting the instances when the cluster has its CRD; false opts out.",
    )
    endpoint_picker: str | None = Field(
        None,
        description="Service of the endpoint picker (EPP) the pool names; default: <name>-epp.",
        max_length=63,
        pattern=DNS_LABEL,
    )
    endpoint_picker_port: int = Field(
        9002, description="Port of the endpoint picker's Service.", ge=1, le=65535
    )
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        "FailOpen",
        description=(
            "What a gateway does while the endpoint picker does not answer: FailOpen sends the request "
            "to any ready instance (Berth ships no picker), FailClose refuses it."
        ),
    )


class ModelDeploymentSpec(ApiModel):
    """A private model instance: a model, how many instances, and on what."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="The model to serve.")
    capacity: int = Field(
        1,
        description="Number of instances (pods). `kubectl scale` and HPAs set it through the scale subresource.",
        ge=0,
        le=1000,
    )
    resources: Resources = Field(default_factory=Resources, description="Compute per instance.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Load-based capacity.")
    auth: Auth = Field(default_factory=Auth, description="API-key authentication.")
    access: Access | None = Field(None, description="Network allow-lists; absent means no NetworkPolicy.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Inference engine tuning.")
    compute_units_per_instance: float = Field(
        1.0,
        description="Compute units one instance costs per hour, for metering (status.computeUnitHours).",
        ge=0,
    )
    image: str | None = Field(
        None, description="Server image. Default: the operator's BERTH_SERVER_IMAGE.", max_length=512
    )
    pod_template: PodTemplate = Field(default_factory=PodTemplate, description="Pod overrides.")
    rollout: Rollout = Field(default_factory=Rollout, description="Rollout strategy.")
    inference_pool: InferencePool = Field(
        default_factory=InferencePool,
        description="An InferencePool for the instances (Gateway API Inference Extension), when its CRD exists.",
    )

    @model_validator(mode="after")
    def _capacity_in_bounds(self) -> ModelDeploymentSpec:
        a = self.autoscaling
        if a.enabled and not a.min_capacity <= self.capacity <= a.max_capacity:
            raise ValueError(
                f"capacity {self.capacity} is outside autoscaling bounds "
                f"[{a.min_capacity}, {a.max_capacity}] while autoscaling is enabled"
            )
        return self

"""The ModelDeployment API (berth.dev/v1alpha1) as pydantic models.

These models are the single source of truth: the CRD schema (`berth crd`), the generated API
reference (docs/api.md) and the operator's parsing of a resource body all come from them.
Field names are snake_case in Python and camelCase on the wire (Kubernetes convention).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "berth.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]

BUILTIN_MODEL = "builtin://smollm2-135m-instruct"
BUILTIN_MODELS = ("smollm2-135m-instruct",)

# One regular expression per model source; CEL in the CRD and pydantic here use the same strings.
URI_SCHEMES = ("builtin", "pvc", "hostpath", "hf")
URI_PATTERNS: dict[str, str] = {
    "builtin": r"^builtin://[a-z0-9][a-z0-9.-]*$",
    "pvc": r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?$",
    "hostpath": r"^hostpath:///.+$",
    "hf": r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$",
}
URI_HELP = (
    "model.uri must be one of builtin://smollm2-135m-instruct, pvc://<claim>/<path>, "
    "hostpath:///<dir> or hf://<org>/<name>"
)
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

Quantity = Annotated[
    str,
    Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$", max_length=32),
]
# A Kubernetes IntOrString ("25%" or 1): the CRD generator turns the marker into x-kubernetes-int-or-string.
IntOrPercent = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


class _Base(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


@dataclass(frozen=True)
class ModelUri:
    """A parsed `model.uri`."""

    scheme: str
    # builtin: model name; pvc: claim name; hostpath: directory; hf: "org/name"
    location: str
    # pvc: path inside the claim ("" = the claim's root); hf: revision ("" = main)
    path: str = ""

    @classmethod
    def parse(cls, uri: str) -> ModelUri:
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in URI_PATTERNS or not re.match(URI_PATTERNS[scheme], uri):
            raise ValueError(f"{URI_HELP}; got {uri!r}")
        if scheme == "builtin":
            if rest not in BUILTIN_MODELS:
                raise ValueError(
                    f"unknown built-in model {rest!r}; built-in models: {', '.join(BUILTIN_MODELS)}"
                )
            return cls(scheme, rest)
        if scheme == "pvc":
            claim, _, path = rest.partition("/")
            return cls(scheme, claim, path.strip("/"))
        if scheme == "hostpath":
            return cls(scheme, rest)  # rest starts with "/"
        repo, _, revision = rest.partition("@")
        return cls(scheme, repo, revision)


class SecretKeyRef(_Base):
    """A key in a Secret of the ModelDeployment's namespace."""

    name: str = Field(description="Name of the Secret.", max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field("token", description="Key inside the Secret.", max_length=253)


class Adapter(_Base):
    """A LoRA adapter served on top of the base model."""

    name: str = Field(
        description="Adapter name; clients select it with model `<servedName>:<name>`.",
        max_length=55,  # the pod volume is named adapter-<name> (63 characters at most)
        pattern=DNS_LABEL,
    )
    uri: str = Field(
        description="Where the adapter's files are: pvc://<claim>/<path>, hostpath:///<dir> or hf://<org>/<name>.",
        max_length=1024,
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if ModelUri.parse(v).scheme == "builtin":
            raise ValueError("an adapter cannot be builtin://")
        return v


class ModelSpec(_Base):
    """Which model the instances serve and how it is loaded."""

    uri: str = Field(
        BUILTIN_MODEL,
        description=(
            "Model source: builtin://smollm2-135m-instruct (shipped in the server image), "
            "pvc://<claim>/<path> (a PersistentVolumeClaim, mounted read-only), hostpath:///<dir> "
            "(a directory on the node) or hf://<org>/<name>[@revision] (downloaded into a cache volume "
            "by an init container)."
        ),
        max_length=1024,
    )
    served_name: str | None = Field(
        None,
        description="The `model` value clients send. Default: metadata.name.",
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto is bfloat16 on GPUs and float32 on CPUs."
    )
    max_model_len: int | None = Field(
        None,
        description="Longest prompt plus completion, in tokens. Default: the model's own limit.",
        ge=16,
        le=1048576,
    )
    adapters: list[Adapter] = Field(
        default_factory=list,
        description="LoRA adapters. One adapter is merged into the base; several are served side by side.",
        max_length=16,
    )
    hf_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding a Hugging Face token, for hf:// models that need one."
    )
    revision: str | None = Field(
        None,
        description=(
            "hf:// only: the branch, tag or commit to download (the same as uri's @revision; give one "
            "of the two). Default: main. The download resolves it to a commit first and fetches exactly "
            "that commit; status.modelRevision publishes it."
        ),
        max_length=255,
        pattern=r"^[A-Za-z0-9._/-]+$",
    )
    cache_size: Quantity | None = Field(
        None,
        description=(
            "hf:// only: size of the download volume (an emptyDir with this sizeLimit, and the "
            "ephemeral-storage the download container requests, so the scheduler picks a node with "
            "room). Default: the operator's BERTH_MODEL_CACHE_SIZE."
        ),
    )
    trust_remote_code: bool = Field(
        False,
        description=(
            "Run the model repository's own Python code (transformers' trust_remote_code), for models "
            "whose config asks for it (e.g. ChatGLM3). Accepted only when the operator allows it "
            "(BERTH_ALLOW_REMOTE_CODE); otherwise the ModelDeployment is Failed with reason PolicyViolation."
        ),
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        ModelUri.parse(v)
        return v

    @model_validator(mode="after")
    def _one_revision(self) -> ModelSpec:
        uri = self.parsed_uri
        if self.revision is not None:
            if uri.scheme != "hf":
                raise ValueError("model.revision applies to an hf:// model.uri only")
            if uri.path and uri.path != self.revision:
                raise ValueError(
                    f"model.revision {self.revision!r} contradicts the uri's @{uri.path}: give one of the two"
                )
        return self

    @property
    def hf_revision(self) -> str:
        """The revision an hf:// model is downloaded at: model.revision, else the uri's @revision, else main."""
        return self.revision or self.parsed_uri.path or "main"

    @model_validator(mode="after")
    def _unique_adapters(self) -> ModelSpec:
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def parsed_uri(self) -> ModelUri:
        return ModelUri.parse(self.uri)


class Resources(_Base):
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


class Autoscaling(_Base):
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


class Auth(_Base):
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


class Access(_Base):
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


class EngineSpec(_Base):
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


class PodTemplate(_Base):
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


class Rollout(_Base):
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


class InferencePool(_Base):
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


class ModelDeploymentSpec(_Base):
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


Phase = Literal["Pending", "Deploying", "Running", "Updating", "Degraded", "Failed", "Idle"]
PHASES: tuple[Phase, ...] = get_args(Phase)
ConditionType = Literal["Ready", "Available", "Progressing", "Degraded", "Autoscaling"]
CONDITION_TYPES: tuple[ConditionType, ...] = get_args(ConditionType)
ConditionStatus = Literal["True", "False", "Unknown"]


def _either(names: tuple[str, ...], conjunction: str) -> str:
    """`A, B or C`."""
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


class Condition(_Base):
    """A status condition (Kubernetes API conventions)."""

    type: str = Field(description="What the condition is about; one condition of each type.")
    status: ConditionStatus = Field(description=f"{_either(get_args(ConditionStatus), 'or')}.")
    reason: str = Field("", description="One CamelCase word for machines.")
    message: str = Field("", description="What happened, for people.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The spec generation this condition is about.")


class InferencePoolStatus(_Base):
    """The InferencePool's state as the gateways that route to it report it."""

    name: str = Field(description="The InferencePool (same namespace).")
    accepted: ConditionStatus = Field(
        description="True when every Gateway that references the pool accepted it; Unknown with none yet."
    )
    reason: str = Field("", description="One CamelCase word for machines.")
    message: str = Field("", description="What the gateways said, for people.")


class AutoscalerStatus(_Base):
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


class ModelDeploymentStatus(_Base):
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


class ModelDeployment(_Base):
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

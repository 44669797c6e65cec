"""The operator's settings: one pydantic-settings object per process, env prefix BERTH_."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)


class OperatorSettings(BaseSettings):
    """Everything the operator can be told, from BERTH_* environment variables (Helm values map 1:1)."""

    model_config = SettingsConfigDict(env_prefix="BERTH_", extra="ignore")

    server_image: str = Field(
        "ghcr.io/berth-dev/berth-server:0.1.0", description="Inference server image for GPU instances (CUDA)."
    )
    server_cpu_image: str = Field(
        "ghcr.io/berth-dev/berth-server-cpu:0.1.0",
        description="Inference server image for CPU instances (gpus: 0); carries the built-in model.",
    )
    image_pull_policy: str = Field("IfNotPresent", description="imagePullPolicy of the server containers.")
    default_cpu: str = Field("2", description="CPU per instance when spec.resources.cpu is not set.")
    default_memory: str = Field(
        "8Gi", description="Memory per instance when spec.resources.memory is not set."
    )
    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Namespaces to watch (comma-separated); empty: the whole cluster."
    )
    operator_namespace: str = Field(
        "berth-system", description="Namespace the operator runs in (always allowed through NetworkPolicies)."
    )
    cluster_domain: str = Field("cluster.local", description="Cluster DNS domain used in status.endpoint.")
    metrics_port: int = Field(
        8080, description="Port of the operator's Prometheus /metrics endpoint; 0 disables."
    )
    health_port: int = Field(
        8081, description="Port of the operator's liveness endpoint (/healthz); 0 disables."
    )
    peering: str = Field(
        "",
        description="kopf peering name for running more than one replica; empty: standalone (one replica).",
    )
    peering_priority: int = Field(
        0,
        description=(
            "kopf peering priority of this replica: the highest live one works, the others stand by. "
            "0: a random priority per process, so replicas never tie (a tie pauses all of them)."
        ),
        ge=0,
    )
    leader_election_lease_name: str = Field(
        "berth-operator",
        description=(
            "Lease (coordination.k8s.io, in operator_namespace) that elects the one replica running the "
            "resync and autoscaling loops."
        ),
        min_length=1,
    )
    leader_election_lease_seconds: float = Field(
        15.0,
        description=(
            "Lease duration: a replica that stops renewing loses the loops to another within it "
            "(the holder itself stops after two thirds of it without a renewal)."
        ),
        ge=3,
    )
    resync_seconds: float = Field(
        30.0, description="Interval of the level-triggered resync loop over every ModelDeployment.", gt=0
    )
    degraded_grace_seconds: float = Field(
        120.0,
        description="How long fewer instances than asked may be ready before the phase is Degraded.",
        ge=0,
    )
    crash_loop_restarts: int = Field(
        3, description="Restarts after which a container in CrashLoopBackOff counts as crash-looping.", ge=1
    )
    metering_interval_seconds: float = Field(
        0.0,
        description=(
            "How often status.computeUnitHours is brought up to date while nothing else changes; 0: only "
            "when the ready count changes (no writes while idle; the usage up to now is computeUnitHours + "
            "readyCapacity x computeUnitsPerInstance x hours since meteredAt)."
        ),
        ge=0,
    )
    server_port: int = Field(8000, description="Port the server listens on inside the pod.")
    drain_seconds: int = Field(
        120,
        description="Grace for in-flight requests to finish when a pod stops (terminationGracePeriodSeconds).",
        ge=5,
    )
    startup_seconds: int = Field(
        1800, description="Budget for a model download and load before the startup probe gives up.", ge=60
    )
    model_cache_size: str = Field(
        "50Gi",
        description=(
            "Size of an hf:// model's download volume when spec.model.cacheSize is not set: the emptyDir's "
            "sizeLimit and the ephemeral-storage the download container requests."
        ),
        pattern=r"^[0-9]+(\.[0-9]+)?(k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$",
    )
    autoscale_interval_seconds: float = Field(
        15.0, description="How often the autoscaler samples load.", gt=0
    )
    metrics_scrape_timeout_seconds: float = Field(
        2.0, description="Deadline for the whole read of one instance's /metrics by the autoscaler.", gt=0
    )
    metrics_scrape_concurrency: int = Field(
        16, description="Instances' /metrics read at once by the autoscaler (one pool for all).", ge=1, le=256
    )
    metrics_scrape_max_bytes: int = Field(
        1 << 20,
        description="Largest /metrics body the autoscaler reads; a larger one is unreadable.",
        ge=4096,
    )
    allow_remote_code: bool = Field(
        False,
        description=(
            "Allow ModelDeployments with model.trustRemoteCode: true (their instances run the model "
            "repository's own code). Off: such a ModelDeployment is Failed with reason PolicyViolation."
        ),
    )
    allowed_model_schemes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["builtin", "pvc", "hf"],
        description=(
            "model.uri and adapter schemes ModelDeployments may use (comma-separated); hostpath (a "
            "directory of the node) is off unless listed here."
        ),
    )
    allowed_host_path_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Node directories a hostpath:// model or adapter may lie under (comma-separated, e.g. "
            "/models/); none by default, so hostpath needs both this and allowed_model_schemes."
        ),
    )
    allowed_image_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Prefixes spec.image must start with (comma-separated; end each with / or : ). "
            "Empty: the operator's own server images (BERTH_SERVER_IMAGE, BERTH_SERVER_CPU_IMAGE) only."
        ),
    )
    allowed_toleration_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nvidia.com/gpu"],
        description=(
            "Taint keys podTemplate.tolerations may name (comma-separated); a toleration without a key "
            "(tolerating every taint) only with *."
        ),
    )
    allowed_node_selector_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "kubernetes.io/arch",
            "kubernetes.io/os",
            "node.kubernetes.io/instance-type",
            "topology.kubernetes.io/region",
            "topology.kubernetes.io/zone",
            "nvidia.com/gpu.product",
            "nvidia.com/gpu.memory",
        ],
        description="Node label keys podTemplate.nodeSelector may name (comma-separated; * allows any).",
    )
    allowed_annotation_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["prometheus.io/"],
        description=(
            "Pod annotation keys podTemplate.annotations may set (comma-separated); an entry ending in "
            "/ allows every key of that prefix, * allows any."
        ),
    )
    workers: int = Field(
        4,
        description=(
            "Reconcile workers: ModelDeployments reconciled at once (one key is never processed by two "
            "workers at once; events of one ModelDeployment are coalesced while it waits)."
        ),
        ge=1,
        le=64,
    )
    api_qps: float = Field(
        100.0,
        description="The operator's own client-side limit on Kubernetes API requests per second (0: none).",
        ge=0,
    )
    api_burst: int = Field(
        200, description="Requests the operator may send at once above api_qps (token bucket size).", ge=1
    )
    backoff_base_seconds: float = Field(
        1.0, description="First retry delay of a ModelDeployment whose reconcile failed (doubles).", gt=0
    )
    backoff_max_seconds: float = Field(
        300.0, description="Longest retry delay of a failing ModelDeployment (before jitter).", gt=0
    )
    watch_timeout_seconds: int = Field(
        300,
        description="How long one WATCH of the caches lasts before it is resumed (spread by 10%).",
        ge=30,
    )
    event_repeat_seconds: float = Field(
        600.0,
        description="An Event identical to one recorded for the same ModelDeployment within this long is not sent again.",
        ge=0,
    )
    log_level: str = Field("INFO", description="Operator log level.")
    gateway_master_key_file: str = Field(
        "/etc/berth/gateway/master",
        description=(
            "The gateway master key (the chart's <release>-gateway-master Secret, mounted): each "
            "instance's gateway credential is derived from it into the <name>-gateway-key Secret. "
            "Read in every reconcile: after a rotation the Secrets are rewritten with the new credential. "
            "A missing file: no gateway credentials (the gateway is not installed)."
        ),
    )
    gateway_namespace: str = Field(
        "",
        description=(
            "Namespace of the gateway pods (empty: operator_namespace): NetworkPolicies admit them, "
            "the autoscaler reads the requests they hold."
        ),
    )
    gateway_metrics_port: int = Field(
        8080,
        description=(
            "Port of the gateway pods' /metrics: the autoscaler adds the requests they hold for a "
            "ModelDeployment (waiting for it to scale up) to its load. 0: not read."
        ),
        ge=0,
    )

    @field_validator(
        "namespaces",
        "allowed_model_schemes",
        "allowed_host_path_prefixes",
        "allowed_image_prefixes",
        "allowed_toleration_keys",
        "allowed_node_selector_keys",
        "allowed_annotation_keys",
        mode="before",
    )
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [n.strip() for n in v.split(",") if n.strip()]
        return v

    def gateway_ns(self) -> str:
        return self.gateway_namespace or self.operator_namespace

    def gateway_master_key(self) -> bytes | None:
        """The gateway master key (stripped), or None when the file is absent or empty."""
        if not self.gateway_master_key_file:
            return None
        try:
            key = Path(self.gateway_master_key_file).read_bytes().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the gateway master key %s: %s", self.gateway_master_key_file, exc)
            return None
        return key or None

    def image_prefixes(self) -> list[str]:
        """What spec.image may start with: the configured prefixes, else the server images themselves."""
        return self.allowed_image_prefixes or [self.server_image, self.server_cpu_image]


@lru_cache(maxsize=1)
def get_settings() -> OperatorSettings:
    """The process's one settings object, validated on first use (at start-up)."""
    return OperatorSettings()

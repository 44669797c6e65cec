"""Prometheus metrics of the inference server; every name starts with ``berth_`` except the few vLLM
names (``vllm:*``) that the Gateway API Inference Extension's endpoint picker reads.

Request-level metrics are updated by the serving layer; engine gauges (running, waiting, KV cache
usage) and counters (steps, prefill/decode tokens) are read from ``Engine.stats()`` at scrape
time by a custom collector, so they are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from berth.server.engine.types import EngineStats, ModelInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _StatsSource(Protocol):
    def stats(self) -> EngineStats: ...


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        yield GaugeMetricFamily(
            "berth_running_requests", "Requests in the engine's running batch", stats.running
        )
        yield GaugeMetricFamily("berth_waiting_requests", "Requests waiting for a slot", stats.waiting)
        yield GaugeMetricFamily(
            "berth_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)", stats.kv_cache_usage
        )
        yield GaugeMetricFamily("berth_kv_cache_blocks_total", "KV cache blocks", stats.num_blocks_total)
        yield CounterMetricFamily("berth_engine_steps", "Engine steps (prefill/decode) executed", stats.steps)
        yield CounterMetricFamily(
            "berth_engine_prefill_tokens", "Prompt tokens run through prefill", stats.num_prefill_tokens
        )
        yield CounterMetricFamily(
            "berth_engine_decode_tokens", "Tokens produced by decode", stats.num_decode_tokens
        )
        yield CounterMetricFamily(
            "berth_engine_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache",
            stats.num_cached_prompt_tokens,
        )
        yield CounterMetricFamily("berth_engine_preemptions", "Requests preempted", stats.num_preemptions)
        yield from vllm_compat(stats)


def vllm_compat(stats: EngineStats) -> Iterator[Metric]:
    """The names the Gateway API Inference Extension's endpoint picker reads (vLLM's), so conformant
    gateways route to Berth instances unconfigured. The only metrics not prefixed ``berth_``."""
    yield GaugeMetricFamily(
        "vllm:num_requests_running", "Requests in the running batch (vLLM name)", stats.running
    )
    yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting (vLLM name)", stats.waiting)
    yield GaugeMetricFamily(
        "vllm:kv_cache_usage_perc", "KV cache usage, 0..1 (vLLM name)", stats.kv_cache_usage
    )
    info = GaugeMetricFamily(
        "vllm:cache_config_info", "KV cache configuration (vLLM name)", labels=["num_gpu_blocks"]
    )
    info.add_metric([str(stats.num_blocks_total)], 1)
    yield info
    # vLLM's LoRA info: the value is a timestamp, the adapters (comma-separated) are labels; the
    # endpoint picker prefers a pod where the request's adapter is active. Berth keeps every
    # side-by-side adapter loaded, so max_lora is their number.
    lora = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "Running and waiting LoRA adapters (vLLM name)",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    lora.add_metric(
        [",".join(stats.running_adapters), ",".join(stats.waiting_adapters), str(stats.max_lora)],
        time.time(),
    )
    yield lora


class ServerMetrics:
    """All server metrics in one registry (a fresh one per instance, so tests can make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "berth_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "berth_prompt_tokens", "Prompt tokens processed, by API key id", ["key_id", "model"], registry=r
        )
        self.generation_tokens = Counter(
            "berth_generation_tokens", "Tokens generated, by API key id", ["key_id", "model"], registry=r
        )
        self.time_to_first_token = Histogram(
            "berth_time_to_first_token_seconds",
            "Time from request arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "berth_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "berth_e2e_request_latency_seconds",
            "Time from request arrival to its last byte, generation requests only",
            ["route"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "berth_http_requests_in_flight", "Generation requests being served over HTTP", registry=r
        )
        self.ready = Gauge(
            "berth_ready", "1 when the model is loaded, warmed up and not draining", registry=r
        )
        self.draining = Gauge("berth_draining", "1 after SIGTERM while in-flight requests finish", registry=r)
        self.model_info = Gauge(
            "berth_model_info",
            "1 for the served model, labelled with its backend (native | transformers), dtype and device",
            ["model", "backend", "dtype", "device"],
            registry=r,
        )
        self.image_requests = Counter(
            "berth_image_requests", "Chat requests holding images, by model", ["model"], registry=r
        )
        self.images = Counter("berth_images", "Images decoded and preprocessed", ["model"], registry=r)
        self.image_tokens = Counter(
            "berth_image_prompt_tokens", "Prompt tokens standing for images", ["model"], registry=r
        )
        self.image_cached_prompt_tokens = Counter(
            "berth_image_cached_prompt_tokens",
            "Prompt tokens of requests with images served from the prefix cache (same image and prefix)",
            ["model"],
            registry=r,
        )
        self.image_rejected = Counter(
            "berth_image_rejected",
            "Image parts answered with 400 (undecodable, too large, not allowed)",
            registry=r,
        )
        self.image_preprocess_seconds = Histogram(
            "berth_image_preprocess_seconds",
            "Time to decode and preprocess the images of one request",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self._stats_source: _StatsSource | None = None
        self.registry.register(_EngineCollector(self._engine_stats))

    def bind_engine(self, engine: _StatsSource, info: ModelInfo | None = None) -> None:
        self._stats_source = engine
        if info is not None:
            self.model_info.labels(info.served_name, info.backend, info.dtype, info.device).set(1)

    def _engine_stats(self) -> EngineStats | None:
        return self._stats_source.stats() if self._stats_source is not None else None

    def render(self) -> bytes:
        return generate_latest(self.registry)

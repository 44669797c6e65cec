"""The vLLM metric names the Gateway API Inference Extension's endpoint picker reads."""

from __future__ import annotations

from berth.server.engine.types import EngineStats
from berth.server.metrics import ServerMetrics
from berth.server.testing import parse_metrics


class _Engine:
    def stats(self) -> EngineStats:
        return EngineStats(
            running=3,
            waiting=2,
            kv_cache_usage=0.25,
            steps=1,
            num_prefill_tokens=0,
            num_decode_tokens=0,
            num_blocks_total=512,
            running_adapters=("sql", "summarize"),
            waiting_adapters=("chat",),
            max_lora=3,
        )


def test_endpoint_picker_metrics_follow_the_engine() -> None:
    metrics = ServerMetrics()
    metrics.bind_engine(_Engine())
    got = parse_metrics(metrics.render().decode())
    assert got["vllm:num_requests_running"] == 3
    assert got["vllm:num_requests_waiting"] == 2
    assert got["vllm:kv_cache_usage_perc"] == 0.25
    assert got['vllm:cache_config_info{num_gpu_blocks="512"}'] == 1
    lora = 'vllm:lora_requests_info{max_lora="3",running_lora_adapters="sql,summarize",waiting_lora_adapters="chat"}'
    assert got[lora] > 1.7e9  # a timestamp, as vLLM sets it
    assert got["berth_running_requests"] == 3  # the berth_ names stay

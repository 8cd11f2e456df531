"""GET /metrics: Prometheus text format, one registry per app (several apps can share a process).

Per-request counters and latency histograms are fed by streaming.Generation as outputs arrive;
the engine's gauges are read at scrape time. Like /health, /metrics needs no API key: it is for
probes and scrapers, and shows no request content."""

from __future__ import annotations

from typing import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..engine.request import FinishReason

router = APIRouter()

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REJECTIONS = ("server_busy", "shutting_down", "request_too_large", "request_timeout")


class Metrics:
    def __init__(self, state) -> None:
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("chatserve_prompt_tokens", "Prompt tokens of requests admitted", registry=r)
        self.cached_prompt_tokens = Counter("chatserve_cached_prompt_tokens",
                                            "Prompt tokens served from the prefix cache", registry=r)
        self.output_tokens = Counter("chatserve_output_tokens", "Tokens generated and streamed", registry=r)
        self.finished = Counter("chatserve_requests_finished", "Requests ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("chatserve_requests_rejected", "Requests refused before generating, by error code",
                                ["code"], registry=r)
        for reason in FinishReason:  # every series from the start, so rates work from the first scrape
            self.finished.labels(reason.value)
        for code in REJECTIONS:
            self.rejected.labels(code)
        self.time_to_first_token = Histogram("chatserve_time_to_first_token_seconds",
                                             "From the server handing a request to the engine to its first token",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("chatserve_inter_token_latency_seconds",
                                             "Between consecutive tokens of a request", buckets=ITL_BUCKETS,
                                             registry=r)
        r.register(EngineCollector(state))


class EngineCollector:
    """The engine's own numbers, read at scrape time from the event loop. The engine thread owns
    them, but these are ints and len()s, safe to read; all zero while the model loads."""

    def __init__(self, state) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        async_engine = self.state.engine
        stats = async_engine.engine.stats() if async_engine is not None else None

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"chatserve_{name}", doc, value=value)

        yield gauge("requests_in_flight", "Engine requests the server holds, one per choice (compared with --max-queue)",
                    self.state.in_flight)
        yield gauge("requests_running", "Requests in the engine's running batch", stats.num_running if stats else 0)
        yield gauge("requests_waiting", "Requests waiting for the engine to admit them",
                    stats.num_waiting if stats else 0)
        yield gauge("kv_cache_blocks_used", "KV cache blocks in use",
                    stats.num_blocks - stats.num_free_blocks if stats else 0)
        yield gauge("kv_cache_blocks_total", "KV cache blocks in the pool", stats.num_blocks if stats else 0)
        queried = stats.prefix_cache_queried_tokens if stats else 0
        yield gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up",
                    stats.prefix_cache_hit_tokens / queried if queried else 0.0)
        yield CounterMetricFamily("chatserve_preemptions", "Requests preempted (KV cache full) to recompute later",
                                  value=stats.num_preemptions if stats else 0)
        yield CounterMetricFamily("chatserve_tokens_generated_after_disconnect",
                                  "Tokens the engine generated for a request after its abort was queued "
                                  "(client gone); should stay 0",
                                  value=async_engine.num_tokens_after_abort if async_engine is not None else 0)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""Prometheus metrics: request outcomes and latencies from the gateway, engine gauges read at scrape time."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class _EngineCollector:
    """Reads the engine's latest stats snapshot (and the gateway's counters) on each scrape, so the step loop
    never touches Prometheus."""

    def __init__(self, engine: AsyncEngine, gateway: Callable[[], tuple[int, int]]):
        self.engine = engine
        self.gateway = gateway

    def collect(self):
        in_flight, sockets = self.gateway()
        yield GaugeMetricFamily("sluice_requests_in_flight", "Requests admitted by the gateway and not yet answered",
                                value=in_flight)
        yield GaugeMetricFamily("sluice_websockets_open", "WebSocket sessions open", value=sockets)
        s = self.engine.stats()
        for name, doc, value in [
            ("sluice_requests_running", "Requests being decoded", s.num_running),
            ("sluice_requests_waiting", "Requests queued for admission", s.num_waiting),
            ("sluice_kv_blocks_used", "KV cache blocks in use", s.kv_blocks_used),
            ("sluice_kv_blocks_free", "KV cache blocks free (cached ones included)", s.kv_blocks_free),
            ("sluice_prefix_cache_hit_rate", "Share of prompt tokens served by the prefix cache",
             s.prefix_cache_hit_rate),
            ("sluice_tokens_last_step", "Tokens the last engine step computed", s.tokens_last_step),
        ]:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("sluice_preemptions", "Requests preempted (recomputed later)",
                                  value=s.num_preempted_total)
        yield from _speculative(s)


def _speculative(s):
    yield CounterMetricFamily("sluice_spec_draft_tokens", "Draft tokens verified", value=s.spec_draft_tokens)
    yield CounterMetricFamily("sluice_spec_accepted_tokens", "Draft tokens accepted", value=s.spec_accepted_tokens)
    yield GaugeMetricFamily("sluice_spec_mean_accepted_length",
                            "Tokens emitted per verifying request-step (accepted drafts + 1)",
                            value=s.spec_mean_accepted_length)
    yield GaugeMetricFamily("sluice_spec_draft_time_share", "Share of step time spent proposing drafts",
                            value=s.spec_draft_time_share)
    by_pos = GaugeMetricFamily("sluice_spec_acceptance_rate_by_position",
                               "Share of verifying request-steps whose draft at this position was accepted",
                               labels=["position"])
    for i, rate in enumerate(s.spec_acceptance_by_position):
        by_pos.add_metric([str(i)], rate)
    yield by_pos


class Metrics:
    def __init__(self, engine: AsyncEngine, gateway: Callable[[], tuple[int, int]]):
        """`gateway` gives the gateway's in-flight requests and open WebSocket sessions at scrape time."""
        self.registry = CollectorRegistry()
        self.requests = Counter("sluice_requests", "Finished generation requests by outcome", ["outcome"],
                                registry=self.registry)
        self.ttft = Histogram("sluice_time_to_first_token_seconds", "Time to the first output token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("sluice_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("sluice_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine, gateway))

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


@dataclass
class RequestTimer:
    """Follows one request's outputs; `done` records its outcome and latencies once."""

    metrics: Metrics
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    tokens: int = 0
    outcome: str = "cancelled"  # until a finished output says otherwise: the client went away

    def observe(self, out: RequestOutput) -> None:
        new = sum(len(c.delta_token_ids) for c in out.outputs)
        if new and self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.start)
        self.tokens += new
        if out.finished:
            self.outcome = "error" if out.error else (out.outputs[0].finish_reason or "stop")

    def done(self) -> None:
        end = time.perf_counter()
        self.metrics.requests.labels(self.outcome).inc()
        self.metrics.e2e.observe(end - self.start)
        if self.first is not None and self.tokens > 1:
            self.metrics.tpot.observe((end - self.first) / (self.tokens - 1))

"""Prometheus metrics for ``GET /metrics``, through prometheus_client, one registry per app.

    minigpt2_requests_total{status}            /v1 requests answered, by HTTP status
    minigpt2_prompt_tokens_total               prompt tokens of accepted requests
    minigpt2_completion_tokens_total           tokens generated
    minigpt2_queue_depth                       sequences waiting for a KV slot
    minigpt2_running_sequences                 sequences decoded together (the running batch)
    minigpt2_engine_steps_total                engine iterations that ran the model (a counter)
    minigpt2_time_to_first_token_seconds       request arrival -> its first token, histogram
    minigpt2_inter_token_latency_seconds       between two tokens of one choice, histogram

Latencies are measured where the client meets them: in the app, as outputs arrive from the
engine. The two gauges read the engine when Prometheus scrapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .engine import Engine

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("minigpt2_requests", "/v1 requests answered, by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("minigpt2_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("minigpt2_completion_tokens", "Tokens generated", registry=r)
        Gauge("minigpt2_queue_depth", "Sequences waiting for a KV slot", registry=r).set_function(
            lambda: engine.num_waiting
        )
        Gauge("minigpt2_running_sequences", "Sequences decoded together (running batch size)", registry=r).set_function(
            lambda: engine.num_running
        )
        r.register(_EngineSteps(engine))
        self.ttft = Histogram(
            "minigpt2_time_to_first_token_seconds", "Request arrival to its first generated token",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "minigpt2_inter_token_latency_seconds", "Time between two tokens of one choice",
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineSteps(Collector):
    """The engine's step count as a counter (it only goes up; a Gauge would let rate() lie),
    read when Prometheus scrapes: prometheus_client's Counter has no set_function."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus_client's Collector interface
        yield CounterMetricFamily("minigpt2_engine_steps", "Engine iterations that ran the model", value=self.engine.steps)

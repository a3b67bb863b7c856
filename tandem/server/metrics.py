"""Prometheus metrics of the server (`GET /metrics`), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tandem_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens", "Prompt tokens of served requests", registry=self.registry
        )
        self.generated_tokens = Counter("tandem_generated_tokens", "Tokens generated", registry=self.registry)
        self.time_to_first_token = Histogram(
            "tandem_time_to_first_token_seconds",
            "From a request's submission to its first text",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.decode_tok_s = Gauge(
            "tandem_decode_tokens_per_second", "Decode speed of the last request", registry=self.registry
        )
        self.prefill_tok_s = Gauge(
            "tandem_prefill_tokens_per_second", "Prefill speed of the last request", registry=self.registry
        )
        self.queue_depth = Gauge(
            "tandem_queue_depth", "Requests waiting for the model", registry=self.registry
        )

    def record_generation(self, result) -> None:
        self.prompt_tokens.inc(result.n_prompt)
        self.generated_tokens.inc(result.n_generated)
        if result.decode_tok_s > 0:
            self.decode_tok_s.set(result.decode_tok_s)
        if result.prefill_tok_s > 0:
            self.prefill_tok_s.set(result.prefill_tok_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

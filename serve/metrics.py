"""Prometheus instruments of one app, in their own registry (several apps per process in tests)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engines.api import Finished


class Metrics:
    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("higgs_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("higgs_errors_total", "Error responses by OpenAI error code", ["code"], registry=r)
        self.queue_depth = Gauge("higgs_queue_depth", "Requests waiting for a decode slot", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.in_flight = Gauge("higgs_generations_in_flight", "Submitted generations not finished yet",
                               registry=r)
        self.prompt_tokens = Counter("higgs_prompt_tokens_total", "Prompt tokens of finished generations",
                                     registry=r)
        self.steps = Counter("higgs_generated_steps_total", "Decode steps (rate() gives steps/s)", registry=r)
        self.audio_seconds = Counter("higgs_generated_audio_seconds_total", "Seconds of audio generated",
                                     ["endpoint"], registry=r)
        self.ttfa = Histogram("higgs_time_to_first_audio_seconds", "Submit to first audio chunk",
                              ["endpoint"], registry=r,
                              buckets=(0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30))
        self.finished = Counter("higgs_generations_finished_total", "Generations by finish reason",
                                ["reason"], registry=r)
        self.cancelled = Counter("higgs_generations_cancelled_total",
                                 "Generations the server cancelled, by cause (disconnect, shutdown)",
                                 ["cause"], registry=r)

    def count_finished(self, finished: Finished) -> None:
        """One engine generation ended. Called by the engine's finish listener (on its thread) rather
        than by the request handler, so that generations whose client left (cancelled) are counted
        with their steps too."""
        self.finished.labels(finished.finish_reason).inc()
        self.prompt_tokens.inc(finished.prompt_tokens)
        self.steps.inc(finished.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

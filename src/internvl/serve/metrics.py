"""Prometheus metrics of one server (SERVING.md §10), in a registry of its own so several apps can live in one
process (tests). Gauges that mirror engine state are read at scrape time, so they can never drift from it.

Names (prefix `internvl_`): gauges `requests_running`, `requests_waiting`, `kv_cache_usage_ratio`,
`requests_in_flight`; counters `prompt_tokens_total`, `generation_tokens_total`, `image_tiles_total`,
`requests_total{status}`, `aborts_total{reason}`, `media_fetch_failures_total{reason}`, `preemptions_total`,
`errors_total{code}`; histograms `time_to_first_token_seconds`, `inter_token_latency_seconds`,
`request_latency_seconds`, `queue_wait_seconds` (admission to the first engine event: queueing plus prefill).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector:
    """Scrape-time view of the engine: running / waiting requests, KV usage, preemptions."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        backend = self.state.backend
        running = GaugeMetricFamily("internvl_requests_running", "Sequences running in the engine.")
        waiting = GaugeMetricFamily("internvl_requests_waiting", "Requests waiting for admission in the engine.")
        kv = GaugeMetricFamily("internvl_kv_cache_usage_ratio", "Fraction of KV blocks referenced by sequences.")
        pre = CounterMetricFamily("internvl_preemptions", "Sequences preempted (recomputed later).")
        inflight = GaugeMetricFamily("internvl_requests_in_flight", "HTTP requests admitted and not yet answered.")
        if backend is not None:
            eng = backend.engine
            running.add_metric([], len(eng.scheduler.running))
            waiting.add_metric([], eng.scheduler.num_waiting_requests)
            kv.add_metric([], eng.pool.allocator.num_used / max(1, eng.pool.num_blocks))
            pre.add_metric([], eng.scheduler.num_preemptions)
        else:
            for g in (running, waiting, kv, pre):
                g.add_metric([], 0)
        inflight.add_metric([], len(self.state.inflight))
        yield from (running, waiting, kv, pre, inflight)


class ServerMetrics:
    def __init__(self, state):
        r = self.registry = CollectorRegistry(auto_describe=True)
        r.register(_EngineCollector(state))
        self.prompt_tokens = Counter("internvl_prompt_tokens", "Prompt tokens admitted (image tokens included).",
                                     registry=r)
        self.generation_tokens = Counter("internvl_generation_tokens", "Tokens generated.", registry=r)
        self.image_tiles = Counter("internvl_image_tiles", "Image tiles sent to the vision encoder.", registry=r)
        self.requests = Counter("internvl_requests", "Finished HTTP requests by status code.", ["status"], registry=r)
        self.aborts = Counter("internvl_aborts", "Engine requests aborted, by reason.", ["reason"], registry=r)
        self.media_failures = Counter("internvl_media_fetch_failures", "Media that could not be loaded, by reason.",
                                      ["reason"], registry=r)
        self.errors = Counter("internvl_errors", "Error responses and in-stream errors by code.", ["code"], registry=r)
        self.ttft = Histogram("internvl_time_to_first_token_seconds", "Arrival to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("internvl_inter_token_latency_seconds", "Time between generated tokens of a request.",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("internvl_request_latency_seconds", "Arrival to the last byte.",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("internvl_queue_wait_seconds", "Admission to the first engine event.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        for reason in ("client_disconnect", "shutdown", "timeout"):
            self.aborts.labels(reason)  # present from the start, at 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

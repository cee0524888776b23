"""Prometheus metrics of the frontends, in vLLM's names under the ``splitserve:`` prefix.

Owns one ``CollectorRegistry`` per server (so several servers can live in one process, as in
tests): request-level histograms and counters that the frontends record as deltas stream out
(``RequestRecorder``), and per-worker gauges / counters read from the backend's ``loads()``
snapshot at scrape time. Must not run requests or talk to workers itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from splitserve.cluster.frontends.backend import WorkerLoad, stage_seconds
from splitserve.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_P = "splitserve:"
_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _LoadCollector(Collector):
    """Per-worker gauges and counters from the latest ``loads()`` snapshot."""

    def __init__(self) -> None:
        self.loads: Sequence[WorkerLoad] = ()
        self.policy = "none"
        self.counters: dict[str, int] = {}

    def collect(self) -> Iterable[Metric]:
        labels = ["role", "worker"]
        specs = [
            (GaugeMetricFamily, "num_requests_running", "Requests running.", "num_running"),
            (GaugeMetricFamily, "num_requests_waiting", "Requests waiting.", "num_waiting"),
            (GaugeMetricFamily, "kv_cache_usage_perc", "KV cache usage (1 = full).", "kv_usage"),
            (GaugeMetricFamily, "num_free_kv_blocks", "Free KV blocks.", "num_free_blocks"),
            (
                CounterMetricFamily,
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                "prefix_cache_queries",
            ),
            (
                CounterMetricFamily,
                "prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                "prefix_cache_hits",
            ),
            (CounterMetricFamily, "num_preemptions", "Preemptions.", "num_preemptions"),
            (CounterMetricFamily, "kv_transfer_bytes", "KV bytes pulled and verified.",
             "kv_transfer_bytes"),
            (CounterMetricFamily, "kv_transfer_failures",
             "KV pulls that failed (the request was recomputed).", "kv_transfer_failures"),
            (CounterMetricFamily, "encoder_cache_hits",
             "Images served from the embedding cache.", "encoder_cache_hits"),
            (CounterMetricFamily, "encoder_cache_misses",
             "Images run through the vision tower.", "encoder_cache_misses"),
            (CounterMetricFamily, "spec_decode_num_drafts",
             "Speculative decoding: verify chunks run.", "spec_decode_num_drafts"),
            (CounterMetricFamily, "spec_decode_num_draft_tokens",
             "Speculative decoding: draft tokens proposed.", "spec_decode_num_draft_tokens"),
            (CounterMetricFamily, "spec_decode_num_accepted_tokens",
             "Speculative decoding: draft tokens accepted.", "spec_decode_num_accepted_tokens"),
        ]
        for family, name, doc, attr in specs:
            metric = family(_P + name, doc, labels=labels)
            for load in self.loads:
                metric.add_metric([load.role, load.worker_id], float(getattr(load, attr)))
            yield metric
        rate = GaugeMetricFamily(
            _P + "prefix_cache_hit_rate", "Prefix-cache hits / queries since start.", labels=labels
        )
        for load in self.loads:
            hit_rate = load.prefix_cache_hits / max(load.prefix_cache_queries, 1)
            rate.add_metric([load.role, load.worker_id], hit_rate)
        yield rate
        yield from _spec_decode_gauges(self.loads, labels)
        seconds = SummaryMetricFamily(
            _P + "kv_transfer_seconds", "KV pulls: seconds from start to verified.", labels=labels
        )
        for load in self.loads:
            seconds.add_metric([load.role, load.worker_id], load.kv_transfers,
                               load.kv_transfer_seconds)
        yield seconds
        decisions = CounterMetricFamily(
            _P + "router_decisions", "Placements by outcome (prefix_hit, prefix_miss, "
            "local_prefill, load_fallback, migrated, no_instance).", labels=["policy", "outcome"],
        )
        for key, n in sorted(self.counters.items()):
            if key.startswith("route:"):
                decisions.add_metric([self.policy, key[len("route:"):]], float(n))
        yield decisions
        yield from self._cluster_counters()

    def _cluster_counters(self) -> Iterable[Metric]:
        """The cluster's health counters (absent ones read as 0)."""
        resyncs = CounterMetricFamily(
            _P + "kv_event_resyncs", "Prefix-cache resyncs from a worker's snapshot after a gap "
            "in its KV events (overflow of its event log, or a restart).", labels=["reason"],
        )
        for reason in ("overflow", "restart"):
            resyncs.add_metric([reason], float(self.counters.get(f"kv_resync:{reason}", 0)))
        yield resyncs
        for key, name, doc in (
            ("health_errors", "health_check_errors",
             "Health checks of a worker that failed unexpectedly (logged; the loop goes on)."),
            ("workers_replaced", "workers_replaced", "Dead workers replaced by a new one."),
            ("workers_unhealthy", "workers_unhealthy",
             "Workers whose engine reported itself unhealthy (then replaced)."),
        ):
            metric = CounterMetricFamily(_P + name, doc)
            metric.add_metric([], float(self.counters.get(key, 0)))
            yield metric
        planner = CounterMetricFamily(
            _P + "planner_decisions", "SLO planner decisions applied, by action (role flips "
            "and scale steps; planner.enabled).", labels=["action"],
        )
        for action in ("flip_to_prefill", "flip_to_decode", "scale_up", "scale_down"):
            planner.add_metric([action], float(self.counters.get(f"planner:{action}", 0)))
        yield planner
        failed = CounterMetricFamily(
            _P + "planner_failures", "Planner rounds or actions that failed (logged, retried)."
        )
        failed.add_metric([], float(self.counters.get("planner_failed", 0)))
        yield failed


def _spec_decode_gauges(loads: Sequence[WorkerLoad], labels: list[str]) -> Iterable[Metric]:
    """Acceptance rate and mean accepted length since start, per worker that speculated."""
    rate = GaugeMetricFamily(
        _P + "spec_decode_acceptance_rate", "Draft tokens accepted / proposed since start.",
        labels=labels,
    )
    length = GaugeMetricFamily(
        _P + "spec_decode_mean_accepted_length",
        "Tokens emitted per verify chunk since start (accepted drafts + 1).", labels=labels,
    )
    for load in loads:
        if load.spec_decode_num_drafts:
            key = [load.role, load.worker_id]
            rate.add_metric(key, load.spec_decode_num_accepted_tokens
                            / max(load.spec_decode_num_draft_tokens, 1))
            length.add_metric(key, 1 + load.spec_decode_num_accepted_tokens
                              / load.spec_decode_num_drafts)
    yield rate
    yield length


class ServerMetrics:
    """All metrics of one server; ``render(loads)`` gives the ``/metrics`` body."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._loads = _LoadCollector()
        self.registry.register(self._loads)
        lbl = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            _P + "time_to_first_token_seconds",
            "Time to first token.",
            lbl,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            _P + "inter_token_latency_seconds",
            "Time between output deltas.",
            lbl,
            registry=r,
            buckets=_ITL_BUCKETS,
        )
        self.e2e = Histogram(
            _P + "e2e_request_latency_seconds",
            "Request latency, end to end.",
            lbl,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.stage_seconds = {
            stage: Histogram(
                _P + f"request_{stage}_time_seconds", doc, lbl, registry=r,
                buckets=_LATENCY_BUCKETS,
            )
            for stage, doc in (
                ("queue", "Time waiting for a prefill slot."),
                ("prefill", "Time computing the prompt, to the first token."),
                ("transfer", "Time pulling the prompt's KV from prefill to decode."),
                ("decode", "Time generating after the first token."),
            )
        }
        self.prompt_tokens = Counter(
            _P + "prompt_tokens", "Prompt tokens processed.", lbl, registry=r
        )
        self.generation_tokens = Counter(
            _P + "generation_tokens", "Tokens generated.", lbl, registry=r
        )
        self.success = Counter(
            _P + "request_success",
            "Finished requests by finish reason.",
            lbl + ["finished_reason"],
            registry=r,
        )
        self.failures = Counter(
            _P + "request_failure",
            "Requests refused or failed, by reason.",
            lbl + ["reason"],
            registry=r,
        )

        self.in_flight = Gauge(
            _P + "requests_in_flight",
            "Requests admitted and not finished (the server answers 429 at the limit).",
            registry=r,
        )
        self.in_flight_limit = Gauge(
            _P + "requests_in_flight_limit", "The admission limit (--max-in-flight).", registry=r
        )

    def recorder(self) -> RequestRecorder:
        return RequestRecorder(self)

    def record_failure(self, reason: str) -> None:
        self.failures.labels(self.model_name, reason).inc()

    def render(
        self, loads: Sequence[WorkerLoad], counters: tuple[str, dict[str, int]] = ("none", {})
    ) -> bytes:
        self._loads.loads = tuple(loads)
        self._loads.policy, self._loads.counters = counters
        return generate_latest(self.registry)


class RequestRecorder:
    """Records one request's latencies and token counts as its deltas pass by."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.num_generated = 0
        self.stages: dict[str, float] = {}

    def observe(self, delta: RequestOutput) -> None:
        """Call once per delta the backend yields."""
        if delta.metrics and any(c.finished for c in delta.outputs):
            for stage, secs in stage_seconds(delta.metrics).items():  # n > 1: the slowest
                self.stages[stage] = max(self.stages.get(stage, 0.0), secs)
        new_tokens = sum(len(c.token_ids) for c in delta.outputs)
        if new_tokens == 0:
            return
        now = time.monotonic()
        m, name = self.metrics, self.metrics.model_name
        if self.first_token is None:
            self.first_token = now
            m.ttft.labels(name).observe(now - self.start)
        elif self.last_token is not None:
            m.itl.labels(name).observe(now - self.last_token)
        self.last_token = now
        self.num_generated += new_tokens

    def finish(self, num_prompt_tokens: int, finish_reasons: Iterable[str | None]) -> None:
        """Call once when the request finished (normally or aborted)."""
        m, name = self.metrics, self.metrics.model_name
        m.e2e.labels(name).observe(time.monotonic() - self.start)
        for stage, hist in m.stage_seconds.items():
            if stage in self.stages:
                hist.labels(name).observe(self.stages[stage])
        m.prompt_tokens.labels(name).inc(num_prompt_tokens)
        m.generation_tokens.labels(name).inc(self.num_generated)
        for reason in finish_reasons:
            m.success.labels(name, reason or "abort").inc()

    def timing(self) -> dict[str, float]:
        """Seconds so far: ``ttft``, ``e2e`` and, once the workers reported them, the
        stages ``queue``, ``encode``, ``prefill``, ``transfer`` and ``decode`` (the
        frontend's first-to-last-token time until then), so a slow request can be explained."""
        now = time.monotonic()
        ttft = (self.first_token or now) - self.start
        decode = (self.last_token or now) - (self.first_token or now)
        return {"ttft": ttft, "e2e": now - self.start, "queue": 0.0, "encode": 0.0,
                "prefill": 0.0, "transfer": 0.0, "decode": decode, **self.stages}

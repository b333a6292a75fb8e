"""Prometheus metrics, declared once. Labels never carry payload content or unbounded ids.

>>> SPANS_IN.labels(format="flat").inc(0)
>>> "breakwater_spans_in_total" in [m.name + "_total" for m in REGISTRY.collect()]
True
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

SPANS_IN = Counter("breakwater_spans_in", "Spans decoded, by input format.", ["format"], registry=REGISTRY)
REJECTIONS = Counter("breakwater_rejections", "Rejected input, by reason.", ["reason"], registry=REGISTRY)
INCIDENTS = Counter(
    "breakwater_incidents", "Incidents published, by detector and status.", ["detector", "status"],
    registry=REGISTRY,
)
COMMANDS = Counter(
    "breakwater_breaker_commands", "Breaker commands published, by action and mode.", ["action", "mode"],
    registry=REGISTRY,
)
DETECTION_LATENCY = Histogram(
    "breakwater_detection_latency_seconds",
    "Wall time from the triggering span's end to the publish of its incident.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
TRACKED_KEYS = Gauge(
    "breakwater_tracked_keys", "Keys with detector state in this worker, by scope.", ["scope"], registry=REGISTRY
)
EVICTIONS = Counter("breakwater_state_evictions", "Per-key states evicted by TTL, by scope.", ["scope"], registry=REGISTRY)
BATCH_SECONDS = Histogram(
    "breakwater_batch_seconds", "Processing time of one batch, by stage.", ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=REGISTRY,
)

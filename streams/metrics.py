"""Prometheus metrics, declared once. Labels never carry payload content or unbounded ids.

Every label value comes from a small closed set (input formats, rejection reasons, detector
names, severities, actions, modes, topics and partitions); tenants, sessions and routes never
become labels. Known label combinations are created at import with value 0, so a counter exists
before its first increment: ``increase()`` in an alert then sees the first incident too, and
"no spans at all" is a 0 rate rather than a missing series.

The worker serves them on their own port (:mod:`streams.ops`), beside ``/healthz`` and
``/readyz``; ``deploy/grafana/dashboard.json`` and ``deploy/prometheus/rules.yaml`` use only
the names declared here (a test checks). README "Endpoints, metrics and alerts" carries the
:func:`reference` table generated from these declarations (``python -m streams.metrics`` prints
it; a test fails when the README copy is stale).

>>> SPANS_IN.labels(format="flat").inc(0)
>>> "breakwater_spans_in_total" in sample_names()
True
>>> sorted(n for n in declared_names() if n.startswith("breakwater_incidents"))
['breakwater_incidents_total']
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics import MetricWrapperBase

from streams import __version__ as _version

REGISTRY = CollectorRegistry(auto_describe=True)

#: Detectors of README "Detectors" and the scope of the state each keeps (session-scoped detectors share
#: the session table, so they track the same keys).
DETECTORS: dict[str, str] = {
    "no_progress_loop": "session",
    "retry_storm": "route",
    "cost_velocity": "session",
    "plan_deadlock": "workflow",
    "silent_success": "trace",
}
#: Detectors whose state lives in the live worker's session table today.
SESSION_TABLE_DETECTORS: tuple[str, ...] = ("no_progress_loop", "retry_storm", "cost_velocity")
FORMATS = ("flat", "otlp_json", "otlp_proto")
REJECTION_REASONS = (
    "oversized", "not_utf8", "bad_json", "bad_otlp", "bad_span", "bad_id", "bad_timestamp",
    "too_many_attributes", "too_deep", "bad_input", "internal_error", "clock_skew", "oversized_span",
)
SEVERITIES = ("warning", "critical")
INCIDENT_STATUSES = ("open", "updated", "resolved")
ACTIONS = ("halt", "trip", "throttle", "hold", "release")
MODES = ("enforce", "shadow")

SPANS_IN = Counter(
    "breakwater_spans_in", "Spans decoded from the input topics, by input format.", ["format"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "breakwater_rejections", "Rejected input (sent to the DLQ), by reason; one per bad span or message.",
    ["reason"], registry=REGISTRY,
)
INCIDENTS = Counter(
    "breakwater_incidents", "Incident records published, by detector, severity and status (open/updated/resolved).",
    ["detector", "severity", "status"], registry=REGISTRY,
)
COMMANDS = Counter(
    "breakwater_breaker_commands", "Breaker commands published, by action and mode (enforce/shadow).",
    ["action", "mode"], registry=REGISTRY,
)
DETECTION_LATENCY = Histogram(
    "breakwater_detection_latency_seconds",
    "Wall time from the end of the span that triggered an incident to the incident's publish, by detector.",
    ["detector"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "breakwater_consumer_lag_messages",
    "Messages not yet committed by this worker, per assigned input partition (high watermark - committed offset), "
    "sampled every BREAKWATER_LAG_SAMPLE_INTERVAL_S.",
    ["topic", "partition"], registry=REGISTRY,
)
TRACKED_KEYS = Gauge(
    "breakwater_tracked_keys", "Keys with detector state in this worker, by detector and scope.",
    ["detector", "scope"], registry=REGISTRY,
)
NEW_KEYS = Counter(
    "breakwater_new_keys",
    "Keys this worker started state for, by stage: its rate is the key cardinality the worker pays "
    "for (each new key costs a state read and write; README \"Cardinality\").",
    ["stage"], registry=REGISTRY,
)
EVICTIONS = Counter(
    "breakwater_state_evictions",
    "Per-key states evicted after their TTL (event time) or, least recently seen first, past the per-partition "
    "key cap (BREAKWATER_MAX_KEYS_PER_PARTITION), by scope.", ["scope"],
    registry=REGISTRY,
)
UNPRICED_SPANS = Counter(
    "breakwater_unpriced_spans", "LLM spans whose cost could not be priced (counted, never guessed).",
    registry=REGISTRY,
)
STAGE_SPANS = Counter(
    "breakwater_stage_spans",
    "Spans (session, trace, workflow stages) or forwarded aggregates (scope stage) processed, by stage.",
    ["stage"], registry=REGISTRY,
)
DUPLICATE_SPANS = Counter(
    "breakwater_duplicate_spans",
    "Spans skipped because their input message (topic, partition, offset) was already applied to "
    "their key: input re-delivered after a crash or rebalance (at-least-once), by stage.",
    ["stage"], registry=REGISTRY,
)
DLQ_FAILURES = Counter(
    "breakwater_dlq_failures",
    "Rejected input that could not be written to the DLQ (counted and logged without content; ingest "
    "goes on with the rest of the batch).",
    registry=REGISTRY,
)
OVERSIZED_STATES = Counter(
    "breakwater_oversized_states",
    "Per-key states over the state size budget: reset (the key starts afresh, its breakers in force "
    "kept) instead of written, by stage.",
    ["stage"], registry=REGISTRY,
)
STATE_RESETS = Counter(
    "breakwater_state_resets",
    "Stored per-key states of another state version, or unreadable, discarded on load (that key "
    "starts over), by stage. Expected once after a version bump, never in a steady state.",
    ["stage"], registry=REGISTRY,
)
EMPTY_MESSAGES = Counter(
    "breakwater_empty_messages",
    "Input messages that carried no span and nothing to reject: empty values, tombstones, empty "
    "arrays, OTLP requests with zero spans (counted, then skipped).",
    registry=REGISTRY,
)
RESENT_SPANS = Counter(
    "breakwater_resent_spans",
    "Spans skipped because their session had already applied a span with the same id (a producer "
    "re-sent it: at-least-once exporters do), by stage.",
    ["stage"], registry=REGISTRY,
)
IGNORED_VALUES = Counter(
    "breakwater_ignored_values",
    "Attribute values ingest refused (non-numeric, negative, non-finite or absurd tokens, costs and "
    "retry ordinals); the span is kept and the value treated as absent, by feature.",
    ["feature"], registry=REGISTRY,
)
STATE_WRITES = Counter(
    "breakwater_state_writes",
    "Per-key state writes (table + changelog record), by stage: written behind, once per key per commit.",
    ["stage"], registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "breakwater_batch_seconds", "Processing time of one batch, by stage.", ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=REGISTRY,
)
WORKER_READY = Gauge(
    "breakwater_worker_ready", "1 when the worker has its partitions assigned and its state recovered (/readyz "
    "answers 200), else 0.",
    registry=REGISTRY,
)
REBALANCES = Counter(
    "breakwater_rebalances", "Consumer group rebalances this worker went through.", registry=REGISTRY,
)
BUILD = Info("breakwater_build", "Breakwater version (always 1).", registry=REGISTRY)
BUILD.info({"version": _version})


def _init_series() -> None:
    for f in FORMATS:
        SPANS_IN.labels(format=f)
    for r in REJECTION_REASONS:
        REJECTIONS.labels(reason=r)
    for d in DETECTORS:
        DETECTION_LATENCY.labels(detector=d)
        for sev in SEVERITIES:
            for st in INCIDENT_STATUSES:
                INCIDENTS.labels(detector=d, severity=sev, status=st)
    for a in ACTIONS:
        for m in MODES:
            COMMANDS.labels(action=a, mode=m)
    for scope in sorted(set(DETECTORS.values())):
        EVICTIONS.labels(scope=scope)
    for stage in ("ingest", "detect"):
        BATCH_SECONDS.labels(stage=stage)
    for stage in ("session", "trace", "workflow", "scope"):
        STAGE_SPANS.labels(stage=stage)
        STATE_WRITES.labels(stage=stage)
        DUPLICATE_SPANS.labels(stage=stage)
        OVERSIZED_STATES.labels(stage=stage)
        STATE_RESETS.labels(stage=stage)
        NEW_KEYS.labels(stage=stage)
    RESENT_SPANS.labels(stage="session")
    for feature in ("cost", "input_tokens", "output_tokens", "cached_tokens", "retry_ordinal"):
        IGNORED_VALUES.labels(feature=feature)


_init_series()

#: Label values of series that appear only at run time (the others are created above, at import).
RUNTIME_LABEL_VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "breakwater_tracked_keys": {"detector": tuple(DETECTORS),
                                "scope": ("session", "trace", "workflow", "route", "tenant")},
}


def _declared() -> list[MetricWrapperBase]:
    """Every metric declared above, in declaration order."""
    return [v for v in globals().values() if isinstance(v, MetricWrapperBase)]


def _label_values() -> dict[str, dict[str, tuple[str, ...]]]:
    """Label values of the series created at import, per metric and label, in creation order."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for m in _declared():
        names = m._labelnames  # noqa: SLF001
        seen: dict[str, dict[str, None]] = {n: {} for n in names}
        for key in list(getattr(m, "_metrics", {})):
            for n, v in zip(names, key):
                seen[n][v] = None
        out[m._name] = {n: tuple(vs) for n, vs in seen.items() if vs}  # noqa: SLF001
    return out


_IMPORT_LABEL_VALUES = _label_values()  # before any increment can add run-time values

_EXPOSED = {"counter": "{}_total", "gauge": "{}", "histogram": "{}", "info": "{}_info"}
_TYPE_TEXT = {"counter": "counter", "gauge": "gauge", "histogram": "histogram (`_bucket`, `_sum`, `_count`)",
              "info": "gauge (info)"}


def reference() -> str:
    """The metrics table of README "Endpoints, metrics and alerts", generated from the declarations.

    One row per metric: the name a query uses, its type, its labels (with their values when they
    form a closed set known in advance) and its help text.

    >>> print(reference().splitlines()[2])
    | `breakwater_spans_in_total` | counter | `format` (`flat`, `otlp_json`, `otlp_proto`) | Spans decoded from the input topics, by input format. |
    """
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in _declared():
        kind = m._type  # noqa: SLF001
        name = _EXPOSED[kind].format(m._name)  # noqa: SLF001
        known = {**_IMPORT_LABEL_VALUES.get(m._name, {}), **RUNTIME_LABEL_VALUES.get(m._name, {})}  # noqa: SLF001
        labels = m._labelnames if kind != "info" else tuple(  # noqa: SLF001
            dict.fromkeys(k for fam in m.collect() for smp in fam.samples for k in smp.labels))
        cells = []
        for label in labels:
            values = known.get(label)
            cells.append(f"`{label}`" + (f" ({', '.join(f'`{v}`' for v in values)})" if values else ""))
        doc = m._documentation.replace("|", "\\|")  # noqa: SLF001
        rows.append(f"| `{name}` | {_TYPE_TEXT[kind]} | {', '.join(cells)} | {doc} |")
    return "\n".join(rows)


def incident_published(out: Any, now: float | None = None) -> None:
    """Count one published incident (a :class:`streams.pipeline.Output`) and its detection latency.

    >>> from types import SimpleNamespace
    >>> o = SimpleNamespace(detector="no_progress_loop", status="open", severity="critical",
    ...                     detected_at_ns=1_000_000_000)
    >>> before = INCIDENTS.labels("no_progress_loop", "critical", "open")._value.get()
    >>> incident_published(o, now=1.5)
    >>> INCIDENTS.labels("no_progress_loop", "critical", "open")._value.get() - before
    1.0
    """
    INCIDENTS.labels(detector=out.detector, severity=out.severity or "unknown", status=out.status).inc()
    if out.status == "open":  # latency of detection, not of later updates of the same episode
        now = time.time() if now is None else now
        DETECTION_LATENCY.labels(detector=out.detector).observe(max(0.0, now - out.detected_at_ns / 1e9))


def set_tracked_keys(scope: str, n: int) -> None:
    """Keys with state in one of the worker's stores; every detector keeping state there tracks them.

    >>> set_tracked_keys("session", 3)
    >>> TRACKED_KEYS.labels("no_progress_loop", "session")._value.get()
    3.0
    """
    detectors = SESSION_TABLE_DETECTORS if scope == "session" else (
        ["cost_velocity"] if scope == "tenant" else [d for d, s in DETECTORS.items() if s == scope])
    for d in detectors:
        TRACKED_KEYS.labels(detector=d, scope=scope).set(n)


_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}


def declared_names() -> set[str]:
    """Every sample name a scrape can show (``_created`` series aside): what dashboards may use.

    >>> {"breakwater_detection_latency_seconds_bucket", "breakwater_consumer_lag_messages"} <= declared_names()
    True
    """
    names: set[str] = set()
    for fam in REGISTRY.collect():
        for suffix in _SUFFIXES.get(fam.type, ("",)):
            names.add(fam.name + suffix)
    return names


def sample_names() -> set[str]:
    """Names of the samples a scrape returns right now."""
    return {s.name for fam in REGISTRY.collect() for s in fam.samples}


if __name__ == "__main__":  # pragma: no cover - ``python -m streams.metrics``: the README table
    print(reference())

"""The worker's operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on their own port.

The HTTP server runs in a daemon thread of its own (a threaded WSGI server around
prometheus-client's exposition app), so a busy or stalled event loop never stalls a scrape or a
probe, and the probes can tell that the loop stalled:

* ``/healthz`` (liveness): 200 while the worker's event loop keeps beating (a task in the loop
  stamps the time every second); 503 once it has not run for ``health_stall_s``, or when faust
  crashed. A restart is the cure for both.
* ``/readyz`` (readiness): 200 once the consumer group has assigned this worker its partitions and
  faust has recovered their state from the changelog ("Worker ready"); 503 while starting, during a
  rebalance (state recovery included) and while stopping.
* ``/metrics``: :data:`streams.metrics.REGISTRY` (Prometheus text, or OpenMetrics when asked).

The same loop task samples consumer lag per assigned input partition every
``lag_sample_interval_s`` (:func:`sample_lag`) and keeps ``breakwater_worker_ready`` current.

Wiring: :func:`install` adds an :class:`OpsSensor` to the faust app. faust starts sensors first and
stops them last, so the endpoint answers during startup, state recovery and shutdown; an app that
is only created (never run as a worker) binds nothing. A port that cannot be bound is logged as an
error and the worker runs on without the endpoint (its probes then fail, which is how an
orchestrator notices).

>>> h = Health(stall_s=30.0, clock=lambda: 100.0)
>>> h.liveness()[0], h.readiness()
(True, (False, {'ready': False, 'reason': 'starting'}))
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from faust.sensors import Sensor
from prometheus_client import make_wsgi_app

from streams import metrics

log = logging.getLogger("breakwater.ops")

__all__ = ["Health", "OpsServer", "OpsSensor", "install", "sample_lag"]


class Health:
    """What the probes answer. Fed by the event loop (:meth:`beat`); read by the HTTP thread.

    >>> t = [0.0]
    >>> h = Health(stall_s=10.0, clock=lambda: t[0])
    >>> h.beat(); t[0] = 5.0
    >>> h.liveness()
    (True, {'alive': True, 'loop_silent_s': 5.0})
    >>> t[0] = 11.0
    >>> h.liveness()[0]
    False
    """

    def __init__(self, stall_s: float, app: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self.app = app
        self._clock = clock
        self._started = clock()
        self._beat: float | None = None
        self.stopping = False

    def beat(self) -> None:
        self._beat = self._clock()

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        crash = getattr(self.app, "crash_reason", None) if self.app is not None else None
        if crash is not None:
            return False, {"alive": False, "reason": f"crashed: {type(crash).__name__}"}
        silent = round(self._clock() - (self._beat if self._beat is not None else self._started), 3)
        if silent > self.stall_s:
            return False, {"alive": False, "loop_silent_s": silent,
                           "reason": f"event loop has not run for {silent:.1f}s (limit {self.stall_s:g}s)"}
        return True, {"alive": True, "loop_silent_s": silent}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        app = self.app
        if app is None or self._beat is None:
            return False, {"ready": False, "reason": "starting"}
        if self.stopping or getattr(app, "should_stop", False):
            return False, {"ready": False, "reason": "stopping"}
        if not getattr(app, "rebalancing_count", 0):
            return False, {"ready": False, "reason": "waiting for partition assignment"}
        if getattr(app, "rebalancing", False):
            return False, {"ready": False, "reason": "rebalancing (recovering state)"}
        try:
            partitions = len(app.assignor.assigned_actives())
        except Exception:  # noqa: BLE001 - informational only
            partitions = None
        return True, {"ready": True, "reason": "partitions assigned, state recovered",
                      "active_partitions": partitions}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ARG002 - probes every few seconds
        pass


class OpsServer:
    """``/metrics``, ``/healthz``, ``/readyz`` in a daemon thread. ``port=0`` binds a free port.

    >>> s = OpsServer("127.0.0.1", 0, Health(30.0))
    >>> s.start()
    True
    >>> import urllib.request
    >>> urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz").status
    200
    >>> s.stop()
    """

    def __init__(self, host: str, port: int, health: Health, registry: Any = metrics.REGISTRY) -> None:
        self.host = host
        self.requested_port = port
        self.health = health
        self._metrics_app = make_wsgi_app(registry)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return int(self._httpd.server_address[1]) if self._httpd is not None else None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok, body = self.health.liveness() if path == "/healthz" else self.health.readiness()
            data = json.dumps(body).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        if path in ("/metrics", "/"):
            return self._metrics_app(environ, start_response)
        data = b"not found: try /metrics, /healthz or /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
        return [data]

    def start(self) -> bool:
        """Bind and serve; False (logged) when the address cannot be bound."""
        if self._httpd is not None:
            return True
        server_class = _Server6 if ":" in self.host else _Server
        try:
            self._httpd = make_server(self.host, self.requested_port, self._app, server_class, _QuietHandler)
        except OSError as exc:
            log.error("ops: cannot serve /metrics, /healthz, /readyz on %s:%s (%s); "
                      "set BREAKWATER_METRICS_PORT to a free port (0 = off)", self.host, self.requested_port, exc)
            return False
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="breakwater-ops-http", daemon=True)
        self._thread.start()
        log.info("ops: /metrics, /healthz, /readyz on http://%s:%d", self.host, self.port)
        return True

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def sample_lag(app: Any, topics: set[str]) -> dict[tuple[str, int], int]:
    """Lag per actively assigned partition of ``topics``: end of the log minus committed offset.

    The end is the high watermark of the consumer's last fetch, raised to the last offset read
    + 1 (a broker's high watermark can trail what was already read: Tansu's ListOffsets(latest)
    quirk, README "The embedded broker"); before the first commit the read position stands in for the committed
    offset. Never negative. Uses faust consumer internals, so it tolerates their absence.
    """
    consumer = app.consumer
    committed_map = getattr(consumer, "_committed_offset", {})
    read_map = getattr(consumer, "_read_offset", {})
    out: dict[tuple[str, int], int] = {}
    for tp in app.assignor.assigned_actives():
        if tp.topic not in topics:
            continue
        try:
            hw = consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - consumer not started or partition not fetched yet
            hw = None
        read = read_map.get(tp)
        committed = committed_map.get(tp)
        end = max(hw or 0, read + 1 if read is not None else 0)
        base = committed if committed is not None else (read + 1 if read is not None else None)
        if base is None:  # nothing read or committed yet: all of the log is lag
            if hw is None:
                continue
            base = 0
        out[(tp.topic, tp.partition)] = max(0, end - base)
    return out


class OpsSensor(Sensor):
    """A faust sensor that owns the ops server and the loop task (heartbeat, readiness, lag)."""

    def __init__(self, app: Any, settings: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.settings = settings
        self.health = Health(settings.health_stall_s, app=app)
        self.server = OpsServer(settings.metrics_host, settings.metrics_port, self.health)
        self.lag_topics = {settings.topic_spans, settings.topic_otlp, settings.repartition_topic}
        self._lag_labels: set[tuple[str, str]] = set()

    async def on_start(self) -> None:
        self.health.beat()
        self.server.start()
        self.add_future(self._tick())

    async def on_stop(self) -> None:
        self.health.stopping = True
        metrics.WORKER_READY.set(0)
        self.server.stop()

    def on_rebalance_start(self, app: Any) -> dict:
        metrics.REBALANCES.inc()
        metrics.WORKER_READY.set(0)
        return super().on_rebalance_start(app)

    async def _tick(self) -> None:
        beat_every = min(1.0, self.settings.health_stall_s / 5)
        next_lag = 0.0
        while not self.should_stop:
            self.health.beat()
            metrics.WORKER_READY.set(1 if self.health.readiness()[0] else 0)
            now = time.monotonic()
            if now >= next_lag:
                next_lag = now + self.settings.lag_sample_interval_s
                self._sample_lag()
            await self.sleep(beat_every)

    def _sample_lag(self) -> None:
        if not getattr(self.app, "rebalancing_count", 0) or self.app.rebalancing:
            return
        try:
            lags = sample_lag(self.app, self.lag_topics)
        except Exception as exc:  # noqa: BLE001 - a metric must never hurt the worker
            log.debug("ops: lag sample failed: %r", exc)
            return
        labels = {(t, str(p)) for t, p in lags}
        for t, p in self._lag_labels - labels:  # partitions revoked since the last sample
            try:
                metrics.CONSUMER_LAG.remove(t, p)
            except KeyError:
                pass
        for (t, p), lag in lags.items():
            metrics.CONSUMER_LAG.labels(topic=t, partition=str(p)).set(lag)
        self._lag_labels = labels


def install(app: Any, settings: Any) -> OpsSensor | None:
    """Attach the ops endpoint to a faust app (it starts when the worker starts). None when off."""
    if not settings.metrics_port:
        return None
    sensor = OpsSensor(app, settings)
    app.sensors.add(sensor)
    return sensor

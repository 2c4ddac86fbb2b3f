"""Prometheus exporter: a `prometheus_client` collector reading a MetricsCollector at scrape time.

    from eventcore.exporters import prometheus
    prometheus.start_http_server(collector, port=9464)        # GET /metrics
    # or, into an existing registry / web app:
    prometheus.register(collector)                            # prometheus_client.REGISTRY

Nothing is recorded twice: counters and histograms are the collector's own, copied when
Prometheus scrapes; pool and projection gauges are read from the attached stores then.
Needs `pip install 'pyeventcore[prometheus]'`.
"""
from __future__ import annotations

try:
    from prometheus_client import CollectorRegistry
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import REGISTRY
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Prometheus exporter needs prometheus-client: pip install 'pyeventcore[prometheus]'") from exc

from ..metrics import BUCKET_BOUNDS, BUCKETS_PER_DECADE, MetricsCollector

#: Prometheus buckets: every 5th of the collector's (4 per decade: 1, 1.8, 3.2, 5.6 x 10^n s), 10 us .. 1,000 s.
#: Cumulative counts at a subset of the collector's bounds are exact.
_EXPORTED = tuple(range(0, len(BUCKET_BOUNDS), BUCKETS_PER_DECADE // 4))


def _buckets(counts: list) -> list:
    out = []
    running = 0
    cumulative = []
    for n in counts:
        running += n
        cumulative.append(running)
    for i in _EXPORTED:
        out.append((f"{BUCKET_BOUNDS[i]:.6g}", cumulative[i]))
    out.append(("+Inf", cumulative[-1]))
    return out


class EventcoreCollector:
    """A prometheus_client custom collector over an eventcore MetricsCollector."""

    def __init__(self, collector: MetricsCollector, namespace: str = "eventcore") -> None:
        if not isinstance(collector, MetricsCollector):
            raise TypeError(f"expected an ec.MetricsCollector, got {type(collector).__name__}")
        self.collector = collector
        self.ns = namespace

    def describe(self):
        return []  # collected on demand; nothing to check at registration

    def collect(self):
        ns, c = self.ns, self.collector
        with c._lock:
            commands = dict(c.commands)
            retries = dict(c.retries)
            cmd_hist = {t: (list(h.counts), h.sum) for t, h in c.command_latency.items()}
            ops = dict(c.operations)
            op_hist = {op: (list(h.counts), h.sum) for op, h in c.operation_latency.items()}
            written, read = c.events_written, c.events_read
        f = CounterMetricFamily(f"{ns}_commands", "Commands executed, by command type and outcome "
                                "(conflict_retried: commands that needed a retry after a version conflict)",
                                labels=["command", "outcome"])
        for (t, o), n in sorted(commands.items()):
            f.add_metric([t, o], n)
        yield f
        f = CounterMetricFamily(f"{ns}_command_retries", "Command retries, by command type and reason",
                                labels=["command", "reason"])
        for (t, r), n in sorted(retries.items()):
            f.add_metric([t, r], n)
        yield f
        f = HistogramMetricFamily(f"{ns}_command_duration_seconds", "execute() duration by command type",
                                  labels=["command"])
        for t, (counts, total) in sorted(cmd_hist.items()):
            f.add_metric([t], _buckets(counts), total)
        yield f
        f = CounterMetricFamily(f"{ns}_store_operations", "Store calls, by operation and outcome",
                                labels=["operation", "outcome"])
        for (op, o), n in sorted(ops.items()):
            f.add_metric([op, o], n)
        yield f
        f = HistogramMetricFamily(f"{ns}_store_operation_duration_seconds", "Store call duration by operation",
                                  labels=["operation"])
        for op, (counts, total) in sorted(op_hist.items()):
            f.add_metric([op], _buckets(counts), total)
        yield f
        yield CounterMetricFamily(f"{ns}_events_written", "Events written by the attached stores", value=written)
        yield CounterMetricFamily(f"{ns}_events_read", "Events read by the attached stores", value=read)
        pool = GaugeMetricFamily(f"{ns}_pool_connections", "Pooled connections by state", labels=["store", "state"])
        waiting = GaugeMetricFamily(f"{ns}_pool_waiting", "Requests waiting for a pooled connection",
                                    labels=["store"])
        lag = GaugeMetricFamily(f"{ns}_projection_lag", "Projector lag (head position - checkpoint)",
                                labels=["store", "projector"])
        for url, g in sorted(c.gauges().items()):
            p = g["pool"]
            if p:
                pool.add_metric([url, "in_use"], p["in_use"])
                pool.add_metric([url, "idle"], p["idle"])
                waiting.add_metric([url], p["waiting"])
            for name, value in sorted(g["projections"].items()):
                lag.add_metric([url, name], value)
        yield pool
        yield waiting
        yield lag


def register(collector: MetricsCollector, registry=None, namespace: str = "eventcore") -> EventcoreCollector:
    """Register the collector with a prometheus_client registry (default: the global REGISTRY)."""
    exporter = EventcoreCollector(collector, namespace)
    (REGISTRY if registry is None else registry).register(exporter)
    return exporter


def start_http_server(collector: MetricsCollector, port: int = 9464, addr: str = "0.0.0.0", registry=None,
                      namespace: str = "eventcore"):
    """Serve /metrics for this collector on a background thread (prometheus_client's server).

    Uses a registry of its own unless one is given, so eventcore's metrics are exactly what is served.
    Returns what prometheus_client.start_http_server returns (the server and its thread)."""
    if registry is None:
        registry = CollectorRegistry()
    register(collector, registry, namespace)
    return _start_http_server(port, addr=addr, registry=registry)

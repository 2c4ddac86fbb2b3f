"""OpenTelemetry exporter: spans for execute/read/append/ingest and metrics, from a MetricsCollector.

    from eventcore.exporters import otel
    otel.instrument(collector)                       # the global tracer and meter providers
    otel.instrument(collector, tracer_provider=tp, meter_provider=mp)

Spans: `eventcore.execute` (attributes eventcore.command, eventcore.stream_ids, and at the end
eventcore.outcome, eventcore.attempts, eventcore.events_written, eventcore.replayed (an idempotency key had
already committed: nothing written), eventcore.stream_versions: the streams' versions after the
command, in the order of eventcore.stream_ids), with the store calls it makes as children:
`eventcore.read`, `eventcore.append` (eventcore.expected_versions before, eventcore.stream_versions
after), `eventcore.append_batch`, `eventcore.read_all` (one per page), `eventcore.ingest`.
Metrics: eventcore.commands and eventcore.retries counters, eventcore.command.duration and
eventcore.store.duration histograms (seconds), eventcore.events.written / .read counters, and
observable gauges eventcore.pool.in_use, eventcore.pool.waiting, eventcore.projection.lag.
Needs `pip install 'pyeventcore[otel]'` (opentelemetry-api; opentelemetry-sdk to export).
"""
from __future__ import annotations

try:
    from opentelemetry import context as _context
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
    from opentelemetry.trace import Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the OpenTelemetry exporter needs opentelemetry-api: pip install 'pyeventcore[otel]'") from exc

from ..errors import BusinessRuleViolation, ConcurrencyError, DuplicateCommandError
from ..metrics import CommandInfo, MetricsCollector, OperationInfo, RetryInfo

INSTRUMENTATION_NAME = "eventcore"


class SpanTracer:
    """The collector's tracer interface on an OpenTelemetry tracer: each span is made current while it
    runs, so the store calls a command makes are its children."""

    def __init__(self, tracer) -> None:
        self._tracer = tracer

    def start(self, name: str, attributes: dict):
        span = self._tracer.start_span(name, attributes=attributes, kind=_trace.SpanKind.INTERNAL)
        token = _context.attach(_trace.set_span_in_context(span))
        return span, token

    def end(self, handle, attributes: dict, error: BaseException | None) -> None:
        span, token = handle
        try:
            span.set_attributes(attributes)
            if error is not None:
                span.record_exception(error)
                # A refusal, a version conflict and an idempotency key already used (the append that
                # finds it is how execute replays a command) are answers, not faults: recorded, status unset.
                if not isinstance(error, (BusinessRuleViolation, ConcurrencyError, DuplicateCommandError)):
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        finally:
            _context.detach(token)
            span.end()


def instrument(collector: MetricsCollector, tracer_provider=None, meter_provider=None, *, spans: bool = True,
               metrics: bool = True) -> None:
    """Send the collector's commands and store operations to OpenTelemetry (spans and/or metrics)."""
    if not isinstance(collector, MetricsCollector):
        raise TypeError(f"expected an ec.MetricsCollector, got {type(collector).__name__}")
    if spans:
        collector.add_tracer(SpanTracer(_trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)))
    if not metrics:
        return
    meter = (_metrics.get_meter(INSTRUMENTATION_NAME) if meter_provider is None
             else meter_provider.get_meter(INSTRUMENTATION_NAME))
    commands = meter.create_counter("eventcore.commands", unit="{command}", description="Commands by type and outcome")
    retries = meter.create_counter("eventcore.retries", unit="{retry}", description="Command retries by reason")
    command_duration = meter.create_histogram("eventcore.command.duration", unit="s",
                                              description="execute() duration by command type")
    store_duration = meter.create_histogram("eventcore.store.duration", unit="s",
                                            description="Store call duration by operation")
    written = meter.create_counter("eventcore.events.written", unit="{event}")
    read = meter.create_counter("eventcore.events.read", unit="{event}")

    @collector.on_command_complete
    def _command(info: CommandInfo) -> None:
        attrs = {"eventcore.command": info.command_type, "eventcore.outcome": info.outcome}
        commands.add(1, attrs)
        command_duration.record(info.duration_s, {"eventcore.command": info.command_type})

    @collector.on_retry
    def _retry(info: RetryInfo) -> None:
        retries.add(1, {"eventcore.command": info.command_type, "eventcore.reason": info.reason})

    @collector.on_store_operation
    def _operation(info: OperationInfo) -> None:
        store_duration.record(info.duration_s, {"eventcore.operation": info.operation,
                                                "eventcore.outcome": info.outcome})
        if info.outcome == "ok" and info.events:
            if info.operation in ("append", "append_batch", "ingest_batch"):
                written.add(info.events, {"eventcore.operation": info.operation})
            elif info.operation in ("read", "read_all"):
                read.add(info.events, {"eventcore.operation": info.operation})

    def _gauge(pick):
        def callback(options):
            out = []
            for url, g in collector.gauges().items():
                out.extend(pick(url, g))
            return out
        return callback

    def _pool(key):
        return _gauge(lambda url, g: [_metrics.Observation(g["pool"][key], {"eventcore.store": url})]
                      if g["pool"] else [])

    meter.create_observable_gauge("eventcore.pool.in_use", [_pool("in_use")], unit="{connection}")
    meter.create_observable_gauge("eventcore.pool.waiting", [_pool("waiting")], unit="{request}")
    meter.create_observable_gauge(
        "eventcore.projection.lag",
        [_gauge(lambda url, g: [_metrics.Observation(lag, {"eventcore.store": url, "eventcore.projector": name})
                                for name, lag in g["projections"].items()])],
        unit="{position}")

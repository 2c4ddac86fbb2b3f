"""Exporters of a MetricsCollector to monitoring systems, each an optional extra.

eventcore.exporters.otel        OpenTelemetry spans and metrics   pip install 'pyeventcore[otel]'
eventcore.exporters.prometheus  Prometheus collector + /metrics    pip install 'pyeventcore[prometheus]'

Neither is imported by eventcore itself: the library runs without them installed.
"""

"""Exporters (OpenTelemetry, Prometheus), logging without secrets, and `eventcore status`."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import pytest

import eventcore as ec
from domain import Deposit, Transfer
from eventcore.stores.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA
from optional import require
from eventcore.cli import main


def _otel():
    require("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    return spans, tracer_provider, reader, MeterProvider(metric_readers=[reader])


def test_opentelemetry_spans_and_metrics(store):
    from eventcore.exporters import otel

    spans, tracer_provider, reader, meter_provider = _otel()
    collector = ec.MetricsCollector()
    otel.instrument(collector, tracer_provider=tracer_provider, meter_provider=meter_provider)
    store.attach(collector)
    store.command_cache = None  # every command reads: the reads' spans and metrics are what is counted here
    a, b = ec.StreamId("o-a"), ec.StreamId("o-b")
    ec.execute(store, Deposit(a, 50))
    ec.execute(store, Transfer(a, b, 20))
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Transfer(a, b, 1000))
    store.ingest([(f"o-i-{k}", _deposited(k)) for k in range(5)], batch_size=2)

    finished = spans.get_finished_spans()
    names = [s.name for s in finished]
    assert names.count("eventcore.execute") == 3 and names.count("eventcore.ingest") == 1
    executes = [s for s in finished if s.name == "eventcore.execute"]
    transfer = executes[1]
    assert transfer.attributes["eventcore.command"] == "Transfer"
    assert list(transfer.attributes["eventcore.stream_ids"]) == ["o-a", "o-b"]
    assert list(transfer.attributes["eventcore.stream_versions"]) == [2, 1]
    assert transfer.attributes["eventcore.outcome"] == "succeeded" and transfer.attributes["eventcore.attempts"] == 1
    children = [s for s in finished if s.parent is not None and s.parent.span_id == transfer.context.span_id]
    assert [s.name for s in children] == ["eventcore.read", "eventcore.append"]
    read, append = children
    assert list(read.attributes["eventcore.stream_ids"]) == ["o-a", "o-b"]
    assert list(read.attributes["eventcore.stream_versions"]) == [1, 0]
    assert list(append.attributes["eventcore.expected_versions"]) == [1, 0]
    assert list(append.attributes["eventcore.stream_versions"]) == [2, 1]
    assert append.attributes["eventcore.events"] == 2 and append.attributes["db.system"] in (
        "memory", "sqlite", "postgresql")
    refused = executes[2]
    assert refused.attributes["eventcore.outcome"] == "rejected"
    assert [e.name for e in refused.events] == ["exception"]
    ingest = next(s for s in finished if s.name == "eventcore.ingest")
    assert ingest.attributes["eventcore.events"] == 5

    data = reader.get_metrics_data()
    points = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points[m.name] = m.data.data_points
    commands = {(dict(p.attributes)["eventcore.command"], dict(p.attributes)["eventcore.outcome"]): p.value
                for p in points["eventcore.commands"]}
    assert commands == {("Deposit", "succeeded"): 1, ("Transfer", "succeeded"): 1, ("Transfer", "rejected"): 1}
    assert sum(p.count for p in points["eventcore.command.duration"]) == 3
    assert sum(p.value for p in points["eventcore.events.written"]) == 3 + 5
    assert "eventcore.store.duration" in points


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_opentelemetry_reports_a_replayed_command_as_writing_nothing_and_not_failing(tmp_path, backend):
    from eventcore.exporters import otel
    from opentelemetry.trace import StatusCode

    spans, tracer_provider, reader, meter_provider = _otel()
    collector = ec.MetricsCollector()
    otel.instrument(collector, tracer_provider=tracer_provider, meter_provider=meter_provider)
    store = ec.connect("memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'events.db'}")
    try:
        store.attach(collector)
        a, b = ec.StreamId("or-a"), ec.StreamId("or-b")
        ec.execute(store, Deposit(a, 50))
        for _ in range(2):
            ec.execute(store, Transfer(a, b, 20), idempotency_key="transfer-1")
        executes = [s for s in spans.get_finished_spans() if s.name == "eventcore.execute"]
        first, replay = executes[1:]
        assert (first.attributes["eventcore.events_written"], first.attributes["eventcore.replayed"]) == (2, False)
        assert (replay.attributes["eventcore.events_written"], replay.attributes["eventcore.replayed"]) == (0, True)
        assert replay.attributes["eventcore.outcome"] == "succeeded"
        assert list(replay.attributes["eventcore.stream_versions"]) == [2, 1]
        (append,) = [s for s in spans.get_finished_spans()
                     if s.parent is not None and s.parent.span_id == replay.context.span_id and s.name == "eventcore.append"]
        assert append.status.status_code != StatusCode.ERROR  # the key was found: an answer, not a fault
        points = {m.name: m.data.data_points for rm in reader.get_metrics_data().resource_metrics
                  for sm in rm.scope_metrics for m in sm.metrics}
        assert sum(p.value for p in points["eventcore.events.written"]) == 1 + 2
    finally:
        store.close()


def _deposited(k):
    from domain import Deposited

    return Deposited(amount=k + 1)


def test_prometheus_text_parses(store):
    require("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from eventcore.exporters import prometheus

    collector = ec.MetricsCollector()
    store.attach(collector)
    store.command_cache = None  # every command reads: the reads' metrics are what is counted here
    a, b = ec.StreamId("p-a"), ec.StreamId("p-b")
    ec.execute(store, Deposit(a, 50))
    ec.execute(store, Transfer(a, b, 20))
    with pytest.raises(ec.BusinessRuleViolation):
        ec.execute(store, Transfer(a, b, 1000))
    registry = CollectorRegistry()
    prometheus.register(collector, registry)
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("eventcore_commands_total", (("command", "Transfer"), ("outcome", "rejected")))] == 1
    assert samples[("eventcore_commands_total", (("command", "Deposit"), ("outcome", "succeeded")))] == 1
    assert samples[("eventcore_command_duration_seconds_count", (("command", "Transfer"),))] == 2
    assert samples[("eventcore_command_duration_seconds_bucket", (("command", "Transfer"), ("le", "+Inf")))] == 2
    assert samples[("eventcore_store_operations_total", (("operation", "append"), ("outcome", "ok")))] == 2
    assert samples[("eventcore_events_written_total", ())] == 3
    assert families["eventcore_command_duration_seconds"].type == "histogram"
    buckets = [s for s in families["eventcore_store_operation_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["operation"] == "read"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets) and buckets[-1].value == 3
    if store.scheme == "postgresql":
        assert samples[("eventcore_pool_waiting", (("store", store.url),))] == 0
        assert ("eventcore_pool_connections", (("state", "in_use"), ("store", store.url))) in samples


def test_prometheus_http_endpoint():
    require("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from eventcore.exporters import prometheus

    collector = ec.MetricsCollector()
    store = ec.connect("memory://", metrics=collector)
    ec.execute(store, Deposit(ec.StreamId("h-1"), 1))
    server, thread = prometheus.start_http_server(collector, port=0, addr="127.0.0.1")
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"eventcore_commands", "eventcore_command_duration_seconds", "eventcore_events_written"} <= names


def test_library_runs_without_the_exporters():
    """Neither opentelemetry nor prometheus_client is needed to import and use eventcore (with a collector)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('opentelemetry', 'prometheus_client'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import eventcore as ec\n"
        "c = ec.MetricsCollector()\n"
        "s = ec.connect('memory://', metrics=c)\n"
        "s.append([ec.emit('x', ec.RawEvent('T', b'{}'))])\n"
        "print(c.format_summary())\n"
        "try:\n"
        "    import eventcore.exporters.prometheus\n"
        "except ImportError as e:\n"
        "    print('prometheus:', e)\n"
        "try:\n"
        "    import eventcore.exporters.otel\n"
        "except ImportError as e:\n"
        "    print('otel:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| append" in proc.stdout
    assert "pip install 'pyeventcore[prometheus]'" in proc.stdout and "pip install 'pyeventcore[otel]'" in proc.stdout


def _with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
    else:
        user, host = "postgres", parts.netloc
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, parts.fragment))


def test_no_password_in_log_records(pg_dsn, pg_schema, caplog):
    secret = "s3cr3t-pa55word"
    dsn = _with_password(pg_dsn, secret)
    collector = ec.MetricsCollector()
    with caplog.at_level(logging.DEBUG):
        with ec.connect(dsn, schema=pg_schema, metrics=collector) as store:
            ec.execute(store, Deposit(ec.StreamId("l-1"), 1))
            assert secret not in repr(store) and secret not in store.url and secret not in store.health().url
        # unreachable: the failure is logged and raised, neither with the password
        bad = _with_password("postgresql://app@127.0.0.1:1/nowhere?connect_timeout=1", secret)
        with pytest.raises(ec.StoreUnavailableError) as raised:
            ec.connect(bad, connect_timeout=1)
        assert secret not in str(raised.value)
    records = caplog.records
    assert any(r.name == "eventcore.store.postgres" and "opened PostgreSQL store" in r.getMessage() for r in records)
    assert any(r.name == "eventcore.store.postgres" and "cannot connect" in r.getMessage() for r in records)
    for r in records:
        assert secret not in r.getMessage(), (r.name, r.getMessage())
        assert secret not in str(r.args)
        if r.exc_info:
            assert secret not in logging.Formatter().formatException(r.exc_info)


def test_retry_is_logged_on_the_executor_logger(caplog):
    store = ec.connect("memory://")
    with caplog.at_level(logging.DEBUG, logger="eventcore.executor"):
        from test_metrics import Racing, _INTERFERE

        _INTERFERE["lg-1"] = (store, 1)
        ec.execute(store, Racing(ec.StreamId("lg-1")), retry=ec.RetryPolicy(base_delay=0))
    assert [r.name for r in caplog.records if "retrying" in r.getMessage()] == ["eventcore.executor"]


def test_status_command(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with ec.connect(url) as store:
        ec.execute(store, Deposit(ec.StreamId("st-1"), 1))
    assert main(["status", "--dsn", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK  sqlite store") and f"schema version  {SQLITE_SCHEMA} (this eventcore needs {SQLITE_SCHEMA})" in out
    assert "head position 1" in out and "projections     none recorded" in out
    assert main(["status", "--dsn", url, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is True and d["head_position"] == 1 and d["schema_version"] == SQLITE_SCHEMA and d["pool"] is None


def test_status_command_postgres(pg_dsn, pg_schema, capsys):
    from eventcore.stores.postgres import redact

    secret = "s3cr3t-pa55word"
    dsn = _with_password(pg_dsn, secret)
    sep = "&" if "?" in dsn else "?"
    ec.connect(dsn, schema=pg_schema).close()
    url = f"{dsn}{sep}schema={pg_schema}"
    assert main(["status", "--dsn", url, "--json"]) == 0
    out = capsys.readouterr().out
    assert secret not in out
    d = json.loads(out)
    assert d["ok"] and d["backend"] == "postgresql" and d["schema_version"] == d["schema_expected"]
    assert d["pool"]["size"] >= 1 and d["pool"]["waiting"] == 0
    assert main(["status", "--dsn", url]) == 0
    out = capsys.readouterr().out
    assert "OK  postgresql store" in out and "pool            " in out and secret not in out
    bad = _with_password("postgresql://app@127.0.0.1:1/nowhere?connect_timeout=1", secret)
    assert main(["status", "--dsn", bad, "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is False and d["connected"] is False and secret not in json.dumps(d)
    assert d["url"] == redact(bad)


def test_status_reports_projection_lag(tmp_path, capsys):
    from eventcore.projections import run_projection

    url = f"sqlite:///{tmp_path / 'p.db'}"
    seen = []

    class Counter(ec.Projector):
        name = "counter"

        def handle(self, event, ctx):
            seen.append(event.position)

    with ec.connect(url) as store:
        ec.execute(store, Deposit(ec.StreamId("pl-1"), 1))
        run_projection(store, Counter(), until_caught_up=True)
        ec.execute(store, Deposit(ec.StreamId("pl-1"), 1))
        ec.execute(store, Deposit(ec.StreamId("pl-1"), 1))
        health = store.health()
        collector = ec.MetricsCollector()
        store.attach(collector)
        assert collector.gauges()[store.url]["projections"] == {"counter": 2}
    assert [p["name"] for p in health.projections] == ["counter"] and health.projections[0]["lag"] == 2
    assert main(["status", "--dsn", url]) == 0
    out = capsys.readouterr().out
    assert "projection      counter: " in out and "lag 2 (2 pending" in out


def test_bench_ends_with_the_collector_summary(capsys):
    assert main(["bench", "deposit", "transfer", "--backend", "memory", "--ops", "30", "--no-progress"]) == 0
    out = capsys.readouterr().out
    tail = out[out.index("Metrics collector: key metrics"):]
    assert "| DepositMoney  | 30 " in tail and "| TransferMoney | 30 " in tail and "| append " in tail
    assert "Single-stream commands" not in tail  # it comes last
    assert main(["bench", "deposit", "--backend", "memory", "--ops", "30", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["commands"]["DepositMoney"]["outcomes"]["succeeded"] == 30
    assert report["metrics"]["operations"]["append"]["count"] == 30  # the warm-up is not counted

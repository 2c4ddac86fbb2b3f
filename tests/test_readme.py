"""The README's example is the real file in examples/, and it runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_embeds_the_bank_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "bank.py").read_text().rstrip()
    assert example in readme


def test_bank_example_runs_twice(tmp_path):
    script = ROOT / "examples" / "bank.py"
    for run in (1, 2):
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "transfer wrote 2 events in 1 attempt(s)" in proc.stdout
        assert "refused: insufficient funds in account-bob" in proc.stdout
    assert (tmp_path / "bank.db").exists()


def test_readme_least_privilege_grants_match_the_code():
    import re

    from eventcore.stores.pg_sql import least_privilege_grants

    readme = (ROOT / "README.md").read_text()
    documented = [line.rstrip(";") for line in re.findall(r"^GRANT .*;$", readme, flags=re.M)]
    expected = [g.as_string(None).replace('"', "") for g in least_privilege_grants("eventcore", "app")]
    normalise = lambda text: re.sub(r"\s+", " ", text)  # noqa: E731
    # The README folds the two SELECT grants on streams and schema_migrations into one statement.
    assert sorted(map(normalise, documented)) == sorted(map(normalise, [
        e for e in expected if "streams" not in e and "schema_migrations" not in e
    ] + ["GRANT SELECT ON eventcore.streams, eventcore.schema_migrations TO app"]))


def test_reliability_doc_names_only_tests_that_exist():
    """docs/reliability.md is the map from each promise to its tests: every test it names must exist."""
    import re

    doc = (ROOT / "docs" / "reliability.md").read_text()
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    files = {p.stem for folder in ("tests", "bench") for p in (ROOT / folder).glob("test_*.py")}
    named = set(re.findall(r"\b(test_\w+)", doc)) - files
    assert named and not named - defined, sorted(named - defined)


def _mask(text: str) -> list[str]:
    """Lines of `eventcore status` output with what differs between runs masked: URLs, numbers."""
    import re

    text = re.sub(r"\S+://\S+", "URL", text)
    return [re.sub(r"\d[\d,.]*", "N", line.rstrip()) for line in text.strip().splitlines()]


def test_readme_status_sample_is_real_output(pg_dsn, pg_schema, capsys, tmp_path):
    """The README's `eventcore status` sample is what the command prints (up to URLs and numbers)."""
    import json
    import re

    import eventcore as ec
    from eventcore.cli import main

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"\$ eventcore status --dsn \S+\n(.*?)\n\$ eventcore status --dsn (sqlite:\S+) "
                      r"--json\n(.*?)\n```", readme, flags=re.S)
    assert block, "README: the status sample is missing"
    sample, json_sample = block.group(1), block.group(3)
    url = f"{pg_dsn}{'&' if '?' in pg_dsn else '?'}schema={pg_schema}"
    with ec.connect(url) as store:
        from domain import Deposited

        store.append([ec.emit("account-1", Deposited(amount=5))])
        runner = ec.ProjectionRunner(store, ec.Projector("balances", lambda event, ctx: None),
                                     poll_interval=0.05).start()
        try:
            import time

            for _ in range(200):
                found = ec.projection_status(store, "balances")
                if found and found[0].lag == 0 and found[0].state == "running":
                    break
                time.sleep(0.05)
            capsys.readouterr()
            assert main(["status", "--dsn", url]) == 0
            real = capsys.readouterr().out
        finally:
            runner.stop()
            runner.join(10)
    masked = _mask(real.replace(pg_schema, "bank_events"))
    assert _mask(sample) == masked, real
    shown = json.loads(json_sample.replace(", ...}", "}"))
    ec.connect(f"sqlite:///{tmp_path / 'bank.db'}").close()
    assert main(["status", "--dsn", f"sqlite:///{tmp_path / 'bank.db'}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report)[:len(shown)] == list(shown)
    assert {k: report[k] for k in ("ok", "backend", "connected")} == {k: shown[k] for k in ("ok", "backend", "connected")}

"""The README says what is true: its example is the real file in examples/ and runs, its test command is
what CI runs and runs both implementations, its grants and dependencies are the code's."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_readme_embeds_the_evolution_example_and_its_output(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "evolution.py").read_text().rstrip()
    assert example in readme
    for run in (1, 2):  # the second run reads what the first stored
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "evolution.py")], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "```\n" + proc.stdout in readme, proc.stdout
    proc = subprocess.run([sys.executable, "-m", "eventcore", "types", "--dsn", "sqlite:///evolution.db",
                           "--import", "evolution"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "examples")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout in readme, proc.stdout


def test_readme_least_privilege_grants_match_the_code():
    import re

    from eventcore.stores.postgres import least_privilege_grants

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


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && .venv/bin/pip install '.[test]'")]
    return command


def test_ci_runs_the_readme_test_command_verbatim():
    command = _readme_test_command()
    ci = (ROOT / ".ci" / "run").read_text()
    assert any(line.startswith(command) for line in ci.splitlines()), command


def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("failing", [(), ("c",), ("python",), ("c", "python"), ("pip",)], ids=repr)
def test_readme_test_command_runs_both_implementations_and_fails_if_either_failed(tmp_path, shell, failing):
    """The README's command, run as written, with python3, pip and the venv's python replaced by stubs that
    log each call and fail when told to: every implementation runs whatever failed before it."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    log = tmp_path / "calls.log"
    _stub(bin_dir / "python3", f'echo "python3 $*" >> {log}\n')
    _stub(work / ".venv" / "bin" / "pip", f'echo "pip $*" >> {log}\n[ -e {tmp_path}/fail-pip ] && exit 1\nexit 0\n')
    _stub(work / ".venv" / "bin" / "python",
          f'echo "$EVENTCORE_IMPL $*" >> {log}\n[ -e {tmp_path}/fail-$EVENTCORE_IMPL ] && exit 3\nexit 0\n')
    for name in failing:
        (tmp_path / f"fail-{name}").touch()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("EVENTCORE_IMPL", None)
    proc = subprocess.run([shell, "-c", _readme_test_command()], cwd=work, env=env, capture_output=True, text=True,
                          timeout=30)
    calls = log.read_text().splitlines()
    assert calls[:2] == ["python3 -m venv .venv", "pip install .[test]"], calls
    if "pip" in failing:
        assert calls[2:] == [] and proc.returncode != 0
        return
    assert calls[2:] == ["c -m pytest", "python -m pytest"], calls
    assert (proc.returncode == 0) == (not failing), (failing, proc.returncode, proc.stderr)


def test_the_oldest_msgspec_supported_is_the_one_ci_tests():
    import re

    pyproject = (ROOT / "pyproject.toml").read_text()
    (floor,) = re.findall(r"\"msgspec>=([0-9.]+); python_version < '3.13'\"", pyproject)
    assert f"oldest_msgspec={floor}\n" in (ROOT / ".ci" / "run").read_text()
    assert f"msgspec {floor} or newer" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("distribution,variable",
                         [("psycopg", "oldest_psycopg"), ("psycopg-pool", "oldest_psycopg_pool")])
def test_the_oldest_postgresql_driver_supported_is_the_one_ci_tests(distribution, variable):
    """Every extra that installs the driver names the same floor, .ci/run tests exactly that release, and the
    README says so."""
    import re

    from packaging.version import Version

    pyproject = (ROOT / "pyproject.toml").read_text()
    floors = set(re.findall(rf"\"{re.escape(distribution)}(?:\[\w+\])?>=([0-9.]+)\"", pyproject))
    assert len(floors) == 1, floors
    (ci,) = re.findall(rf"^{variable}=([0-9.]+)$", (ROOT / ".ci" / "run").read_text(), flags=re.M)
    assert Version(ci) == Version(floors.pop())
    assert f"{distribution} {ci} or newer" in (ROOT / "README.md").read_text()

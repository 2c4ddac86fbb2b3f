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

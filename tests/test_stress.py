"""Stress: worker processes x threads of random transfers among 50 accounts, on PostgreSQL and SQLite.

Every invariant is checked after the run (see stress_worker.verify): money
conserved, versions gap-free, no duplicate event id, every transfer one atomic
debit + credit, exactly the transfers the workers saw succeed. No deadlock: a
watchdog fails the run if a worker is still going after it; nothing is timed
otherwise. `-s` prints the report. For a bigger run: python bench/stress.py --help.
"""
from __future__ import annotations

import pytest

import stress_worker

PROCESSES, THREADS, TRANSFERS = 3, 4, 150
#: Generous: the small run takes seconds; only a hang (deadlock, lost wake-up) comes near it.
WATCHDOG_S = 240


def _run(url: str, **options) -> dict:
    report = stress_worker.run_stress(url, options=options, processes=PROCESSES, threads=THREADS,
                                      transfers=TRANSFERS, watchdog=WATCHDOG_S)
    print("\n" + stress_worker.format_report(report))
    ops = PROCESSES * THREADS * TRANSFERS
    assert report["operations"] == ops
    assert report["succeeded"] + report["rejected"] == ops  # no command gave up on conflicts
    assert report["succeeded"] > 0
    return report


def test_stress_sqlite(tmp_path):
    _run(f"sqlite:///{tmp_path / 'stress.db'}", timeout=60)


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "single-commit"])
def test_stress_postgres(pg_dsn, pg_schema, group_commit):
    _run(pg_dsn, schema=pg_schema, pool_size=4, group_commit=group_commit)


def test_stress_verifier_catches_a_broken_transfer(tmp_path):
    """verify() is what proves the invariants: a transfer not written as one atomic append must fail it."""
    import eventcore as ec

    url = f"sqlite:///{tmp_path / 'broken.db'}"
    stress_worker.open_accounts(url, 3)
    with ec.connect(url) as store:
        store.append([ec.emit("account-000", stress_worker.Debited("t1", 5, "account-001"))])
        with pytest.raises(stress_worker.StressFailure, match="money not conserved"):
            stress_worker.verify(url, {}, 3, ["t1"])
        # The credit in an append of its own: the money adds up, but the transfer was not atomic.
        store.append([ec.emit("account-002", stress_worker.AccountOpened(0))])
        store.append([ec.emit("account-001", stress_worker.Credited("t1", 5, "account-000"))])
    with pytest.raises(stress_worker.StressFailure, match="not one append"):
        stress_worker.verify(url, {}, 3, ["t1"])


def test_stress_verifier_catches_a_skipping_reader(tmp_path):
    """A reader of the feed that missed an event (or saw them out of order) fails the run."""
    import eventcore as ec

    url = f"sqlite:///{tmp_path / 'tail.db'}"
    stress_worker.open_accounts(url, 3)
    with ec.connect(url) as store:
        ids = [e.event_id for e in store.read_all()]
    assert stress_worker.verify(url, {}, 3, [], ids)["tailed"] == 3
    for seen in (ids[:1] + ids[2:], ids[::-1]):
        with pytest.raises(stress_worker.StressFailure, match="following the feed"):
            stress_worker.verify(url, {}, 3, [], seen)

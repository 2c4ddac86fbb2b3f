"""Aids for testing and benchmarking eventcore and applications built on it; not a store backend.

- `TemporaryCluster` (eventcore.testing.pgcluster): a private, throwaway PostgreSQL server from the
  installed binaries, for tests and `eventcore bench` when no DSN is given.
- the pytest plugin (eventcore.testing.pytest_plugin, loaded by pytest through its entry point): fixtures
  `eventcore_store`, `eventcore_store_factory`, `eventcore_backend`, `eventcore_postgres_url`. Not imported
  here: it needs pytest, which `eventcore bench` does not.
"""
from __future__ import annotations

from .pgcluster import TemporaryCluster, find_pg_bindir

__all__ = ["TemporaryCluster", "find_pg_bindir"]

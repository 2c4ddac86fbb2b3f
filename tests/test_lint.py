"""Static checks as a test: undefined names, unused imports and the like fail the suite."""
from __future__ import annotations

from pathlib import Path

from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parent.parent


class _Collect:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        if text.strip():
            self.lines.append(text.strip())


def test_pyflakes_finds_nothing():
    out = _Collect()
    reporter = Reporter(out, out)
    files = sorted(p for d in ("src", "tests", "bench", "examples") for p in (ROOT / d).rglob("*.py"))
    assert files
    for path in files:
        checkPath(str(path), reporter)
    assert out.lines == []

"""Optional test dependencies: skipped locally when missing, a failure under CI=true (where `.[test]`
installs them all), so a broken install can never pass CI by skipping."""
from __future__ import annotations

import importlib
import os

import pytest


def require(module: str):
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)

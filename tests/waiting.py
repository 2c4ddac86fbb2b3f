"""Waiting for a condition in tests: polls, and fails only on a hang (nothing is timed)."""
from __future__ import annotations

import time

#: Bounds a hang, never a speed: every wait gives up (and fails the test) after this long.
HANG = 60.0


def wait_until(cond, what: str = "condition", timeout: float = HANG):
    """Poll `cond` until it returns something true, and return that; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)

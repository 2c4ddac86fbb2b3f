"""Picks the hot-path implementation: compiled (Cython, `c`) or pure Python (`python`).

EVENTCORE_IMPL=c       the compiled extension; ImportError if it cannot load
EVENTCORE_IMPL=python  the pure-Python twins
unset or empty         the best available: compiled if it loads, else Python

Modules elsewhere import the hot-path functions from here, never from
`_pure` directly, so the switch covers every caller.
"""
from __future__ import annotations

import os

from ._pure import codec as _codec, copy as _copy, ids as _ids, versions as _versions

_requested = os.environ.get("EVENTCORE_IMPL", "").strip().lower()
if _requested not in ("", "c", "python"):
    raise ImportError(f"EVENTCORE_IMPL must be 'c', 'python' or empty, not {_requested!r}")

encode_event = _codec.encode_event
encode_metadata = _codec.encode_metadata
decode_rows = _codec.decode_rows
new_event_ids = _ids.new_event_ids
check_expected_versions = _versions.check_expected_versions
assign_versions = _versions.assign_versions
encode_copy_rows = _copy.encode_copy_rows
encode_copy_events = _copy.encode_copy_events

IMPL = "python"

if _requested in ("", "c"):
    try:
        from . import _speedups  # type: ignore[attr-defined]  # compiled from ext/ (hot-path issue)
    except ImportError as exc:
        if _requested == "c":
            raise ImportError(
                "EVENTCORE_IMPL=c was requested but the compiled extension eventcore._speedups "
                f"cannot be imported ({exc}). This build of eventcore has no compiled hot path: "
                "install a wheel or build from source with Cython and a C compiler, or set "
                "EVENTCORE_IMPL=python (or leave it empty for the best available)."
            ) from exc
    else:
        encode_event = _speedups.encode_event
        encode_metadata = _speedups.encode_metadata
        decode_rows = _speedups.decode_rows
        new_event_ids = _speedups.new_event_ids
        check_expected_versions = _speedups.check_expected_versions
        assign_versions = _speedups.assign_versions
        encode_copy_rows = _speedups.encode_copy_rows
        encode_copy_events = _speedups.encode_copy_events
        IMPL = "c"

"""Pure-Python hot path: the executable specification of the compiled extension.

Each module here has a Cython twin of the same name under ext/ (codec.py and
ext/codec.pxi, and so on), with the same functions, signatures and behaviour;
both satisfy `eventcore._impl.HotPath`, and `eventcore._impl` picks one set or
the other according to EVENTCORE_IMPL. This package, like `eventcore._speedups`,
exposes the functions at its top level. What both twins share (payload checks,
byte formats) is not here but in `eventcore.payloads`, `eventcore.utf8` and
`eventcore.formats`.
"""
from .codec import decode_rows, encode_event, encode_metadata
from .columns import decode_copy_columns, encode_column_payloads, fill_columns
from .copy import copy_from_result, decode_copy, encode_copy_events, encode_copy_rows
from .ids import new_event_ids
from .versions import assign_versions, check_expected_versions

__all__ = [
    "encode_event",
    "encode_metadata",
    "decode_rows",
    "decode_copy",
    "copy_from_result",
    "new_event_ids",
    "check_expected_versions",
    "assign_versions",
    "encode_copy_rows",
    "encode_copy_events",
    "encode_column_payloads",
    "fill_columns",
    "decode_copy_columns",
]

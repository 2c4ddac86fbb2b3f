# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled hot path of eventcore: the twin of eventcore._pure (same names, same behaviour).

encode_event / encode_metadata   msgspec JSON payloads
decode_rows                      stored rows -> RecordedEvent
decode_copy                      a binary COPY stream of stored events -> RecordedEvent
new_event_ids                    UUIDv7, 16 bytes each
check_expected_versions          expected-version checks under the write lock
assign_versions                  per-stream version assignment for a batch
encode_copy_rows                 COPY BINARY framing of pre-encoded rows
encode_copy_events               ids + versions + msgspec payloads + framing, fused, for ingestion
encode_column_payloads           JSON payloads written from numpy columns (store.ingest_columns)
fill_columns                     RecordedEvents written into numpy columns (store.read_columns)

Buffers are sized once per call and written through a raw pointer; every
length is checked before it is written, so bad input raises a typed error
(SerializationError, ConcurrencyError) and never writes out of bounds.
"""
# One extension assembled from one file per module of src/eventcore/_pure (codec.pxi is the twin
# of _pure/codec.py, and so on), as psycopg_c assembles its parts: one import for eventcore._impl
# to try, cdef helpers shared without a C-API between modules, and the UUIDv7 clock and counter
# of ids.pxi kept by both new_event_ids and encode_copy_events. formats.pxi and payloads.pxi are
# the C side of the modules both twins share (eventcore.formats, eventcore.payloads).

include "formats.pxi"
include "payloads.pxi"
include "codec.pxi"
include "ids.pxi"
include "versions.pxi"
include "copy.pxi"
include "columns.pxi"

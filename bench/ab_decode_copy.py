"""decode_copy (C) of 1M current events, A/B in one process: the extension of an eventcore from before type
versions against this one, alternating, 7 rounds each (no server: the decoding alone).

    python bench/ab_decode_copy.py OLD_EXTENSION.so

OLD_EXTENSION.so: eventcore/_speedups*.so built from the earlier commit (e.g. `git archive <commit> | tar -x
-C /tmp/old && cd /tmp/old && pip install -e .` in a venv of its own). It reads the 8-field rows of its time,
this one the 9-field rows with the type version sent as the store sends it (NULL for 1) and as written (1).
"""
import gc
import importlib.util
import struct
import sys
import time

import eventcore as ec
import eventcore.formats as F
from eventcore import _speedups as new
from eventcore.formats import COPY_HEADER, COPY_TRAILER

spec = importlib.util.spec_from_file_location("eventcore._speedups", sys.argv[1])
F.COPY_FIELDS = 8  # the old extension copies its constants from eventcore.formats when it loads
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
F.COPY_FIELDS = 9
assert old is not new


class EvoCurrent(ec.Event):
    __event_type__ = "bench.evo.Current"
    account: str
    amount: int
    note: str

N = 1_000_000
sids = [f"acct-{i % 1000}" for i in range(N)]
ids = new.new_event_ids(N)
payloads = [new.encode_event(EvoCurrent(f"a{i % 1000}", i, "deposit"))[1] for i in range(N)]
buf9 = bytearray(COPY_HEADER)
new.encode_copy_rows(buf9, 1, sids, list(range(1, N + 1)), ids, ["bench.evo.Current"] * N, [1] * N, payloads, [None] * N, 1_700_000_000_000_000)
buf9 += COPY_TRAILER
buf9 = bytes(buf9)
# the store's reads send version 1 as NULL: each row's last field (length 2, value 1) becomes length -1
row_tail = struct.pack(">ih", 2, 1)
buf9null = buf9.replace(row_tail + b"\x00\x09", struct.pack(">i", -1) + b"\x00\x09")
buf9null = buf9null[:-8] + struct.pack(">i", -1) + COPY_TRAILER if buf9null.endswith(row_tail + COPY_TRAILER) else buf9null
# the 8-field layout of before: drop the type version field, field count 8
buf8 = buf9null.replace(struct.pack(">i", -1) + b"\x00\x09", b"\x00\x08")
buf8 = COPY_HEADER + b"\x00\x08" + buf8[len(COPY_HEADER) + 2:]
buf8 = buf8[:-6] + COPY_TRAILER if buf8.endswith(struct.pack(">i", -1) + COPY_TRAILER) else buf8
assert len(old.decode_copy(buf8)) == N and len(new.decode_copy(buf9null)) == N
res = {"before (8 fields)": [], "now (version NULL)": [], "now (version 1 sent)": []}
for r in range(7):
    for name, f, b in (("before (8 fields)", old.decode_copy, buf8), ("now (version NULL)", new.decode_copy, buf9null),
                       ("now (version 1 sent)", new.decode_copy, buf9)):
        gc.collect()
        t = time.perf_counter(); out = f(b); res[name].append(time.perf_counter() - t); del out
for name, ts in res.items():
    ts.sort(); print(f"{name:24s} median {ts[3]:.3f} s  min {ts[0]:.3f} s  ({ts[3] / N * 1e9:.0f} ns/event)")

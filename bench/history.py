"""History pages (``GET .../readings``) with 10 thousand and with 1 million stored events.

Fills an SQLite store (the same schema and migrations the daemon uses) with
events of 100 devices in 10 tags, then times one page of 100 through the
code the REST handler runs in the store thread (:func:`iotd.web.history._read`:
the window, the retention watermark and the indexed page) for a device, a
tag (10 devices) and the whole tenant, newest first and from an ``after``
in the middle.  Row ``iotd`` is the median milliseconds per page at 1M
events; ``peer`` is the same page at 10k events ("a page costs the same with
10 million events as with 10 thousand": ratio ≈ 1).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from _common import machine, median, today
from iotd.store import open_sync
from iotd.web.history import _read
from iotd.web.history_query import Window

DEVICES, TAGS = 100, 10
CASES = {  # name -> (kinds, devices, after-the-middle?)
    "device": (("reading",), ["D0007"], False),
    "device after": (("reading",), ["D0007"], True),
    "tag": (("reading",), [f"D{n:04d}" for n in range(3, DEVICES, TAGS)], False),
    "tenant": (("reading",), None, False),
    "tenant after": (("reading",), None, True),
}


def fill(path: str, count: int) -> None:
    conn = open_sync(path)
    start_us = int(time.time() * 1e6) - count
    batch = []
    for n in range(count):
        kind = "reading" if n % 2 else "packet"
        data = {"data": {"t": n}} if kind == "reading" else {"payload": {"n": n}, "payload_encoding": "json"}
        batch.append((n + 1, "default", kind, f"D{n % DEVICES:04d}", start_us + n, json.dumps(data)))
        if len(batch) == 50000 or n == count - 1:
            conn.executemany("INSERT INTO events (id, tenant, kind, device, inserted_us, data) VALUES (?,?,?,?,?,?)",
                             batch)
            batch = []
    conn.execute("UPDATE event_seq SET last_id = ?, last_us = ? WHERE id = 1", (count, start_us + count))
    conn.commit()
    conn.close()


def time_pages(path: str, count: int, rounds: int) -> dict[str, float]:
    conn = open_sync(path)
    out = {}
    for name, (kinds, devices, after) in CASES.items():
        window = Window(low=count // 2 if after else None, high=None, desc=not after, limit=100)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            resolved, rows = _read(conn, "default", kinds, devices, window)
            times.append((time.perf_counter() - t0) * 1000)
            assert len(rows) >= 50, (name, len(rows))
        out[name] = median(times)
    conn.close()
    return out


def run(quick: bool) -> list[dict]:
    big = 20_000 if quick else 1_000_000
    rounds = 5 if quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        small_path, big_path = os.path.join(tmp, "small.sqlite3"), os.path.join(tmp, "big.sqlite3")
        fill(small_path, 10_000)
        fill(big_path, big)
        small, large = time_pages(small_path, 10_000, rounds), time_pages(big_path, big, rounds)
    label = "1M" if not quick else "20k"
    return [{"name": f"history page of 100 ({name}, {label} events)", "unit": "ms", "iotd": large[name],
             "peer_name": "same page, 10k events", "peer": small[name],
             "ratio": large[name] / small[name] if small[name] else None,
             "machine": machine(), "date": today()} for name in CASES]

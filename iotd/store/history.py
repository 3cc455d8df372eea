"""SQL for reading history pages (``GET .../packets``, ``.../readings``, ``.../events``).

A page is the ``limit`` events nearest to one end of an id window
``(low, high)`` (both exclusive, either open), oldest or newest first.
Chosen so that a page costs the same however many events are stored: the
window is cut into one sub-query per ``(device, kind)`` pair — or per kind
for the whole tenant — each an ``ORDER BY id LIMIT n`` range scan of
``events_by_device (tenant, device, kind, id)`` or ``events_by_kind
(tenant, kind, id)``, glued with ``UNION ALL`` (:data:`PAIRS_PER_QUERY` pairs
per statement), and the few rows they bring are merged here.  A page thus
reads at most ``pairs x limit`` index entries, never the events between.

The retention watermark: :func:`iotd.store.events.prune` records the newest
``(id, inserted_us)`` it removed in ``meta`` (``events_pruned_through``);
:func:`pruned_through` reads it, so a page can say ``pruned``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from iotd.store.events import Row

PAIRS_PER_QUERY = 50
_COLUMNS = "id, tenant, kind, device, inserted_us, data"


def page(conn: Any, tenant: str, kinds: Iterable[str], devices: Iterable[str] | None,
         low: int | None, high: int | None, limit: int, desc: bool) -> list[Row]:
    """Up to ``limit`` events of ``tenant``, ``kinds`` (and ``devices``; None: all) with
    ``low < id < high``, newest first when ``desc``."""
    kinds = sorted(set(kinds))
    if devices is None:
        pairs: list[tuple[str | None, str]] = [(None, k) for k in kinds]
    else:
        pairs = [(d, k) for d in sorted(set(devices)) for k in kinds]
    rows: list[Row] = []
    for start in range(0, len(pairs), PAIRS_PER_QUERY):
        rows.extend(_run(conn, tenant, pairs[start:start + PAIRS_PER_QUERY], low, high, limit, desc))
        rows.sort(key=lambda r: r[0], reverse=desc)
        del rows[limit:]
    return rows


def _run(conn: Any, tenant: str, pairs: list[tuple[str | None, str]], low: int | None,
         high: int | None, limit: int, desc: bool) -> list[Row]:
    parts, params = [], []
    order = "DESC" if desc else "ASC"
    for index, (device, kind) in enumerate(pairs):
        where = "tenant = ? AND kind = ?"
        params.extend([tenant, kind])
        if device is not None:
            where += " AND device = ?"
            params.append(device)
        if low is not None:
            where += " AND id > ?"
            params.append(low)
        if high is not None:
            where += " AND id < ?"
            params.append(high)
        params.append(limit)
        parts.append(f"SELECT * FROM (SELECT {_COLUMNS} FROM events WHERE {where} "
                     f"ORDER BY id {order} LIMIT ?) AS p{index}")
    sql = " UNION ALL ".join(parts)
    return [(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in conn.execute(sql, params)]


def first_id_at_or_after(conn: Any, micros: int) -> int | None:
    """The id of the first event stamped at or after ``micros`` (None if none), by ``events_by_time``."""
    row = conn.execute("SELECT min(inserted_us) FROM events WHERE inserted_us >= ?", (micros,)).fetchone()
    if row[0] is None:
        return None
    return conn.execute("SELECT id FROM events WHERE inserted_us = ?", (row[0],)).fetchone()[0]


def pruned_through(conn: Any) -> tuple[int, int]:
    """``(id, inserted_us)`` of the newest event retention removed (``(0, 0)``: none yet)."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'events_pruned_through'").fetchone()
    if row is None:
        return 0, 0
    event_id, micros = row[0].split()
    return int(event_id), int(micros)

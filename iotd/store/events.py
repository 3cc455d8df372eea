"""SQL for the event log.

``inserted_us`` strictly increases with ``id``: each insert takes the later
of the wall clock and the last stamp plus one microsecond, inside the
writer's transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Iterable

Row = tuple[int, str, str, str, int, dict[str, Any]]  # id, tenant, kind, device, inserted_us, data


def insert(conn: sqlite3.Connection, items: list[tuple[str, str, str, dict]]) -> list[Row]:
    """Insert ``(tenant, kind, device, data)`` items; returns the stored rows."""
    last = conn.execute("SELECT max(inserted_us) FROM events").fetchone()[0] or 0
    now = int(time.time() * 1_000_000)
    rows: list[Row] = []
    for tenant, kind, device, data in items:
        stamp = now if now > last else last + 1
        last = stamp
        cur = conn.execute(
            "INSERT INTO events (tenant, kind, device, inserted_us, data) VALUES (?, ?, ?, ?, ?)",
            (tenant, kind, device, stamp, json.dumps(data, separators=(",", ":"))),
        )
        rows.append((cur.lastrowid, tenant, kind, device, stamp, data))
    return rows


def last_id_at_or_before(conn: sqlite3.Connection, micros: int) -> int:
    """The id of the last event stamped at or before ``micros`` (0 if none)."""
    row = conn.execute("SELECT max(id) FROM events WHERE inserted_us <= ?", (micros,)).fetchone()
    return row[0] or 0


def last_id(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT max(id) FROM events").fetchone()[0] or 0


def read(
    conn: sqlite3.Connection,
    tenant: str,
    kinds: Iterable[str],
    after_id: int,
    limit: int,
    devices: Iterable[str] | None = None,
    upto_id: int | None = None,
) -> list[Row]:
    """Events of ``tenant`` and ``kinds`` with ``id > after_id``, oldest first."""
    kinds = list(kinds)
    sql = (
        "SELECT id, tenant, kind, device, inserted_us, data FROM events "
        f"WHERE tenant = ? AND kind IN ({','.join('?' * len(kinds))}) AND id > ?"
    )
    params: list[Any] = [tenant, *kinds, after_id]
    if upto_id is not None:
        sql += " AND id <= ?"
        params.append(upto_id)
    if devices is not None:
        devices = list(devices)
        if not devices:
            return []
        sql += f" AND device IN ({','.join('?' * len(devices))})"
        params.extend(devices)
    sql += " ORDER BY id LIMIT ?"
    params.append(limit)
    return [
        (r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in conn.execute(sql, params)
    ]


def get(conn: sqlite3.Connection, event_id: int) -> Row | None:
    r = conn.execute(
        "SELECT id, tenant, kind, device, inserted_us, data FROM events WHERE id = ?", (event_id,)
    ).fetchone()
    return (r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) if r else None


def prune(conn: sqlite3.Connection, before_us: int) -> int:
    return conn.execute("DELETE FROM events WHERE inserted_us < ?", (before_us,)).rowcount

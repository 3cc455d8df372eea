"""SQL for the event log.

Ids and stamps come from the counter row ``event_seq`` (schema 3), updated in
the inserting transaction: ``UPDATE ... SET last_id = last_id + n RETURNING``
row-locks it until commit, so on both backends (and across nodes sharing one
PostgreSQL) ids are allocated in commit order with no holes (a rolled-back
insert rolls its ids back too).  ``inserted_us`` strictly increases with
``id``: the first event of a call takes the later of the wall clock and the
last stamp plus one microsecond, the next ones one microsecond more each; the
last stamp is kept in the same row, so stamps never go backwards.

A reading's ``packet_id`` is checked in the same transaction as the insert
(the check and the write are atomic): it must name a packet of the same
tenant and device, else :class:`iotd.errors.ItemInvalid` (a 422 naming the
item) fails the whole call and nothing of it is stored.

Stored ``data`` is always JSON that can be sent again.  The REST door
refuses lone surrogates, NaN and Infinity (:mod:`iotd.jsonsafe`); should
another writer pass one anyway, it is stored (and returned) with that value
replaced, and logged, rather than poisoning every later replay.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from iotd import errors, jsonsafe
from iotd.logs import Logger

Row = tuple[int, str, str, str, int, dict[str, Any]]  # id, tenant, kind, device, inserted_us, data

log = Logger()


def insert(conn: Any, items: list[tuple[str, str, str, dict]]) -> list[Row]:
    """Insert ``(tenant, kind, device, data)`` items; returns the stored rows.

    Raises :class:`iotd.errors.ItemInvalid` (nothing of the call is kept: the writer
    rolls the call's savepoint back) for a reading whose ``packet_id`` is not
    a packet of the same tenant and device.
    """
    count = len(items)
    if not count:
        return []
    now = int(time.time() * 1_000_000)
    last_id, last_us = conn.execute(
        "UPDATE event_seq SET last_id = last_id + ?, "
        "last_us = CASE WHEN last_us < ? THEN ? ELSE last_us + 1 END + ? "
        "WHERE id = 1 RETURNING last_id, last_us",
        (count, now, now, count - 1),
    ).fetchone()
    first_id, first_us = last_id - count + 1, last_us - count + 1
    rows: list[Row] = []
    packets: set[tuple[str, str, int]] = set()  # checked already in this call
    for index, (tenant, kind, device, data) in enumerate(items):
        if kind == "reading" and data.get("packet_id") is not None:
            _check_packet(conn, packets, index, tenant, device, data["packet_id"])
        text, data = _text(data)
        event_id, stamp = first_id + index, first_us + index
        conn.execute(
            "INSERT INTO events (id, tenant, kind, device, inserted_us, data) VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, tenant, kind, device, stamp, text),
        )
        rows.append((event_id, tenant, kind, device, stamp, data))
    return rows


def _check_packet(conn: Any, seen: set, index: int, tenant: str, device: str,
                  packet_id: int) -> None:
    if (tenant, device, packet_id) in seen:
        return
    found = conn.execute(
        "SELECT 1 FROM events WHERE tenant = ? AND device = ? AND kind = 'packet' AND id = ?",
        (tenant, device, packet_id),
    ).fetchone()
    if found is None:
        raise errors.ItemInvalid(index, f"packet_id {packet_id} is not a packet of device {device}")
    seen.add((tenant, device, packet_id))


def _text(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``data`` as stored JSON text, and the data the text holds."""
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")  # a lone surrogate cannot be stored as UTF-8
        return text, data
    except (ValueError, RecursionError):
        log.error("an event held a value that is not JSON (a lone surrogate, NaN, Infinity or deep "
                  "nesting): stored with it replaced")
        data = jsonsafe.scrub(data)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False), data


def last_id_at_or_before(conn: Any, micros: int) -> int:
    """The id of the last event stamped at or before ``micros`` (0 if none)."""
    row = conn.execute("SELECT max(id) FROM events WHERE inserted_us <= ?", (micros,)).fetchone()
    return row[0] or 0


def last_id(conn: Any) -> int:
    """The last event id allocated (every event up to it is committed or pruned)."""
    return conn.execute("SELECT last_id FROM event_seq WHERE id = 1").fetchone()[0]


def read(
    conn: Any,
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


def read_all(conn: Any, after_id: int, limit: int) -> list[Row]:
    """Up to ``limit`` events of every tenant with ``id > after_id``, in id order (filling holes)."""
    cur = conn.execute(
        "SELECT id, tenant, kind, device, inserted_us, data FROM events WHERE id > ? ORDER BY id LIMIT ?",
        (after_id, limit),
    )
    return [(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in cur.fetchall()]


def get(conn: Any, event_id: int) -> Row | None:
    r = conn.execute(
        "SELECT id, tenant, kind, device, inserted_us, data FROM events WHERE id = ?", (event_id,)
    ).fetchone()
    return (r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) if r else None


def prune(conn: Any, before_us: int) -> int:
    """Remove events stamped before ``before_us``; the newest removed ``(id, inserted_us)`` is
    kept in ``meta`` as ``events_pruned_through`` (what history's ``pruned`` is told by)."""
    newest = conn.execute("SELECT max(inserted_us) FROM events WHERE inserted_us < ?", (before_us,)).fetchone()[0]
    if newest is None:
        return 0
    newest_id = conn.execute("SELECT id FROM events WHERE inserted_us = ?", (newest,)).fetchone()[0]
    removed = conn.execute("DELETE FROM events WHERE inserted_us < ?", (before_us,)).rowcount
    value = f"{newest_id} {newest}"
    if not conn.execute("UPDATE meta SET value = ? WHERE name = 'events_pruned_through'", (value,)).rowcount:
        conn.execute("INSERT INTO meta (name, value) VALUES ('events_pruned_through', ?)", (value,))
    return removed

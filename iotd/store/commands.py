"""SQL for the push command queue (table ``commands``).

Plain functions ``fn(conn, ...)`` run by :class:`iotd.store.Store`; the
command service (:mod:`iotd.commands`) keeps unfinished commands in memory
and writes every transition through these.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from iotd.store import events as evsql

UNFINISHED = ("queued", "sent")
STATES = ("queued", "sent", "done", "failed", "cancelled")

COLUMNS = ("id, tenant, device, status, verb, endpoint, body, content_type, query_string, attempts, "
           "created_us, sent_us, finished_us, response_raw, response, error")

# A row as returned by the reads below, in COLUMNS order.
Row = tuple[Any, ...]


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def insert(conn: sqlite3.Connection, tenant: str, device: str, verb: str | None, endpoint: str,
           body: Any, has_body: bool, content_type: str | None, query_string: str | None,
           created_us: int) -> int:
    """Queue a command; returns its id."""
    cur = conn.execute(
        "INSERT INTO commands (tenant, device, status, verb, endpoint, body, content_type, query_string, "
        "attempts, created_us) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, 0, ?) RETURNING id",
        (tenant, device, verb, endpoint, _json(body) if has_body else None, content_type, query_string,
         created_us),
    )
    return cur.fetchone()[0]


def mark_sent(conn: sqlite3.Connection, command_id: int, attempts: int, sent_us: int) -> None:
    conn.execute("UPDATE commands SET status = 'sent', attempts = ?, sent_us = ? WHERE id = ?",
                 (attempts, sent_us, command_id))


def finish(conn: sqlite3.Connection, command_id: int, status: str, finished_us: int,
           response_raw: str | None, response_json: str | None, error: str | None) -> None:
    """Record the end of a command (done, failed or cancelled)."""
    conn.execute(
        "UPDATE commands SET status = ?, finished_us = ?, response_raw = ?, response = ?, error = ? "
        "WHERE id = ?",
        (status, finished_us, response_raw, response_json, error, command_id),
    )


def apply(conn: sqlite3.Connection, changes: list[tuple], events: list[tuple[str, str, str, dict]]) -> list[evsql.Row]:
    """Apply a batch of transitions and insert their events, in one transaction.

    ``changes`` are ``("sent", id, attempts, sent_us)`` and ``("finish", id,
    status, finished_us, response_raw, response_json, error)``; ``events`` are
    event-log items as for :func:`iotd.store.events.insert`, whose rows are
    returned (the caller publishes them after the commit).
    """
    for change in changes:
        if change[0] == "sent":
            mark_sent(conn, *change[1:])
        elif change[0] == "finish":
            finish(conn, *change[1:])
        else:
            raise ValueError(f"unknown command change {change[0]!r}")
    return evsql.insert(conn, events) if events else []


def load_unfinished(conn: sqlite3.Connection) -> list[Row]:
    """Every queued or sent command, oldest first (loaded at start)."""
    return conn.execute(
        f"SELECT {COLUMNS} FROM commands WHERE status IN ('queued', 'sent') ORDER BY id"
    ).fetchall()


def count_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM commands GROUP BY status").fetchall())


def get(conn: sqlite3.Connection, command_id: int) -> Row | None:
    return conn.execute(f"SELECT {COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()


def list_for_device(conn: sqlite3.Connection, tenant: str, device: str, status: str | None,
                    after: int, limit: int) -> list[Row]:
    """Up to ``limit`` commands of one device with ``id > after``, oldest first."""
    sql = f"SELECT {COLUMNS} FROM commands WHERE tenant = ? AND device = ?"
    params: list[Any] = [tenant, device]
    if status is not None:
        sql += " AND status = ?"
        params.append(status)
    sql += " AND id > ? ORDER BY id LIMIT ?"
    params += [after, limit]
    return conn.execute(sql, params).fetchall()

"""SQL for the push command queue (table ``commands``).

Plain functions ``fn(conn, ...)`` run by :class:`iotd.store.Store`; the
decisions that use them (which command a poll gets, whether a result
completes one) are :mod:`iotd.push.transactions`, the states and which
transition starts from which are :mod:`iotd.push.state`.  Nothing here
writes events: the event log does, in the same transaction
(:meth:`iotd.events.EventLog.transact`).

Portable SQL: ``?`` placeholders (a PostgreSQL connection wrapper turns them
into ``%s``), ``INSERT ... RETURNING`` instead of ``lastrowid``, no
SQLite-only syntax.  Every change of status is ``UPDATE ... WHERE id = ? AND
status IN (...)`` (plus the attempt it expects) and reports whether it
changed the row, so a change that another process made first is seen, not
overwritten.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

UNFINISHED = ("queued", "sent")

COLUMNS = ("id, tenant, device, status, verb, endpoint, body, content_type, query_string, attempts, "
           "created_us, sent_us, finished_us, response_raw, response, error, expires_us, batch, result_raw, "
           "result_encoding, error_detail, sent_uuid, result_uuid")

# A row as returned by the reads below, in COLUMNS order.
Row = tuple[Any, ...]


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _in(values: Iterable[str]) -> tuple[str, list[str]]:
    values = list(values)
    return "(" + ", ".join("?" * len(values)) + ")", values


def lock_device(conn: Any, tenant: str, device: str) -> bool:
    """Lock the device's row for the rest of the transaction; False when there is no such device.

    PostgreSQL: ``SELECT ... FOR UPDATE`` (two nodes polling one device queue up
    here).  SQLite: the writer's ``BEGIN IMMEDIATE`` already serialises every
    write transaction (of every process on the file), so there is nothing to
    lock and no statement is run (True: the caller reads the device's commands
    next anyway).
    """
    if getattr(conn, "dialect", "sqlite") != "postgresql":
        return True
    sql = "SELECT 1 FROM devices WHERE tenant = ? AND identifier = ? FOR UPDATE"
    return conn.execute(sql, (tenant, device)).fetchone() is not None


def insert(conn: Any, tenant: str, device: str, verb: str | None, endpoint: str, body: Any,
           has_body: bool, content_type: str | None, query_string: str | None, created_us: int,
           expires_us: int | None = None, batch: int | None = None) -> int:
    """Queue a command; returns its id."""
    return conn.execute(
        "INSERT INTO commands (tenant, device, status, verb, endpoint, body, content_type, query_string, "
        "attempts, created_us, expires_us, batch) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, 0, ?, ?, ?) RETURNING id",
        (tenant, device, verb, endpoint, _json(body) if has_body else None, content_type, query_string,
         created_us, expires_us, batch),
    ).fetchone()[0]


def insert_batch(conn: Any, batch: int, tenant: str, created_us: int, total: int) -> None:
    """Record a bulk request; its id is the id of its first command."""
    conn.execute("INSERT INTO command_batches (id, tenant, created_us, total) VALUES (?, ?, ?, ?)",
                 (batch, tenant, created_us, total))


def set_batch(conn: Any, command_id: int, batch: int) -> None:
    conn.execute("UPDATE commands SET batch = ? WHERE id = ?", (batch, command_id))


def get_batch(conn: Any, batch: int) -> tuple[int, str, int, int] | None:
    """``(id, tenant, created_us, total)`` of a bulk request."""
    return conn.execute("SELECT id, tenant, created_us, total FROM command_batches WHERE id = ?",
                        (batch,)).fetchone()


def batch_counts(conn: Any, batch: int) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM commands WHERE batch = ? GROUP BY status",
                             (batch,)).fetchall())


def list_for_batch(conn: Any, batch: int, after: int, limit: int) -> list[tuple[int, str, str]]:
    """``(id, device, status)`` of up to ``limit`` commands of a batch with ``id > after``."""
    return conn.execute("SELECT id, device, status FROM commands WHERE batch = ? AND id > ? ORDER BY id LIMIT ?",
                        (batch, after, limit)).fetchall()


def oldest_unfinished(conn: Any, tenant: str, device: str) -> Row | None:
    """The device's oldest queued or sent command (the one ``/push`` is about)."""
    return conn.execute(
        f"SELECT {COLUMNS} FROM commands WHERE tenant = ? AND device = ? AND status IN ('queued', 'sent') "
        "ORDER BY id LIMIT 1", (tenant, device)).fetchone()


def two_oldest_unfinished(conn: Any, tenant: str, device: str) -> list[Row]:
    """The device's two oldest queued or sent commands (the one a result is for, and whether more wait)."""
    return conn.execute(
        f"SELECT {COLUMNS} FROM commands WHERE tenant = ? AND device = ? AND status IN ('queued', 'sent') "
        "ORDER BY id LIMIT 2", (tenant, device)).fetchall()


def has_unfinished(conn: Any, tenant: str, device: str) -> bool:
    return conn.execute(
        "SELECT 1 FROM commands WHERE tenant = ? AND device = ? AND status IN ('queued', 'sent') LIMIT 1",
        (tenant, device)).fetchone() is not None


def mark_sent(conn: Any, command_id: int, sources: Iterable[str], attempts: int, sent_us: int,
              uuid: str | None = None) -> bool:
    """One more send of a command that is in one of ``sources`` with ``attempts`` sends so far."""
    where, params = _in(sources)
    cur = conn.execute(
        "UPDATE commands SET status = 'sent', attempts = attempts + 1, sent_us = ?, sent_uuid = ? "
        f"WHERE id = ? AND status IN {where} AND attempts = ?",
        (sent_us, uuid, command_id, *params, attempts))
    return cur.rowcount == 1


def finish(conn: Any, command_id: int, sources: Iterable[str], status: str, finished_us: int,
           response_raw: str | None, response_json: str | None, error: str | None,
           attempts: int | None = None, sent_us: int | None = None, result_raw: str | None = None,
           result_encoding: str | None = None, error_detail: str | None = None,
           result_uuid: str | None = None) -> bool:
    """End a command that is in one of ``sources`` (and, when given, at that attempt and send)."""
    where, params = _in(sources)
    sql = ("UPDATE commands SET status = ?, finished_us = ?, response_raw = ?, response = ?, error = ?, "
           f"result_raw = ?, result_encoding = ?, error_detail = ?, result_uuid = ? WHERE id = ? AND status IN {where}")
    args: list[Any] = [status, finished_us, response_raw, response_json, error, result_raw, result_encoding,
                       error_detail, result_uuid, command_id, *params]
    if attempts is not None:
        sql += " AND attempts = ?"
        args.append(attempts)
    if sent_us is not None:
        sql += " AND sent_us = ?"
        args.append(sent_us)
    return conn.execute(sql, args).rowcount == 1


def cancel_queued_of_device(conn: Any, tenant: str, device: str, finished_us: int, error: str) -> list[int]:
    """Cancel every queued command of one device; returns their ids."""
    rows = conn.execute(
        "UPDATE commands SET status = 'cancelled', finished_us = ?, error = ? "
        "WHERE tenant = ? AND device = ? AND status = 'queued' RETURNING id",
        (finished_us, error, tenant, device)).fetchall()
    return sorted(r[0] for r in rows)


def unfinished(conn: Any) -> list[tuple[int, str, str, str]]:
    """``(id, tenant, device, status)`` of every queued or sent command (what has work, and waits)."""
    return conn.execute(
        "SELECT id, tenant, device, status FROM commands WHERE status IN ('queued', 'sent')").fetchall()


def unfinished_since(conn: Any, after_id: int) -> tuple[list[tuple[int, str, str, str]], int]:
    """``(id, tenant, device, status)`` of the queued or sent commands with ``id > after_id``,
    and the highest command id there is (the refresh's next mark)."""
    rows = conn.execute("SELECT id, tenant, device, status FROM commands "
                        "WHERE status IN ('queued', 'sent') AND id > ?", (after_id,)).fetchall()
    top = conn.execute("SELECT max(id) FROM commands").fetchone()[0] or 0
    return rows, top


def unfinished_counts(conn: Any) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM commands WHERE status IN ('queued', 'sent') "
                             "GROUP BY status").fetchall())


def finished_among(conn: Any, ids: list[int]) -> list[int]:
    """Which of ``ids`` are finished (their ``?wait=`` waiters may be woken)."""
    if not ids:
        return []
    return [r[0] for r in conn.execute(
        f"SELECT id FROM commands WHERE id IN ({','.join('?' * len(ids))}) "
        "AND status NOT IN ('queued', 'sent')", ids)]


def due_last_attempts(conn: Any, max_attempts: int, sent_before_us: int,
                      limit: int) -> tuple[list[tuple[int, int, int]], int | None]:
    """Sent commands on their last attempt, sent at or before ``sent_before_us``.

    Returns ``([(id, attempts, sent_us)...], oldest sent_us of those not yet due or None)``.
    """
    due = conn.execute(
        "SELECT id, attempts, sent_us FROM commands WHERE status = 'sent' AND attempts >= ? "
        "AND sent_us <= ? ORDER BY sent_us LIMIT ?", (max_attempts, sent_before_us, limit)).fetchall()
    later = conn.execute(
        "SELECT min(sent_us) FROM commands WHERE status = 'sent' AND attempts >= ? AND sent_us > ?",
        (max_attempts, sent_before_us)).fetchone()[0]
    return [tuple(r) for r in due], later


def due_expiries(conn: Any, now_us: int, limit: int) -> tuple[list[int], int | None]:
    """Queued commands whose deadline is at or before ``now_us``: ``([id...], the next deadline or None)``."""
    due = conn.execute(
        "SELECT id FROM commands WHERE status = 'queued' AND expires_us IS NOT NULL AND expires_us <= ? "
        "ORDER BY expires_us LIMIT ?", (now_us, limit)).fetchall()
    later = conn.execute(
        "SELECT min(expires_us) FROM commands WHERE status = 'queued' AND expires_us IS NOT NULL "
        "AND expires_us > ?", (now_us,)).fetchone()[0]
    return [r[0] for r in due], later


def count_by_status(conn: Any) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM commands GROUP BY status").fetchall())


def get(conn: Any, command_id: int) -> Row | None:
    return conn.execute(f"SELECT {COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()


def list_for_device(conn: Any, tenant: str, device: str, status: str | None, after: int,
                    limit: int) -> list[Row]:
    """Up to ``limit`` commands of one device with ``id > after``, oldest first."""
    sql = f"SELECT {COLUMNS} FROM commands WHERE tenant = ? AND device = ?"
    params: list[Any] = [tenant, device]
    if status is not None:
        sql += " AND status = ?"
        params.append(status)
    sql += " AND id > ? ORDER BY id LIMIT ?"
    params += [after, limit]
    return conn.execute(sql, params).fetchall()

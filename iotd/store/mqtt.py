"""SQL for the ``mqtt_seen`` table (schema 7): which broker messages and device ids were committed.

Valid on SQLite and PostgreSQL.  :func:`seen_before` and :func:`mark` run in
the same transaction as the events of a message (see
:mod:`iotd.mqtt.ingest`), so "stored" and "marked" commit together.
"""

from __future__ import annotations

from typing import Any


def seen_before(conn: Any, key: str, digest: str) -> bool:
    """Was a message with ``key`` and this ``digest`` committed already?"""
    row = conn.execute("SELECT digest FROM mqtt_seen WHERE key = ?", (key,)).fetchone()
    return row is not None and row[0] == digest


def mark(conn: Any, key: str, digest: str, now_us: int) -> None:
    conn.execute(
        "INSERT INTO mqtt_seen (key, digest, seen_us) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET digest = excluded.digest, seen_us = excluded.seen_us",
        (key, digest, now_us),
    )


def prune(conn: Any, before_us: int) -> int:
    """Forget what was marked before ``before_us`` (a redelivery comes within minutes, not days)."""
    return conn.execute("DELETE FROM mqtt_seen WHERE seen_us < ?", (before_us,)).rowcount

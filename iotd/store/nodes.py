"""SQL for the ``nodes`` table (schema 5): each node's heartbeat, and the cluster id.

Valid on SQLite and PostgreSQL (``ON CONFLICT ... DO UPDATE``)."""

from __future__ import annotations

import json
from typing import Any


def beat(conn: Any, name: str, started_us: int, now_us: int, bus: bool, doc: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO nodes (name, started_us, seen_us, bus, doc) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET started_us = excluded.started_us, seen_us = excluded.seen_us, "
        "bus = excluded.bus, doc = excluded.doc",
        (name, started_us, now_us, 1 if bus else 0, json.dumps(doc, separators=(",", ":"))),
    )


def live(conn: Any, since_us: int) -> list[tuple[str, int, dict[str, Any]]]:
    """``(name, bus, doc)`` of every node whose last heartbeat is at or after ``since_us``."""
    rows = conn.execute("SELECT name, bus, doc FROM nodes WHERE seen_us >= ? ORDER BY name",
                        (since_us,)).fetchall()
    return [(r[0], r[1], json.loads(r[2])) for r in rows]


def leave(conn: Any, name: str) -> None:
    conn.execute("DELETE FROM nodes WHERE name = ?", (name,))


def cluster_id(conn: Any) -> str:
    row = conn.execute("SELECT value FROM meta WHERE name = 'cluster_id'").fetchone()
    return row[0] if row else "none"

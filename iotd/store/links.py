"""SQL for the ``links`` table: every node's device links, so any node lists them all.

A row is one open link: ``id`` (its token), ``node`` (the node holding its
sockets), ``tenant``, ``created_us`` and ``doc`` (JSON: what ``GET
/api/v1/devicelink`` shows of it, ``node`` and ``host`` included, never key
material).  The sockets live in the owning node's memory
(:mod:`iotd.relay`); the row is only what other nodes show of it.  Who
writes what is :mod:`iotd.relay.rows` (this node's rows) and
:mod:`iotd.relay.reaper` (rows of dead nodes).

Portable SQL (``?`` placeholders, ``ON CONFLICT ... DO UPDATE``) for SQLite
and PostgreSQL; every read is bounded by an index (``links_by_tenant``,
``links_by_node``, the primary key).
"""

from __future__ import annotations

import json
from typing import Any, Iterable

MAX_LISTED = 10_000  # rows one listing reads at most (max_links per node times the nodes)

Row = tuple[str, str, str, int, dict[str, Any]]  # id, node, tenant, created_us, doc


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _row(r: tuple) -> Row:
    return (r[0], r[1], r[2], int(r[3]), json.loads(r[4]))


def upsert(conn: Any, rows: Iterable[tuple[str, str, str, int, dict[str, Any]]]) -> int:
    """Write (insert or replace the doc of) each ``(id, node, tenant, created_us, doc)``; returns how many."""
    n = 0
    for token, node, tenant, created_us, doc in rows:
        conn.execute(
            "INSERT INTO links (id, node, tenant, created_us, doc) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
            (token, node, tenant, int(created_us), _json(doc)),
        )
        n += 1
    return n


def delete(conn: Any, tokens: Iterable[str], node: str) -> int:
    """Remove the rows of ``tokens`` that belong to ``node``; returns how many went."""
    n = 0
    for token in tokens:
        n += conn.execute("DELETE FROM links WHERE id = ? AND node = ?", (token, node)).rowcount or 0
    return n


def delete_node(conn: Any, node: str) -> int:
    """Remove every row of ``node`` (its own stale rows at start, a dead node's rows)."""
    return conn.execute("DELETE FROM links WHERE node = ?", (node,)).rowcount or 0


def nodes(conn: Any) -> list[str]:
    """The nodes that have rows (one index scan of ``links_by_node``)."""
    return [r[0] for r in conn.execute("SELECT DISTINCT node FROM links").fetchall()]


def of_tenant(conn: Any, tenant: str, except_node: str, limit: int = MAX_LISTED) -> list[tuple[Row, int | None]]:
    """The rows of ``tenant`` held by other nodes than ``except_node``, oldest first, each with
    its node's last heartbeat (``nodes.seen_us``, None without a ``nodes`` row)."""
    cur = conn.execute(
        "SELECT l.id, l.node, l.tenant, l.created_us, l.doc, n.seen_us FROM links l"
        " LEFT JOIN nodes n ON n.name = l.node WHERE l.tenant = ? AND l.node <> ?"
        " ORDER BY l.created_us, l.id LIMIT ?",
        (tenant, except_node, int(limit)),
    )
    return [(_row(r), _int(r[5])) for r in cur.fetchall()]


def get(conn: Any, token: str) -> tuple[Row, int | None] | None:
    """The row of ``token`` and its node's last heartbeat (as :func:`of_tenant`), or None."""
    r = conn.execute("SELECT l.id, l.node, l.tenant, l.created_us, l.doc, n.seen_us FROM links l"
                     " LEFT JOIN nodes n ON n.name = l.node WHERE l.id = ?", (token,)).fetchone()
    return (_row(r), _int(r[5])) if r is not None else None


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None

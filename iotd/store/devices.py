"""SQL for the device registry and streams."""

from __future__ import annotations

import json
from typing import Any


class PushIdTaken(Exception):
    """Another device already has this pushId."""


def load_all(conn: Any) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (tenant, ident, json.loads(doc))
        for tenant, ident, doc in conn.execute("SELECT tenant, identifier, doc FROM devices")
    ]


def upsert(conn: Any, tenant: str, identifier: str, push_id: int | None, doc: dict) -> None:
    try:
        conn.execute(
            "INSERT INTO devices (tenant, identifier, push_id, doc) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tenant, identifier) DO UPDATE SET push_id = excluded.push_id, doc = excluded.doc",
            (tenant, identifier, push_id, json.dumps(doc)),
        )
    except conn.IntegrityError as e:
        raise PushIdTaken(str(push_id)) from e


def get(conn: Any, tenant: str, identifier: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT doc FROM devices WHERE tenant = ? AND identifier = ?",
                       (tenant, identifier)).fetchone()
    return json.loads(row[0]) if row else None


def get_stream(conn: Any, tenant: str, stream_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT doc FROM streams WHERE tenant = ? AND id = ?", (tenant, stream_id)).fetchone()
    return json.loads(row[0]) if row else None


RUNTIME = ("online", "lastSeen", "lastAddress")  # the fields the periodic flush writes
FLUSH_CHUNK = 500  # devices read (and locked) per statement by the flush on PostgreSQL


def update_docs(conn: Any, rows: list[tuple[str, str, dict]]) -> None:
    """Write the runtime fields (:data:`RUNTIME`) of existing devices (the periodic lastSeen flush).

    Only those fields are merged into the stored doc, so a node's flush never
    undoes a change another node made to the device's other fields meanwhile.
    SQLite merges with ``json_patch``; on PostgreSQL the docs are read under
    their row locks (:data:`FLUSH_CHUNK` a statement, always in key order, so two
    nodes' flushes never deadlock) and written back -- a ``jsonb`` merge would
    refuse a doc holding ``\\u0000``, which JSON text allows."""
    patches = [(tenant, ident, {k: doc.get(k) for k in RUNTIME}) for tenant, ident, doc in rows]
    if conn.dialect != "postgresql":
        conn.executemany("UPDATE devices SET doc = json_patch(doc, ?) WHERE tenant = ? AND identifier = ?",
                         [(json.dumps(patch), tenant, ident) for tenant, ident, patch in patches])
        return
    patches.sort(key=lambda p: (p[0], p[1]))  # rows locked in one order by every node: no deadlock
    for at in range(0, len(patches), FLUSH_CHUNK):
        chunk = patches[at:at + FLUSH_CHUNK]
        pairs = ", ".join(["(?, ?)"] * len(chunk))
        stored = {(r[0], r[1]): json.loads(r[2]) for r in conn.execute(
            f"SELECT tenant, identifier, doc FROM devices WHERE (tenant, identifier) IN ({pairs}) "
            "ORDER BY tenant, identifier FOR UPDATE", [x for t, i, _ in chunk for x in (t, i)])}
        updates = []
        for tenant, ident, patch in chunk:
            doc = stored.get((tenant, ident))
            if doc is not None:
                doc.update(patch)
                updates.append((json.dumps(doc), tenant, ident))
        conn.executemany("UPDATE devices SET doc = ? WHERE tenant = ? AND identifier = ?", updates)


def delete(conn: Any, tenant: str, identifier: str) -> bool:
    cur = conn.execute("DELETE FROM devices WHERE tenant = ? AND identifier = ?", (tenant, identifier))
    return bool(cur.rowcount)


def load_streams(conn: Any) -> list[tuple[str, str, dict[str, Any]]]:
    return [(t, i, json.loads(d)) for t, i, d in conn.execute("SELECT tenant, id, doc FROM streams")]


def upsert_stream(conn: Any, tenant: str, stream_id: str, doc: dict) -> None:
    conn.execute(
        "INSERT INTO streams (tenant, id, doc) VALUES (?, ?, ?) "
        "ON CONFLICT (tenant, id) DO UPDATE SET doc = excluded.doc",
        (tenant, stream_id, json.dumps(doc)),
    )


def delete_stream(conn: Any, tenant: str, stream_id: str) -> bool:
    cur = conn.execute("DELETE FROM streams WHERE tenant = ? AND id = ?", (tenant, stream_id))
    return bool(cur.rowcount)


def revision(conn: Any) -> int:
    """The registry revision: bumped by every device and stream write (schema 5)."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'registry_revision'").fetchone()
    return int(row[0]) if row else 0


def _bump(conn: Any) -> int:
    row = conn.execute("UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) "
                       "WHERE name = 'registry_revision' RETURNING value").fetchone()
    return int(row[0]) if row else 0


def bumped(fn: Any) -> Any:
    """``fn`` (a registry write) followed, in its transaction, by the revision bump: ``(result, revision)``."""
    def write(conn: Any, *args: Any) -> tuple[Any, int]:
        result = fn(conn, *args)
        return result, _bump(conn)

    write.__name__ = f"bumped_{fn.__name__}"
    return write


upsert_bumped = bumped(upsert)
delete_bumped = bumped(delete)
upsert_stream_bumped = bumped(upsert_stream)
delete_stream_bumped = bumped(delete_stream)

"""SQL for API keys and the key revision counter.

Every key write bumps ``meta.keys_revision`` inside its own transaction and
returns the revision it produced, so the daemon's key ring knows how new its
view is.  Reads that feed the ring return the revision of the same snapshot.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

COLUMNS = "id, tenant, name, role, groups, permissions, key_hash, created_at, expires_at, last_used_at"


def bump_revision(conn: Any) -> int:
    """Add one to the key revision; returns the new revision."""
    row = conn.execute(
        "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE name = 'keys_revision'"
        " RETURNING CAST(value AS INTEGER)"
    ).fetchone()
    return int(row[0]) if row else 0


def revision(conn: Any) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = 'keys_revision'").fetchone()
    return int(row[0]) if row else 0


def _row(r: tuple) -> dict[str, Any]:
    return {
        "id": r[0], "tenant": r[1], "name": r[2], "role": r[3],
        "groups": json.loads(r[4]), "permissions": json.loads(r[5]), "key_hash": r[6],
        "created_at": r[7], "expires_at": r[8], "last_used_at": r[9],
    }


def insert(conn: Any, key: dict[str, Any]) -> int:
    """Store a new key; returns the key revision this write produced."""
    conn.execute(
        f"INSERT INTO api_keys ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key["id"], key["tenant"], key["name"], key["role"],
            json.dumps(key["groups"]), json.dumps(key["permissions"]), key["key_hash"],
            key["created_at"], key.get("expires_at"), key.get("last_used_at"),
        ),
    )
    return bump_revision(conn)


def delete(conn: Any, key_id: str, tenant: str | None = None) -> int | None:
    """Remove a key; the key revision this produced, or None when there was no such key."""
    if tenant is None:
        cur = conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))
    else:
        cur = conn.execute("DELETE FROM api_keys WHERE id = ? AND tenant = ?", (key_id, tenant))
    if not cur.rowcount:
        return None
    return bump_revision(conn)


def all_keys(conn: Any) -> tuple[int, list[dict[str, Any]]]:
    """The revision and every key, read in one snapshot."""
    conn.execute("BEGIN")
    try:
        rev = revision(conn)
        rows = [_row(r) for r in conn.execute(f"SELECT {COLUMNS} FROM api_keys ORDER BY id")]
    finally:
        conn.execute("COMMIT")
    return rev, rows


def changed_since(conn: Any, known: int) -> tuple[int, list[dict[str, Any]] | None]:
    """The revision, and every key if the revision is newer than ``known`` (one snapshot)."""
    conn.execute("BEGIN")
    try:
        rev = revision(conn)
        if rev <= known:
            return rev, None
        rows = [_row(r) for r in conn.execute(f"SELECT {COLUMNS} FROM api_keys ORDER BY id")]
    finally:
        conn.execute("COMMIT")
    return rev, rows


def by_hashes(conn: Any, digests: Iterable[str]) -> tuple[int, list[dict[str, Any]]]:
    """The revision and the keys with these SHA-256 digests (point queries on the unique index)."""
    digests = list(digests)
    conn.execute("BEGIN")
    try:
        rev = revision(conn)
        marks = ", ".join("?" * len(digests))
        rows = [_row(r) for r in conn.execute(
            f"SELECT {COLUMNS} FROM api_keys WHERE key_hash IN ({marks})", digests)] if digests else []
    finally:
        conn.execute("COMMIT")
    return rev, rows


def by_id(conn: Any, key_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    return _row(row) if row else None


def count(conn: Any) -> int:
    return conn.execute("SELECT count(*) FROM api_keys").fetchone()[0]


def touch(conn: Any, used: list[tuple[str, int]]) -> None:
    """Record ``lastUsedAt`` for several keys (no revision bump)."""
    conn.executemany("UPDATE api_keys SET last_used_at = ? WHERE id = ?", [(t, k) for k, t in used])

"""SQL for API keys and the key revision counter."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

COLUMNS = "id, tenant, name, role, groups, permissions, key_hash, created_at, expires_at, last_used_at"


def bump_revision(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE name = 'keys_revision'"
    )


def revision(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name = 'keys_revision'").fetchone()
    return int(row[0]) if row else 0


def _row(r: tuple) -> dict[str, Any]:
    return {
        "id": r[0], "tenant": r[1], "name": r[2], "role": r[3],
        "groups": json.loads(r[4]), "permissions": json.loads(r[5]), "key_hash": r[6],
        "created_at": r[7], "expires_at": r[8], "last_used_at": r[9],
    }


def insert(conn: sqlite3.Connection, key: dict[str, Any]) -> None:
    conn.execute(
        f"INSERT INTO api_keys ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key["id"], key["tenant"], key["name"], key["role"],
            json.dumps(key["groups"]), json.dumps(key["permissions"]), key["key_hash"],
            key["created_at"], key.get("expires_at"), key.get("last_used_at"),
        ),
    )
    bump_revision(conn)


def delete(conn: sqlite3.Connection, key_id: str, tenant: str | None = None) -> bool:
    if tenant is None:
        cur = conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))
    else:
        cur = conn.execute("DELETE FROM api_keys WHERE id = ? AND tenant = ?", (key_id, tenant))
    if cur.rowcount:
        bump_revision(conn)
    return bool(cur.rowcount)


def all_keys(conn: sqlite3.Connection) -> tuple[int, list[dict[str, Any]]]:
    """The revision and every key, read in one snapshot."""
    conn.execute("BEGIN")
    try:
        rev = revision(conn)
        rows = [_row(r) for r in conn.execute(f"SELECT {COLUMNS} FROM api_keys ORDER BY id")]
    finally:
        conn.execute("COMMIT")
    return rev, rows


def count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM api_keys").fetchone()[0]


def touch(conn: sqlite3.Connection, used: list[tuple[str, int]]) -> None:
    """Record ``lastUsedAt`` for several keys (no revision bump)."""
    conn.executemany("UPDATE api_keys SET last_used_at = ? WHERE id = ?", [(t, k) for k, t in used])

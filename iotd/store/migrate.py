"""Schema migrations for both backends, applied at start under a lock.

Numbered files ``schema/<dialect>/NNN_name.sql`` (the same numbers for
SQLite and PostgreSQL); the versions applied are rows of ``schema_version``.
Each migration runs in its own transaction, and the version is read again
inside it, under a lock that a second process starting at the same moment
waits for (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``pg_advisory_lock``
around the whole run): two nodes starting at once migrate once.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

LOCK_KEY = 0x696F7464  # "iotd": the advisory lock that serialises migrations on PostgreSQL


def migrations(dialect: str) -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("iotd.store").joinpath("schema", dialect).iterdir():
        match = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(found)


def split_sql(sql: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _current(conn: Any) -> int:
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return row[0] or 0


def migrate(conn: Any) -> int:
    """Bring the schema up to date; returns the version now in force."""
    if conn.dialect == "postgresql":
        conn.execute(f"SELECT pg_advisory_lock({LOCK_KEY})")
        try:
            return _apply(conn, "BEGIN")
        finally:
            conn.execute(f"SELECT pg_advisory_unlock({LOCK_KEY})")
    return _apply(conn, "BEGIN IMMEDIATE")


def _apply(conn: Any, begin: str) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    current = _current(conn)
    for version, sql in migrations(conn.dialect):
        if version <= current:
            continue
        conn.execute(begin)
        try:
            current = _current(conn)  # another process may have applied it while we waited
            if version > current:
                for statement in split_sql(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                current = version
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return current

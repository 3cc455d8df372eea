"""SQL for the ``presence`` table (schema 5): online/offline of push devices shared by the nodes.

Valid on SQLite and PostgreSQL.  Each transition is one statement that
changes the row only if it is in the other state, so two nodes racing for
one transition make it once (the second finds nothing to change)."""

from __future__ import annotations

from typing import Any


def come_online(conn: Any, tenant: str, device: str, now_us: int) -> bool:
    """Mark online; True if it was offline (or unknown) before this statement."""
    row = conn.execute(
        "INSERT INTO presence (tenant, device, online, seen_us) VALUES (?, ?, 1, ?) "
        "ON CONFLICT (tenant, device) DO UPDATE SET online = 1, seen_us = excluded.seen_us "
        "WHERE presence.online = 0 RETURNING online",
        (tenant, device, now_us),
    ).fetchone()
    return row is not None


def seen(conn: Any, rows: list[tuple[str, str, int]]) -> None:
    """Each node's latest poll per device (``(tenant, device, seen_us)``); a later stamp wins."""
    conn.executemany(
        "UPDATE presence SET seen_us = CASE WHEN seen_us < ? THEN ? ELSE seen_us END "
        "WHERE tenant = ? AND device = ?",
        [(us, us, tenant, device) for tenant, device, us in rows],
    )


def go_offline(conn: Any, cutoff_us: int, limit: int) -> list[tuple[str, str]]:
    """Mark offline (at most ``limit``) the online devices not seen since ``cutoff_us``."""
    return [(r[0], r[1]) for r in conn.execute(
        "UPDATE presence SET online = 0 WHERE (tenant, device) IN "
        "(SELECT tenant, device FROM presence WHERE online = 1 AND seen_us < ? LIMIT ?) "
        "AND online = 1 AND seen_us < ? RETURNING tenant, device",
        (cutoff_us, limit, cutoff_us),
    ).fetchall()]


def forget(conn: Any, tenant: str, device: str) -> None:
    conn.execute("DELETE FROM presence WHERE tenant = ? AND device = ?", (tenant, device))


def online_devices(conn: Any) -> list[tuple[str, str]]:
    """Every device online now (a node starting takes them over)."""
    return [(r[0], r[1]) for r in conn.execute("SELECT tenant, device FROM presence WHERE online = 1")]

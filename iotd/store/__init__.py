"""The store: SQLite or PostgreSQL behind one small interface.

:class:`~iotd.store.engine.Store` runs every statement off the reactor
thread (one writer thread with group commit, a few reader threads); the
backend is :mod:`.sqlite` (``[store] url`` empty) or :mod:`.postgres`
(``postgresql://...``).  The SQL lives in plain functions ``fn(conn, ...)``
in the table-family modules (:mod:`.keys`, :mod:`.devices`, :mod:`.events`,
:mod:`.commands`), written once for both: ``?`` placeholders,
``INSERT ... RETURNING``, ``ON CONFLICT``; ``conn.dialect`` says which
backend runs them.  The daemon and the ``iotd-admin`` CLI share them.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from iotd.store.engine import Store, StoreUnavailable


def target_of(config_or_target: Any) -> str:
    """The store a Config names (``[store] url``, else the SQLite file), or a path/URL as is.

    For a Config, ``data_dir`` is created (0700) first: it holds ``admin.key``
    on either backend.
    """
    if isinstance(config_or_target, str):
        return config_or_target
    os.makedirs(config_or_target.iotd.data_dir, mode=0o700, exist_ok=True)
    return config_or_target.store_target


def open_store(config: Any, reactor: Any) -> Store:
    """The daemon's store for ``config`` (not started)."""
    return Store(target_of(config), reactor, pool_size=config.store.pool_size)


def open_sync(config_or_target: Any) -> Any:
    """A migrated connection for synchronous use (the CLI, start-up checks, tests)."""
    target = target_of(config_or_target)
    if target.startswith(("postgresql://", "postgres://")):
        from iotd.store import postgres

        return postgres.open_sync(target)
    from iotd.store import sqlite

    return sqlite.open_sync(target)


def open_error(config: Any, error: BaseException) -> str:
    """The one line for a store that cannot be opened at start (a password is never shown)."""
    if config.store.url and not isinstance(error, OSError):  # OSError: data_dir itself
        from iotd.store.postgres import scrub

        return f"iotd: config error: [store] url: cannot connect: {scrub(str(error), config.store.url)}"
    return f"iotd: config error: [iotd] data_dir: cannot open {config.database_path}: {error}"


def run_in_transaction(conn: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Synchronous counterpart of ``Store.write`` for the CLI."""
    conn.execute("BEGIN IMMEDIATE" if conn.dialect == "sqlite" else "BEGIN")
    try:
        result = fn(conn, *args)
        conn.execute("COMMIT")
        return result
    except BaseException:
        conn.execute("ROLLBACK")
        raise


__all__ = ["Store", "StoreUnavailable", "open_error", "open_store", "open_sync", "run_in_transaction"]

"""The SQLite backend: pragmas, a private file, and health (``ok``, ``full``, ``missing``).

Durability: WAL with ``synchronous=FULL``; a write's Deferred fires only
after COMMIT returned, so an acknowledged write survives kill -9 and power
loss.  Readers run beside the writer (WAL), each thread on its own
``query_only`` connection.

Health, as :class:`iotd.store.engine.Store` reports it:

- ``"full"``: a write failed with SQLITE_FULL (disk or quota full, or
  ``PRAGMA max_page_count`` reached), or the file system holds less than
  :data:`FULL_BELOW_BYTES` free for the daemon's user.  It clears when the
  file system has room again and a probe write (:data:`PROBE_BYTES`
  inserted and deleted in one transaction) commits.
- ``"missing"``: the path no longer names the file the store opened (it was
  deleted or replaced: device and inode differ).  This is also checked
  before every commit, so no write made after the removal is acknowledged.
  It lasts until the store is opened again: what SQLite still writes goes
  to an unlinked file that is gone at the next start.

Files: the database file is created mode 0600 before SQLite opens it (SQLite
gives its ``-wal`` and ``-shm`` files the database file's mode); an existing
one is set to 0600 with its ``-wal`` and ``-shm``.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from iotd.store import migrate
from iotd.store.textcheck import refuse_nul, refuse_nul_many

FULL_BELOW_BYTES = 1024 * 1024  # free bytes under which the file system counts as full
PROBE_BYTES = 16384  # what the probe write allocates, to learn whether space is back
_UNAVAILABLE_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY,
                      sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
                      sqlite3.SQLITE_NOMEM}


class SqliteConnection(sqlite3.Connection):
    """sqlite3's connection, with the ``dialect`` every store function may look at, and the
    text rule of both backends (:mod:`iotd.store.textcheck`)."""

    dialect = "sqlite"

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        refuse_nul(params)
        return super().execute(sql, params)

    def executemany(self, sql: str, seq: Any) -> sqlite3.Cursor:
        return super().executemany(sql, refuse_nul_many(seq))


def connect(path: str, same_thread: bool = True) -> SqliteConnection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=same_thread,
                           factory=SqliteConnection)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def open_sync(path: str) -> SqliteConnection:
    """A migrated connection for synchronous use (the CLI, backups); the file is made 0600."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    make_private(path)
    conn = connect(path)
    migrate.migrate(conn)
    return conn


def make_private(path: str) -> None:
    """Create the database file 0600 if it is new; set it and its -wal/-shm to 0600."""
    if path == ":memory:" or path.startswith("file:"):
        return
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        try:
            os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None when nothing is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _free_bytes(directory: str) -> int:
    """Bytes the daemon's user may still write in ``directory``'s file system."""
    try:
        st = os.statvfs(directory or ".")
    except OSError:
        return FULL_BELOW_BYTES  # cannot tell: do not call it full
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _is_full(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(error, sqlite3.Error) and "full" in str(error)


def _probe(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO meta (name, value) VALUES ('health_probe', zeroblob(?))", (PROBE_BYTES,))
    conn.execute("DELETE FROM meta WHERE name = 'health_probe'")


class SqliteBackend:
    """What :class:`iotd.store.engine.Store` needs to know of SQLite."""

    dialect = "sqlite"
    states = ("ok", "full", "missing")
    sticky = ("missing",)  # only a new start clears it: the open file is gone
    refused = {"full": "the store's disk is full", "missing": "the store's database file was removed"}
    begin_sql = "BEGIN IMMEDIATE"
    read_errors = (sqlite3.OperationalError,)
    messages = {
        "full": "store {where}: the disk is full; writes answer 503 until space is freed",
        "missing": "store {where}: the database file was removed or replaced under iotd; writes answer "
                   "503 (what they wrote would be lost). Restore a backup or accept an empty store, "
                   "then restart iotd",
        "ok": "store {where}: space is back; writes are accepted again",
    }

    def __init__(self, path: str):
        self.path = path
        self.where = path
        self._identity: tuple[int, int] | None = None

    def open_writer(self) -> SqliteConnection:
        conn = open_sync(self.path)
        self._identity = _file_id(self.path)
        return conn

    def open_reader(self) -> SqliteConnection:
        conn = connect(self.path, same_thread=False)  # closed by stop() from the reactor
        conn.execute("PRAGMA query_only=ON")
        return conn

    def state_of(self, error: BaseException) -> str | None:
        """``None`` for an error of the statement (a bug, a constraint); else why the store refuses.

        ``"full"`` changes the health; ``""`` only makes the write a 503.
        """
        code = getattr(error, "sqlite_errorcode", None)
        if not isinstance(error, sqlite3.Error) or code is None or code & 0xFF not in _UNAVAILABLE_CODES:
            return None
        return "full" if _is_full(error) else ""

    def batch_error_state(self, error: BaseException) -> str:
        return "full" if _is_full(error) else ""

    def lost(self, conn: sqlite3.Connection) -> bool:
        """The transaction is gone (SQLite rolled everything back: disk full, I/O error)."""
        return not conn.in_transaction

    def broken(self, conn: sqlite3.Connection) -> bool:
        return False  # a local file: the connection itself never breaks

    def before_commit(self) -> str | None:
        if self._identity is not None and _file_id(self.path) != self._identity:
            return "missing"
        return None

    def inspect(self, conn: sqlite3.Connection | None) -> str:
        """What the file and the file system say (a reader thread)."""
        if self._identity is None:
            return "ok"
        if _file_id(self.path) != self._identity:
            return "missing"
        if _free_bytes(os.path.dirname(self.path)) < FULL_BELOW_BYTES:
            return "full"
        return "ok"

    probe = staticmethod(_probe)

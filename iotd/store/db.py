"""SQLite off the reactor thread, with group commit.

Writes: one writer thread owns one connection.  ``Store.write(fn, *args)``
queues ``fn(conn, *args)``; the writer takes everything queued (up to
``BATCH``), runs each call inside its own SAVEPOINT of one transaction and
commits once, so many concurrent writers share one fsync.  A call that
raises is rolled back alone and its Deferred fails; the others commit.
Results come back to the reactor in queue order, so callers that publish
after a write publish in commit order.

Reads: ``Store.read(fn, *args)`` runs on a small thread pool, each thread
with its own connection (WAL lets readers run beside the writer).

Durability: WAL with ``synchronous=FULL``; a write's Deferred fires only
after COMMIT returned, so an acknowledged write survives kill -9 and power
loss.
"""

from __future__ import annotations

import os
import queue
import re
import sqlite3
import threading
from importlib import resources
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from iotd.logs import Logger

BATCH = 1000
_STOP = object()


class StoreUnavailable(Exception):
    """The store cannot be reached (not started, stopped, or disk error)."""


def _migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("iotd.store").joinpath("schema").iterdir():
        match = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(found)


def _connect(path: str, same_thread: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=same_thread)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; returns the version now in force."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = row[0] or 0
    for version, sql in _migrations():
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = version
    return current


def _split_sql(sql: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def open_sync(path: str) -> sqlite3.Connection:
    """A migrated connection for synchronous use (the CLI, backups)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    conn = _connect(path)
    migrate(conn)
    return conn


def run_in_transaction(conn: sqlite3.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """Synchronous counterpart of ``Store.write`` for the CLI."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, *args)
        conn.execute("COMMIT")
        return result
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class Store:
    log = Logger()

    def __init__(self, path: str, reactor: Any, readers: int = 2):
        self.path = path
        self._reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers_max = readers
        self._pool: ThreadPool | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._running = False
        self._inflight: list = []
        self.commits = 0  # transactions committed, for tests and metrics

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        """Open and migrate the database (in a thread), then start the threads."""
        opened: defer.Deferred = defer.Deferred()
        self._writer = threading.Thread(
            target=self._write_thread, args=(opened,), name="iotd-store-write", daemon=True
        )
        self._writer.start()
        await opened
        self._local = threading.local()
        self._pool = ThreadPool(minthreads=1, maxthreads=self._readers_max, name="iotd-store-read")
        self._pool.start()
        # Reader threads must never keep the process alive, whatever path shutdown takes.
        pool = self._pool
        self._reactor.addSystemEventTrigger("after", "shutdown", lambda: pool.joined or pool.stop())
        self._running = True

    async def stop(self) -> None:
        """Finish every queued write, then close all connections."""
        if not self._running:
            return
        self._running = False
        done = defer.Deferred()
        self._queue.put((_STOP, (), done))
        await done
        await threads.deferToThread(self._pool.stop)
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    # -- writes -----------------------------------------------------------

    def write(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` in the next group transaction."""
        d: defer.Deferred = defer.Deferred()
        if not self._running:
            d.errback(StoreUnavailable("store is not running"))
            return d
        self._queue.put((fn, args, d))
        return d

    def _write_thread(self, opened: defer.Deferred) -> None:
        try:
            conn = open_sync(self.path)
        except Exception:
            self._reactor.callFromThread(opened.errback, Failure())
            return
        self._reactor.callFromThread(opened.callback, None)
        self._write_loop(conn)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            self._write_batches(conn)
        except BaseException:  # never leave stop() waiting on a dead writer
            self.log.failure("store writer thread died")
            self._running = False
            items = self._inflight
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            dead = Failure(StoreUnavailable("store writer died"))
            self._reactor.callFromThread(
                self._deliver, [(item[2], None if item[0] is _STOP else dead) for item in items])

    def _write_batches(self, conn: sqlite3.Connection) -> None:
        while True:
            batch = self._inflight = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None
            results: list[tuple[defer.Deferred, Any]] = []
            work = []
            for item in batch:
                if item[0] is _STOP:
                    stop = item[2]
                else:
                    work.append(item)
            if work:
                results = self._run_batch(conn, work)
            self._inflight = []
            if results:
                self._reactor.callFromThread(self._deliver, results)
            if stop is not None:
                conn.close()
                self._reactor.callFromThread(stop.callback, None)
                return

    def _run_batch(self, conn: sqlite3.Connection, work: list) -> list:
        results: list[tuple[defer.Deferred, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            failure = Failure(StoreUnavailable(str(e)))
            return [(d, failure) for _, _, d in work]
        for fn, args, d in work:
            conn.execute("SAVEPOINT w")
            try:
                value = fn(conn, *args)
            except BaseException:
                results.append((d, Failure()))
                conn.execute("ROLLBACK TO w")
            else:
                results.append((d, value))
            conn.execute("RELEASE w")
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            failure = Failure(StoreUnavailable(f"commit failed: {e}"))
            return [(d, failure) for _, _, d in work]
        self.commits += 1
        return results

    @staticmethod
    def _deliver(results: list) -> None:
        for d, value in results:
            if isinstance(value, Failure):
                d.errback(value)
            else:
                d.callback(value)

    # -- reads ------------------------------------------------------------

    def read(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` on a reader thread."""
        if not self._running:
            return defer.fail(StoreUnavailable("store is not running"))
        return threads.deferToThreadPool(self._reactor, self._pool, self._read, fn, args)

    def _read(self, fn: Callable[..., Any], args: tuple) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, same_thread=False)  # closed by stop() from the reactor
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        try:
            return fn(conn, *args)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(str(e)) from e

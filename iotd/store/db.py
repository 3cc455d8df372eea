"""SQLite off the reactor thread, with group commit, a bounded write queue and a health check.

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

Bounds: the write queue holds at most :data:`MAX_QUEUED_WRITES` writes
(100,000) and :data:`MAX_QUEUED_BYTES` bytes (256 MiB, as callers declare
with ``write(..., size=n)``; a write that declares nothing counts one entry
and no bytes).  Beyond either, ``write`` fails at once with
:class:`StoreUnavailable` (a 503) instead of queueing without limit; one
line is logged per episode.  A write larger than the byte bound on its own
is still taken when nothing else is queued, so no write is refused forever.
Normal use never comes near these: the writer drains thousands of writes a
second.

Health (:attr:`Store.health`): ``"ok"``, ``"full"`` or ``"missing"``,
checked every :data:`HEALTH_EVERY` seconds and on every write error.  While
it is not ``"ok"`` every ``write`` fails at once with
:class:`StoreUnavailable` (503); reads go on.

- ``"full"``: a write failed with SQLITE_FULL (disk or quota full, or
  ``PRAGMA max_page_count`` reached), or the file system holds less than
  :data:`FULL_BELOW_BYTES` free for the daemon's user.  It clears when the
  file system has room again and a probe write (:data:`PROBE_BYTES`
  inserted and deleted in one transaction) commits.
- ``"missing"``: the path no longer names the file the store opened (it was
  deleted or replaced: device and inode differ).  This is also checked
  before every commit, so no write made after the removal is acknowledged.
  It lasts until the store is opened again: what SQLite still writes goes
  to an unlinked file that is gone at the next start.  The operator
  restores a backup (or accepts an empty store) and restarts iotd.

Files: the database file is created mode 0600 before SQLite opens it (SQLite
gives its ``-wal`` and ``-shm`` files the database file's mode); an existing
one is set to 0600 with its ``-wal`` and ``-shm``.
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
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from iotd import metrics
from iotd.logs import Logger

BATCH = 1000
MAX_QUEUED_WRITES = 100_000  # writes waiting for the writer thread
MAX_QUEUED_BYTES = 256 * 1024 * 1024  # bytes they declared (``size=``)
HEALTH_EVERY = 2.0  # seconds between two looks at the file and the file system
FULL_BELOW_BYTES = 1024 * 1024  # free bytes under which the file system counts as full
PROBE_BYTES = 16384  # what the probe write allocates, to learn whether space is back
_STOP = object()
_UNAVAILABLE_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY,
                      sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
                      sqlite3.SQLITE_NOMEM}
_REFUSED = {"full": "the store's disk is full", "missing": "the store's database file was removed"}


class StoreUnavailable(Exception):
    """The store cannot be reached (not started, stopped, disk full, file removed, queue full)."""


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
    """A migrated connection for synchronous use (the CLI, backups); the file is made 0600."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    make_private(path)
    conn = _connect(path)
    migrate(conn)
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
    return "full" in str(error)


def _unavailable(error: BaseException) -> bool:
    """An SQLite error that says the store cannot take writes now (not a bug in the statement)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.Error) and code is not None and code & 0xFF in _UNAVAILABLE_CODES


def _probe(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO meta (name, value) VALUES ('health_probe', zeroblob(?))", (PROBE_BYTES,))
    conn.execute("DELETE FROM meta WHERE name = 'health_probe'")


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

    def __init__(self, path: str, reactor: Any, readers: int = 2,
                 max_queued_writes: int = MAX_QUEUED_WRITES, max_queued_bytes: int = MAX_QUEUED_BYTES):
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
        self.health = "ok"  # "ok" | "full" | "missing"; see the module docstring
        self._identity: tuple[int, int] | None = None
        self._max_writes = max_queued_writes
        self._max_bytes = max_queued_bytes
        self._queued = 0  # writes in the queue (taken off by the writer thread)
        self._queued_bytes = 0
        self._count_lock = threading.Lock()
        self._queue_full = False
        self._checker: LoopingCall | None = None

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        """Open and migrate the database (in a thread), then start the threads."""
        opened: defer.Deferred = defer.Deferred()
        self._queued = self._queued_bytes = 0
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
        self._set_health("ok", force=True)
        self._checker = LoopingCall(lambda: defer.Deferred.fromCoroutine(self.check_health()))
        self._checker.clock = self._reactor
        self._checker.start(HEALTH_EVERY, now=False)

    async def stop(self) -> None:
        """Finish every queued write, then close all connections."""
        if not self._running:
            return
        self._running = False
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        done = defer.Deferred()
        self._queue.put((_STOP, (), done, None))
        await done
        await threads.deferToThread(self._pool.stop)
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    # -- writes -----------------------------------------------------------

    def write(self, fn: Callable[..., Any], *args: Any, size: int = 0) -> defer.Deferred:
        """Run ``fn(conn, *args)`` in the next group transaction.

        ``size``: the bytes this write holds while it waits (its payload), when
        the caller knows.  Fails at once with :class:`StoreUnavailable` when the
        store is not running, not healthy, or its queue is over a bound.
        """
        if not self._running:
            return defer.fail(StoreUnavailable("store is not running"))
        if self.health != "ok":
            metrics.store_writes_refused.labels(self.health).inc()
            return defer.fail(StoreUnavailable(_REFUSED[self.health]))
        if not self._admit(size):
            metrics.store_writes_refused.labels("queue_full").inc()
            return defer.fail(StoreUnavailable("the store's write queue is full"))
        return self._submit(fn, args, size)

    def maintain(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` on the writer's connection even while writes are refused.

        For the health probe, and for tests (``PRAGMA max_page_count``).
        """
        if not self._running:
            return defer.fail(StoreUnavailable("store is not running"))
        return self._submit(fn, args, None)

    def _submit(self, fn: Callable[..., Any], args: tuple, size: int | None) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._queue.put((fn, args, d, size))
        return d

    def _admit(self, size: int) -> bool:
        """Count a write into the queue if both bounds allow it; log once per episode."""
        with self._count_lock:
            over = self._queued >= self._max_writes or (
                self._queued > 0 and self._queued_bytes + size > self._max_bytes)
            if not over:
                self._queued += 1
                self._queued_bytes += size
            queued, queued_bytes = self._queued, self._queued_bytes
        if over and not self._queue_full:
            self._queue_full = True
            self.log.warn("store write queue full ({writes} writes, {bytes} bytes waiting): "
                          "writes answer 503 until it drains", writes=queued, bytes=queued_bytes)
        elif not over and self._queue_full:
            self._queue_full = False
            self.log.info("store write queue accepts writes again")
        return not over

    def _taken(self, batch: list) -> None:
        """The writer took ``batch`` off the queue (writer thread)."""
        counted = [item[3] for item in batch if item[3] is not None]
        if counted:
            with self._count_lock:
                self._queued -= len(counted)
                self._queued_bytes -= sum(counted)

    def _write_thread(self, opened: defer.Deferred) -> None:
        try:
            conn = open_sync(self.path)
            self._identity = _file_id(self.path)
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
            self._taken(batch)
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
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            return self._all_failed(work, e)
        results: list[tuple[defer.Deferred, Any]] = []
        try:
            for fn, args, d, _size in work:
                conn.execute("SAVEPOINT w")
                try:
                    value = fn(conn, *args)
                except BaseException as e:
                    if not conn.in_transaction:  # SQLite rolled everything back (disk full, I/O error)
                        return self._all_failed(work, e)
                    results.append((d, self._failure(e)))
                    conn.execute("ROLLBACK TO w")
                else:
                    results.append((d, value))
                conn.execute("RELEASE w")
            if self._identity is not None and _file_id(self.path) != self._identity:
                conn.execute("ROLLBACK")
                self._report("missing")
                failure = Failure(StoreUnavailable(_REFUSED["missing"]))
                return [(d, failure) for _, _, d, _ in work]
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return self._all_failed(work, e, "commit failed: ")
        self.commits += 1
        return results

    def _failure(self, error: BaseException) -> Failure:
        """What a write's Deferred fails with (writer thread, inside the ``except``)."""
        if not _unavailable(error):
            return Failure()
        if _is_full(error):
            self._report("full")
        return Failure(StoreUnavailable(str(error)))

    def _all_failed(self, work: list, error: BaseException, prefix: str = "") -> list:
        if _is_full(error):
            self._report("full")
        failure = Failure(StoreUnavailable(prefix + str(error)))
        return [(d, failure) for _, _, d, _ in work]

    def _report(self, state: str) -> None:
        """Tell the reactor the health the writer saw (before the results it delivers next)."""
        self._reactor.callFromThread(self._set_health, state)

    @staticmethod
    def _deliver(results: list) -> None:
        for d, value in results:
            if isinstance(value, Failure):
                d.errback(value)
            else:
                d.callback(value)

    # -- health -----------------------------------------------------------

    async def check_health(self) -> str:
        """Look at the file and its file system now (and probe when full); returns :attr:`health`."""
        if not self._running:
            return self.health
        try:
            seen = await threads.deferToThreadPool(self._reactor, self._pool, self._inspect)
            if seen != "ok":
                self._set_health(seen)
            elif self.health == "full":
                await self.maintain(_probe)
                self._set_health("ok")
        except StoreUnavailable:
            pass  # the probe found no room yet (the writer reported it)
        except Exception:
            self.log.failure("store health check failed")
        return self.health

    def _inspect(self) -> str:
        """What the file and the file system say (a reader thread)."""
        if self._identity is None:
            return "ok"
        if _file_id(self.path) != self._identity:
            return "missing"
        if _free_bytes(os.path.dirname(self.path)) < FULL_BELOW_BYTES:
            return "full"
        return "ok"

    def _set_health(self, state: str, force: bool = False) -> None:
        old = self.health
        if state == old and not force:
            return
        if old == "missing" and not force:
            return  # only a new start clears it: the open file is gone
        self.health = state
        for name in ("ok", "full", "missing"):
            metrics.store_health.labels(name).set(1 if name == state else 0)
        if state == old:
            return
        if state == "full":
            self.log.warn("store {path}: the disk is full; writes answer 503 until space is freed",
                          path=self.path)
        elif state == "missing":
            self.log.error("store {path}: the database file was removed or replaced under iotd; writes "
                           "answer 503 (what they wrote would be lost). Restore a backup or accept an "
                           "empty store, then restart iotd", path=self.path)
        else:
            self.log.info("store {path}: space is back; writes are accepted again", path=self.path)

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

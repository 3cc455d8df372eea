"""The store's readers: a small thread pool, each thread with its own connection, opened on first use.

A read runs ``fn(conn, *args)`` on a reader thread.  A connection the server
dropped earlier (a restart, ``pg_terminate_backend``) is found broken by the
read that uses it next; that read runs once more on a new connection.

Down (a backend with ``fails_reads_fast``: PostgreSQL): when a reader cannot
connect, the readers are *down* and every read fails at once with
:class:`~iotd.store.engine.StoreUnavailable` (a 503) without trying to connect
(also a read that was already waiting for a thread), until :meth:`Readers.inspect` (the store's periodic
health check, every couple of seconds) reaches the server again.  So a dead
server costs one connect attempt per check, not one per request: requests
never queue behind connect timeouts, and the pool's queue cannot grow with
them.  The connect failure is also told to the store's health at once
(``on_state``), so writes are refused from then on too.  SQLite has no
server to lose: its reads always try (``fails_reads_fast`` false).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool


class Readers:
    def __init__(self, backend: Any, reactor: Any, threads_max: int, on_state: Callable[[str], None],
                 unavailable: type[Exception]):
        self.backend = backend
        self._reactor = reactor
        self._max = threads_max
        self._on_state = on_state  # called in a reader thread with the state a failed connect means
        self._unavailable = unavailable
        self._pool: ThreadPool | None = None
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self.down = False  # a reader could not connect; see the module docstring

    def start(self) -> None:
        self._local = threading.local()
        self.down = False
        self._pool = ThreadPool(minthreads=1, maxthreads=self._max, name="iotd-store-read")
        self._pool.start()
        # Reader threads must never keep the process alive, whatever path shutdown takes.
        pool = self._pool
        self._reactor.addSystemEventTrigger("after", "shutdown", lambda: pool.joined or pool.stop())

    async def stop(self) -> None:
        await threads.deferToThread(self._pool.stop)
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except Exception:
                    pass
            self._conns.clear()

    def read(self, fn: Callable[..., Any], args: tuple) -> defer.Deferred:
        if self._fast_fail():
            return defer.fail(self._unavailable(self.backend.refused["unreachable"]))
        return threads.deferToThreadPool(self._reactor, self._pool, self._read, fn, args)

    def inspect(self) -> defer.Deferred:
        """What the backend says now (on a reader thread); ``"ok"`` ends a *down* episode."""
        return threads.deferToThreadPool(self._reactor, self._pool, self._inspect)

    def _inspect(self) -> str:
        try:
            conn = self._conn()
        except self.backend.read_errors:
            return self.backend.inspect(None)
        try:
            seen = self.backend.inspect(conn)
        except self.backend.read_errors:
            self._forget(conn)
            return self.backend.inspect(None)
        if seen == "ok":
            self.down = False
        return seen

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self.backend.broken(conn):
            self._forget(conn)
            conn = None
        if conn is None:
            conn = self.backend.open_reader()
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _forget(self, conn: Any) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _connect_failed(self, error: BaseException) -> Exception:
        state = self.backend.state_of(error)
        if state and getattr(self.backend, "fails_reads_fast", False):
            self.down = True
            self._on_state(state)
        return self._unavailable(" ".join(str(error).split()))

    def _fast_fail(self) -> bool:
        return self.down and getattr(self.backend, "fails_reads_fast", False)

    def _read(self, fn: Callable[..., Any], args: tuple, retry: bool = True) -> Any:
        if self._fast_fail():  # went down while this read waited for a thread
            raise self._unavailable(self.backend.refused["unreachable"])
        try:
            conn = self._conn()
        except self.backend.read_errors as e:
            raise self._connect_failed(e) from e
        try:
            return fn(conn, *args)
        except self.backend.read_errors as e:
            if self.backend.broken(conn):
                self._forget(conn)
                if retry:  # a connection the server dropped earlier (a restart): once more on a new one
                    return self._read(fn, args, retry=False)
            raise self._unavailable(" ".join(str(e).split())) from e
        finally:
            if conn.in_transaction and not self.backend.broken(conn):
                try:
                    conn.execute("ROLLBACK")
                except Exception:
                    self._forget(conn)

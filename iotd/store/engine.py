"""The store engine: both backends off the reactor thread, with group commit and a bounded queue.

Writes: one writer thread owns one connection.  ``Store.write(fn, *args)``
queues ``fn(conn, *args)``; the writer takes everything queued (up to
``BATCH``), runs each call inside its own SAVEPOINT of one transaction and
commits once, so many concurrent writers share one commit.  A call that
raises is rolled back alone (``ROLLBACK TO SAVEPOINT``: on PostgreSQL too a
failed statement spoils only its own savepoint) and its Deferred fails; the
others commit.  A call taken alone runs without a savepoint (its failure
rolls the transaction back: the same outcome, two statements fewer for the
common case of one write at a time).  Results come back to the reactor in
queue order, so callers that publish after a write publish in commit order.

Reads: ``Store.read(fn, *args)`` runs on a small thread pool, each thread
with its own connection (:mod:`iotd.store.readers`; on PostgreSQL a reader
that cannot connect makes reads fail at once until the health check reaches
the server again).

Bounds: the write queue (:mod:`iotd.store.writequeue`) holds at most
100,000 writes and 256 MiB of what they declare (``write(..., size=n)``);
beyond either, ``write`` fails at once with :class:`StoreUnavailable` (a 503).

Health (:attr:`Store.health`): ``"ok"`` or what the backend reports
(SQLite: ``"full"``, ``"missing"``, see :mod:`iotd.store.sqlite`;
PostgreSQL: ``"unreachable"``, see :mod:`iotd.store.postgres`), checked
every :data:`HEALTH_EVERY` seconds, on every write error and when a reader
cannot connect (PostgreSQL).  While it is not ``"ok"`` every ``write`` fails
at once with :class:`StoreUnavailable` (503); reads go on as far as they can
(on PostgreSQL: until a reader cannot connect, see :mod:`iotd.store.readers`).
Nothing else is needed to recover: the check reconnects the readers, then
probes the writer (which reconnects), then accepts writes again.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from iotd import metrics
from iotd.logs import Logger
from iotd.store.readers import Readers
from iotd.store.writequeue import MAX_QUEUED_BYTES, MAX_QUEUED_WRITES, WriteQueue

BATCH = 1000
HEALTH_EVERY = 2.0  # seconds between two looks at the backend
_STOP = object()


class StoreUnavailable(Exception):
    """The store cannot take this now (not started, stopped, disk full, unreachable, queue full)."""


def backend_for(target: str) -> Any:
    """The backend for ``target``: a ``postgresql://`` URL, else an SQLite file path."""
    if target.startswith(("postgresql://", "postgres://")):
        from iotd.store.postgres import PostgresBackend

        return PostgresBackend(target)
    from iotd.store.sqlite import SqliteBackend

    return SqliteBackend(target)


class Store:
    """``Store(path_or_url, reactor)``: see the module docstring.

    ``pool_size`` (PostgreSQL): connections in all, the writer's and the
    readers'.  ``readers`` (SQLite): reader threads.
    """

    log = Logger(namespace="iotd.store")

    def __init__(self, target: str, reactor: Any, readers: int = 2, pool_size: int = 8,
                 max_queued_writes: int = MAX_QUEUED_WRITES, max_queued_bytes: int = MAX_QUEUED_BYTES):
        self.path = target
        self.backend = backend_for(target)
        self.dialect = self.backend.dialect  # "sqlite" | "postgresql"
        self._reactor = reactor
        self._queue = WriteQueue(max_queued_writes, max_queued_bytes)
        self._writer: threading.Thread | None = None
        self._wconn: Any = None
        self._readers = Readers(self.backend, reactor,
                                readers if self.dialect == "sqlite" else max(1, pool_size - 1),
                                self._report, StoreUnavailable)
        self._running = False
        self._inflight: list = []
        self.commits = 0  # transactions committed, for tests and metrics
        self.health = "ok"  # "ok" or a state of the backend; see the module docstring
        self._checker: LoopingCall | None = None

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        """Open and migrate the database (in a thread), then start the threads."""
        opened: defer.Deferred = defer.Deferred()
        self._queue.reset()
        self._writer = threading.Thread(
            target=self._write_thread, args=(opened,), name="iotd-store-write", daemon=True
        )
        self._writer.start()
        await opened
        self._readers.start()
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
        await self._readers.stop()

    # -- writes -----------------------------------------------------------

    def write(self, fn: Callable[..., Any], *args: Any, size: int = 0) -> defer.Deferred:
        """Run ``fn(conn, *args)`` in the next group transaction (in its own savepoint).

        ``size``: the bytes this write holds while it waits (its payload), when
        the caller knows.  Fails at once with :class:`StoreUnavailable` when the
        store is not running, not healthy, or its queue is over a bound.
        """
        if not self._running:
            return defer.fail(StoreUnavailable("store is not running"))
        if self.health != "ok":
            metrics.store_writes_refused.labels(self.health).inc()
            return defer.fail(StoreUnavailable(self.backend.refused[self.health]))
        if not self._queue.admit(size):
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

    def _write_thread(self, opened: defer.Deferred) -> None:
        try:
            self._wconn = self.backend.open_writer()
        except Exception:
            self._reactor.callFromThread(opened.errback, Failure())
            return
        self._reactor.callFromThread(opened.callback, None)
        self._write_loop()

    def _write_loop(self) -> None:
        try:
            self._write_batches()
        except BaseException:  # never leave stop() waiting on a dead writer
            self.log.failure("store writer thread died")
            self._running = False
            items = self._inflight + self._queue.drain()
            dead = Failure(StoreUnavailable("store writer died"))
            self._reactor.callFromThread(
                self._deliver, [(item[2], None if item[0] is _STOP else dead) for item in items])

    def _write_batches(self) -> None:
        while True:
            batch = self._inflight = self._queue.take(BATCH)
            stop = None
            results: list[tuple[defer.Deferred, Any]] = []
            work = []
            for item in batch:
                if item[0] is _STOP:
                    stop = item[2]
                else:
                    work.append(item)
            if work:
                results = self._run_batch(work)
            self._inflight = []
            if results:
                self._reactor.callFromThread(self._deliver, results)
            if stop is not None:
                self._close_writer()
                self._reactor.callFromThread(stop.callback, None)
                return

    def _close_writer(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _run_batch(self, work: list) -> list:
        backend = self.backend
        try:
            if self._wconn is None:  # lost earlier: connect again (PostgreSQL)
                self._wconn = backend.open_writer()
            conn = self._wconn
            conn.execute(backend.begin_sql)
        except Exception as e:
            return self._all_failed(work, e)
        results: list[tuple[defer.Deferred, Any]] = []
        alone = len(work) == 1  # no savepoint: its transaction is its own (two statements fewer)
        try:
            for fn, args, d, _size in work:
                if not alone:
                    conn.execute("SAVEPOINT w")
                try:
                    value = fn(conn, *args)
                except BaseException as e:
                    if backend.lost(conn):  # the whole transaction is gone (disk full, connection lost)
                        return self._all_failed(work, e)
                    results.append((d, self._failure(e)))
                    if alone:
                        conn.execute("ROLLBACK")
                        return results
                    conn.execute("ROLLBACK TO SAVEPOINT w")
                else:
                    results.append((d, value))
                if not alone:
                    conn.execute("RELEASE SAVEPOINT w")
            refused = backend.before_commit()
            if refused is not None:
                conn.execute("ROLLBACK")
                self._report(refused)
                failure = Failure(StoreUnavailable(backend.refused[refused]))
                return [(d, failure) for _, _, d, _ in work]
            conn.execute("COMMIT")
        except Exception as e:
            try:
                if not backend.broken(conn):
                    conn.execute("ROLLBACK")
            except Exception:
                pass
            return self._all_failed(work, e, "commit failed: ")
        self.commits += 1
        return results

    def _failure(self, error: BaseException) -> Failure:
        """What a write's Deferred fails with (writer thread, inside the ``except``)."""
        state = self.backend.state_of(error)
        if state is None:
            return Failure()
        if state:
            self._report(state)
        return Failure(StoreUnavailable(str(error)))

    def _all_failed(self, work: list, error: BaseException, prefix: str = "") -> list:
        state = self.backend.batch_error_state(error)
        if state:
            self._report(state)
        if self._wconn is not None and self.backend.broken(self._wconn):
            self._close_writer()
        elif self._wconn is not None and self._wconn.in_transaction:
            try:
                self._wconn.execute("ROLLBACK")
            except Exception:
                self._close_writer()
        failure = Failure(StoreUnavailable(prefix + " ".join(str(error).split())))
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
        """Look at the backend now (and probe when not ok); returns :attr:`health`."""
        if not self._running:
            return self.health
        try:
            seen = await self._readers.inspect()
            if seen != "ok":
                self._set_health(seen)
            elif self.health != "ok" and self.health not in self.backend.sticky:
                await self.maintain(self.backend.probe)
                self._set_health("ok")
        except StoreUnavailable:
            pass  # the probe failed (no room yet, still unreachable): the writer reported it
        except Exception:
            self.log.failure("store health check failed")
        return self.health

    def _set_health(self, state: str, force: bool = False) -> None:
        old = self.health
        if state == old and not force:
            return
        if old in self.backend.sticky and not force:
            return  # only a new start clears it
        self.health = state
        for name in self.backend.states:
            metrics.store_health.labels(name).set(1 if name == state else 0)
        if state == old:
            return
        message = self.backend.messages.get(state)
        if message is None:
            return
        log = self.log.info if state == "ok" else (self.log.warn if state == "full" else self.log.error)
        log(message, where=self.backend.where)

    # -- reads ------------------------------------------------------------

    def read(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` on a reader thread."""
        if not self._running:
            return defer.fail(StoreUnavailable("store is not running"))
        return self._readers.read(fn, args)

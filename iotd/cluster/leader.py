"""One node of a cluster runs the sweeps: the holder of a PostgreSQL session advisory lock.

:class:`PgLeader` keeps a connection of its own (autocommit), used only by
its own one-thread pool -- never by the reactor thread.  Every
:data:`TRY_EVERY` seconds a follower asks ``pg_try_advisory_lock(KEY)``; the
leader checks that its session still answers (``SELECT 1``).  When the
leader dies its session ends, PostgreSQL releases the lock, and another node
takes it at its next try (within about ``TRY_EVERY`` seconds after the
server noticed: at once for a killed process on a live machine, within
``tcp_user_timeout``/keepalive time for a vanished machine).  A leader whose
connection breaks (the server restarted, the network failed) stops being
leader at once: it cannot know whether someone else holds the lock now.

Listeners get ``fn(is_leader)`` on each change (the push job starts and
stops its sweeps).  ``iotd_leader`` is 1 while this node leads.  One node
without a bus, or a SQLite store, uses :class:`iotd.cluster.node.AlwaysLeader`.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import threads
from twisted.internet.task import LoopingCall
from twisted.python.threadpool import ThreadPool

from iotd import metrics
from iotd.logs import Logger

KEY = 0x696F7464 + 1  # the migration lock is 0x696F7464 ("iotd")
TRY_EVERY = 1.0
CONNECT_TIMEOUT = 3


class PgLeader:
    log = Logger()

    def __init__(self, url: str, reactor: Any, clock: Any = None, node: str = "") -> None:
        self._url = url
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._node = node
        self.is_leader = False
        self._listeners: list[Callable[[bool], None]] = []
        self._conn: Any = None
        self._holding = False  # (leader thread) this session holds the lock
        self._pool = ThreadPool(1, 1, name="iotd-leader")
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._busy = False
        metrics.leader.set(0)

    def on_change(self, fn: Callable[[bool], None]) -> None:
        self._listeners.append(fn)

    async def start(self) -> None:
        self._pool.start()
        await self._tick()
        self._loop.start(TRY_EVERY, now=False).addErrback(lambda f: self.log.failure("leader election stopped", f))

    async def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        try:
            await threads.deferToThreadPool(self._reactor, self._pool, self._close)
        finally:
            self._pool.stop()
        self._set(False)

    async def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            held = await threads.deferToThreadPool(self._reactor, self._pool, self._check)
        except Exception as e:  # (the thread function catches what it can; this is a last resort)
            self.log.warn("leader election: {error}", error=e)
            held = False
        finally:
            self._busy = False
        self._set(held)

    # -- in the leader's own thread ----------------------------------------------

    def _check(self) -> bool:
        """True while this session holds the lock (taking it if free)."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                             keepalives=1, keepalives_idle=5, keepalives_interval=2,
                                             keepalives_count=3, tcp_user_timeout=10000,
                                             application_name="iotd leader")
                self._holding = False
            if self._holding:
                self._conn.execute("SELECT 1").fetchone()
                return True
            self._holding = bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)", (KEY,)).fetchone()[0])
            return self._holding
        except Exception:
            self._close()
            return False

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._holding = False
        if conn is not None:
            try:
                conn.close()  # the session ends: the lock is released
            except Exception:
                pass

    # -- state -------------------------------------------------------------------

    def _set(self, held: bool) -> None:
        if held == self.is_leader:
            return
        self.is_leader = held
        metrics.leader.set(1 if held else 0)
        if held:
            self.log.info("node {node} is the leader (runs the sweeps)", node=self._node)
        else:
            self.log.info("node {node} is no longer the leader", node=self._node)
        for fn in list(self._listeners):
            try:
                fn(held)
            except Exception:
                self.log.failure("a leadership listener failed")

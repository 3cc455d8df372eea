"""This node's heartbeat in the store, and which nodes live (``Cluster.live``).

Every :data:`HEARTBEAT` seconds a node writes its row in ``nodes`` (name,
whether it has a bus, what others may show of it) and reads the rows of
every node seen within :data:`DEAD_AFTER` seconds: those are ``live``.  A
node that stops cleanly deletes its row; one that dies drops out of
``live`` on every node within ``DEAD_AFTER + HEARTBEAT`` seconds.

At start (:func:`refuse_without_bus`, before the reactor runs) a node whose
``[cluster] bus`` is empty refuses to share the store with another live node
of another name: without a bus neither would see the other's events.  The
same name is not refused -- that is this node restarted after a crash.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.task import LoopingCall

from iotd import __version__
from iotd.logs import Logger
from iotd.store import nodes as nodesql

HEARTBEAT = 5.0
DEAD_AFTER = 20.0


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def refuse_without_bus(conn: Any, config: Any) -> None:
    """Raise SystemExit with the config error line if another live node uses this store and we have no bus."""
    if config.cluster.bus:
        return
    node = config.cluster.node_name
    since = _us(time.time() - DEAD_AFTER)
    for name, _bus, _doc in nodesql.live(conn, since):
        if name != node:
            raise SystemExit(f"iotd: config error: [cluster] bus: another node ({name}) uses this store; set a bus")


class Heartbeat:
    log = Logger()

    def __init__(self, cluster: Any, store: Any, clock: Any, doc: dict[str, Any]):
        self._cluster = cluster
        self._store = store
        self._clock = clock
        self._doc = dict(doc, version=__version__)
        self._started_us = _us(clock.seconds())
        self._loop = LoopingCall(self.beat)
        self._loop.clock = clock

    async def start_beating(self) -> None:
        """The first beat now (fires when written), then every :data:`HEARTBEAT` seconds."""
        await self.beat()
        self._loop.start(HEARTBEAT, now=False).addErrback(lambda f: self.log.failure("heartbeat stopped", f))

    async def beat(self) -> None:
        now = self._clock.seconds()
        cluster = self._cluster
        try:
            await self._store.write(nodesql.beat, cluster.node, self._started_us, _us(now),
                                    cluster.clustered, self._doc)
            rows = await self._store.read(nodesql.live, _us(now - DEAD_AFTER))
        except Exception as e:
            self.log.warn("heartbeat: the store did not answer: {error}", error=e)
            return
        names = {name for name, _bus, _doc in rows} | {cluster.node}
        gone, came = cluster.live - names, names - cluster.live
        if gone or came:
            self.log.info("nodes alive: {names}", names=", ".join(sorted(names)))
        cluster.live.clear()
        cluster.live.update(names)

    async def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        try:
            await self._store.write(nodesql.leave, self._cluster.node)
        except Exception:
            pass

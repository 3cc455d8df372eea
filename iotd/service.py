"""The core service: store, keys, registry and event log, started in that order.

Its start is asynchronous (opening the store in a thread, loading keys and the
registry); the HTTP listeners bind synchronously at start-up (so a busy port
aborts ``twistd``) and answer 503 until :attr:`CoreService.ready`.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from iotd.auth import KeyRing
from iotd.cluster.build import make_cluster
from iotd.cluster.nodes import Heartbeat
from iotd.cluster.propagate import propagate
from iotd.cluster.sequencer import Sequencer
from iotd.events import EventLog
from iotd.logs import Logger
from iotd.registry import Registry
from iotd.store import nodes as nodesql
from iotd.store import open_store

PRUNE_EVERY = 3600.0


def write_secret_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)


class CoreService(service.Service):
    log = Logger()
    name = "core"

    def __init__(self, config: Any, reactor: Any, clock: Any = None):
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.store = open_store(config, reactor)
        self.keys = KeyRing(self.store, reactor)
        self.registry = Registry(self.store, reactor)
        self.events = EventLog(self.store)
        self.cluster = make_cluster(config, self.store, reactor)
        self.heartbeat: Heartbeat | None = None
        self.ready = False
        self.started: defer.Deferred = defer.Deferred()
        self._prune = LoopingCall(self._prune_events)
        self._prune.clock = self.clock
        self._starting: defer.Deferred | None = None

    def startService(self):
        super().startService()
        self._starting = defer.Deferred.fromCoroutine(self._start())
        self._starting.addCallbacks(self._up, self._failed)
        return self._starting

    async def _start(self) -> None:
        await self.store.start()
        await self.events.start()
        await self.keys.start()
        await self.registry.start()
        await self._join()
        if len(self.keys) == 0:
            await self._bootstrap_admin()
        if self.config.retention.events_days > 0:
            self._prune.start(PRUNE_EVERY, now=True).addErrback(
                lambda f: self.log.failure("prune stopped", f))

    async def _join(self) -> None:
        """The bus (with its event sequencer), the propagation of key and registry
        changes, this node's heartbeat and the leader election."""
        cluster = self.cluster
        if cluster.clustered:
            cluster.channel.set_cluster_id(await self.store.read(nodesql.cluster_id))
            self.events.sequencer = Sequencer(self.events, cluster.channel, self.clock)
            await cluster.channel.start()
            self.events.sequencer.start()
        propagate(cluster, self.keys, self.registry)
        self.heartbeat = Heartbeat(cluster, self.store, self.clock,
                                   {"public_host": self.config.devicelink.public_host})
        await self.heartbeat.start_beating()
        await cluster.leader.start()

    def _up(self, _):
        self.ready = True
        self.log.info("store {path} open ({dialect}); {keys} api keys", path=self.store.backend.where,
                      dialect=self.store.dialect, keys=len(self.keys))
        self.started.callback(None)

    def _failed(self, failure):
        self.log.failure("iotd could not start", failure)
        self.started.errback(failure)
        self.started.addErrback(lambda _: None)
        if self.reactor.running:
            # twistd has no exit status of its own: leave with 1 once shut down.
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self.reactor.stop()

    async def _bootstrap_admin(self) -> None:
        key, secret = await self.keys.create(self.config.iotd.tenant, "admin", "admin")
        path = self.config.admin_key_path
        await defer.Deferred.fromCoroutine(_in_thread(write_secret_file, path, secret))
        self.log.info("created the first admin API key; it is in {path}", path=os.path.abspath(path))

    async def _prune_events(self) -> None:
        cutoff = int((self.clock.seconds() - self.config.retention.events_days * 86400) * 1_000_000)
        removed = await self.events.prune(cutoff)
        if removed:
            self.log.info("pruned {count} events older than {days} days", count=removed,
                          days=self.config.retention.events_days)

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.ready = False
        if self._prune.running:
            self._prune.stop()
        self.keys.stop()
        try:
            await self._leave()
            await self.registry.stop()
        finally:
            await self.store.stop()

    async def _leave(self) -> None:
        cluster = self.cluster
        try:
            await cluster.leader.stop()
        except Exception:
            self.log.failure("leaving the leader election failed")
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.events.sequencer is not None:
            self.events.sequencer.stop()
        await cluster.channel.stop()


async def _in_thread(fn, *args):
    from twisted.internet import threads

    return await threads.deferToThread(fn, *args)

"""The MQTT job: one client of the broker in ``[mqtt] broker`` (iotd is not a broker).

:func:`job` adds :class:`MqttService` to the tree when ``[mqtt] broker`` is
set.  The service connects once the core is up (:mod:`iotd.mqtt.connection`),
feeds what devices publish into the event log (:mod:`iotd.mqtt.ingest`),
sends the commands of ``"transport": "mqtt"`` devices
(:mod:`iotd.mqtt.commands`, when ``[push] enabled``), prunes old
redelivery marks every hour, and reports its state on ``/healthz``
(``"mqtt": "ok" | "connecting" | "down"``; anything but ``ok`` makes the
status ``degraded``, still 200: the other jobs are not affected).

Chosen where the spec is silent: the client id defaults to
``iotd-<node name>``, so each node keeps its own persistent session; with
several nodes (``[cluster] bus`` set) the filters are shared subscriptions
(``$share/iotd/...``) and each message is ingested by one node.  The
password is read from ``[mqtt] password_file`` (mode 0600) at start and is
never logged.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from iotd.context import Context
from iotd.logs import Logger
from iotd.mqtt.commands import Commands
from iotd.mqtt.connection import Connection
from iotd.mqtt.ingest import MARK_DAYS, Ingest
from iotd.mqtt.topics import Topics
from iotd.store import mqtt as mqttsql
from iotd.timefmt import micros_of

PRUNE_EVERY = 3600.0


def read_password(path: str) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip("\r\n")


class MqttService(service.Service):
    log = Logger()
    name = "mqtt"

    def __init__(self, ctx: Context, push: Any = None):
        cfg = ctx.config.mqtt
        self._ctx = ctx
        self.client_id = cfg.client_id or f"iotd-{ctx.cluster.node}"
        self.topics = Topics(cfg.topic_prefix, shared=ctx.cluster.clustered)
        self.ingest = Ingest(ctx.reactor, ctx.registry, ctx.events, self.topics, self.client_id,
                             auto_register=cfg.auto_register, max_devices=ctx.config.push.max_devices)
        self.commands = Commands(push, ctx.registry, ctx.reactor, self.topics, cfg.qos) if push else None
        self.ingest.commands = self.commands
        self.connection = Connection(ctx.reactor, cfg.broker, self.client_id, self.topics.filters(), cfg.qos,
                                     cfg.keepalive, self.ingest.message, on_up=self._up,
                                     username=cfg.username, password=read_password(cfg.password_file))
        self.ingest.connection = self.connection
        if self.commands is not None:
            self.commands.connection = self.connection
        self._core_up = False
        self._prune = LoopingCall(self.prune)
        self._prune.clock = ctx.reactor

    @property
    def state(self) -> str:
        return self.connection.state

    def begin(self) -> None:
        """The core is up (the registry is loaded): connect once running."""
        self._core_up = True
        if self.running:
            self._go()

    def startService(self) -> None:
        super().startService()
        if self._core_up:
            self._go()

    def _go(self) -> None:
        if self.commands is not None:
            self.commands.start()
        self.connection.start()
        self._prune.start(PRUNE_EVERY, now=True)

    def _up(self) -> None:
        if self.commands is not None:
            self.commands.connected()

    def prune(self) -> defer.Deferred:
        before = micros_of(self._ctx.reactor.seconds() - MARK_DAYS * 86400)
        d = self._ctx.store.write(mqttsql.prune, before)
        d.addErrback(lambda f: self.log.warn("mqtt: pruning old marks failed: {error}", error=f.getErrorMessage()))
        return d

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._prune.running:
            self._prune.stop()
        if self.commands is not None:
            self.commands.stop()
        self.connection.stop()
        return self.ingest.settle()


def job(ctx: Context, parent: service.MultiService) -> None:
    """Add the MQTT client when ``[mqtt] broker`` is set (it serves no routes)."""
    if ctx.config.mqtt.broker is None:
        return None
    push = parent.getServiceNamed("push") if ctx.config.push.enabled else None
    svc = MqttService(ctx, push)
    svc.setServiceParent(parent)
    ctx.health["mqtt"] = lambda: svc.state
    core = parent.getServiceNamed("core")
    core.started.addCallback(lambda result: (svc.begin(), result)[1])
    return None

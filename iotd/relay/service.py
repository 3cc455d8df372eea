"""The devicelink job's service: the one :class:`~iotd.relay.links.LinkManager`, built from
``[devicelink]``, with the store rows of its links (:mod:`iotd.relay.rows`), the sweep of dead
nodes' rows (:mod:`iotd.relay.reaper`) and the directory of every node's links
(:mod:`iotd.relay.directory`).  Its stop closes every link and waits for their ports and rows.

The REST side of the job (:mod:`iotd.web.devicelink`) builds it with
:func:`start_links` and closes over the directory; nothing else reaches it.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer

from iotd.relay.directory import LinkDirectory
from iotd.relay.links import LinkManager
from iotd.relay.reaper import DeadNodeReaper
from iotd.relay.rows import LinkRows


class LinkService(service.Service):
    name = "devicelink"

    def __init__(self, directory: LinkDirectory, reaper: DeadNodeReaper):
        self.directory = directory
        self.manager = directory.manager
        self.rows = directory.rows
        self.reaper = reaper

    async def start_rows(self) -> None:
        """Once the store is open: this node's stale rows go, the refresh and the reaper start."""
        await self.rows.start()
        self.reaper.start()

    def stopService(self):
        super().stopService()
        self.reaper.stop()
        self.directory.stop()
        closed = self.manager.close_all()  # (queues each link's row delete)
        return defer.gatherResults([closed, self.rows.stop()], consumeErrors=True).addCallback(lambda _: None)


def start_links(ctx: Any, parent: service.MultiService) -> LinkDirectory:
    """The links of ``[devicelink]`` as a child service of ``parent``; returns their directory.

    A device deleted from the registry loses its links at once.  The rows
    start once ``parent``'s ``core`` service has opened the store (whoever
    awaits ``core.started`` finds this node's stale rows gone).
    """
    cfg = ctx.config.devicelink
    manager = LinkManager(ctx.reactor, interface=cfg.interface, port_range=cfg.port_range,
                          max_links=cfg.max_links, connect_timeout=cfg.connect_timeout,
                          unused_ttl=cfg.unused_ttl, device_networks=cfg.allowed_device_networks,
                          max_links_per_tenant=cfg.max_links_per_tenant, splice=cfg.splice)
    rows = LinkRows(ctx.store, ctx.reactor, ctx.cluster.node, cfg.public_host)
    manager.on_opened(rows.opened)
    directory = LinkDirectory(manager, rows, ctx.store, ctx.cluster, ctx.reactor)
    svc = LinkService(directory, DeadNodeReaper(ctx.store, ctx.reactor, ctx.cluster))
    svc.setServiceParent(parent)
    ctx.registry.add_delete_listener(lambda device: manager.close_device(device.tenant, device.identifier))
    core = parent.getServiceNamed("core")
    core.started.addCallback(
        lambda result: defer.Deferred.fromCoroutine(svc.start_rows()).addCallback(lambda _: result))
    return directory

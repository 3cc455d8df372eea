"""The devicelink job's service: the one :class:`~iotd.relay.links.LinkManager`, built from
``[devicelink]``, whose stop closes every link and waits for their ports.

The REST side of the job (:mod:`iotd.web.devicelink`) builds it with
:func:`start_links` and closes over the manager; nothing else reaches it.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service

from iotd.relay.links import LinkManager


class LinkService(service.Service):
    name = "devicelink"

    def __init__(self, manager: LinkManager):
        self.manager = manager

    def stopService(self):
        super().stopService()
        return self.manager.close_all()


def start_links(cfg: Any, reactor: Any, registry: Any, parent: service.MultiService) -> LinkManager:
    """The link manager of ``[devicelink]`` (``cfg``), as a child service of ``parent``.

    A device deleted from ``registry`` loses its links at once.
    """
    manager = LinkManager(reactor, interface=cfg.interface, port_range=cfg.port_range,
                          max_links=cfg.max_links, connect_timeout=cfg.connect_timeout,
                          unused_ttl=cfg.unused_ttl, device_networks=cfg.allowed_device_networks,
                          max_links_per_tenant=cfg.max_links_per_tenant)
    LinkService(manager).setServiceParent(parent)
    registry.add_delete_listener(lambda device: manager.close_device(device.tenant, device.identifier))
    return manager

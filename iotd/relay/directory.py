"""The links of every node, as the REST layer sees them: list, find, close.

- This node's links come from memory (:class:`~iotd.relay.links.LinkManager`),
  with live counters.  Other nodes' links come from the store's ``links``
  rows (:mod:`iotd.relay.rows` writes them; their counters are at most
  :data:`~iotd.relay.rows.REFRESH_EVERY` seconds old), and only those of
  live nodes: in ``cluster.live``, or whose heartbeat row (read with the
  links, in the same query) is younger than
  :data:`iotd.cluster.nodes.DEAD_AFTER` -- the latter so that a node that
  just started is listed at once, not after this node's next heartbeat
  read.  A dead node's links leave the listing as soon as its heartbeat is
  old (within ``DEAD_AFTER`` plus one heartbeat), before
  :mod:`iotd.relay.reaper` deletes its rows.
- A node without a bus (``cluster.clustered`` false) is the only node: it
  reads nothing from the store, exactly as before links had rows.
- Every entry carries ``node``; lists are sorted oldest first (then by token).
- :meth:`LinkDirectory.close` closes a link here, or asks its node over the
  bus (:mod:`iotd.relay.forward`).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer

from iotd.cluster.nodes import DEAD_AFTER
from iotd.relay.forward import CloseForwarder
from iotd.relay.links import LinkManager
from iotd.relay.rows import LinkRows
from iotd.store import links as linksql

Visible = Callable[[str], bool]  # visible(device identifier): may the asking key see it


class LinkDirectory:
    def __init__(self, manager: LinkManager, rows: LinkRows, store: Any, cluster: Any, clock: Any) -> None:
        self.manager = manager
        self.rows = rows
        self.store = store
        self.cluster = cluster
        self.clock = clock
        self.forwarder = CloseForwarder(cluster, clock, self.close_here)

    async def list(self, tenant: str, visible: Visible) -> list[dict[str, Any]]:
        """Every node's open links of ``tenant`` that ``visible`` allows, oldest first."""
        entries = [(link.created_at * 1_000_000, link.token, self.rows.doc(link))
                   for link in self.manager.links(tenant) if visible(link.device)]
        if self.cluster.clustered:
            for (token, node, _tenant, created_us, doc), seen_us in await self.store.read(
                    linksql.of_tenant, tenant, self.cluster.node):
                if self._alive(node, seen_us) and _device_visible(doc, visible):
                    entries.append((created_us, token, doc))
        entries.sort(key=lambda e: (e[0], e[1]))
        return [doc for _, _, doc in entries]

    async def find(self, token: str, tenant: str, visible: Visible) -> dict[str, Any] | None:
        """The link ``token`` of ``tenant`` on any live node (None: no such link to this key)."""
        link = self.manager.get(token)
        if link is not None:
            return self.rows.doc(link) if link.tenant == tenant and visible(link.device) else None
        if not self.cluster.clustered:
            return None
        found = await self.store.read(linksql.get, token)
        if found is None:
            return None
        (_, node, row_tenant, _, doc), seen_us = found
        if node == self.cluster.node or row_tenant != tenant or not self._alive(node, seen_us):
            return None  # (a row of this node without its link is stale)
        return doc if _device_visible(doc, visible) else None

    async def close(self, token: str, tenant: str, visible: Visible) -> str:
        """Close ``token`` wherever it lives: ``"closed"``, ``"unknown"`` or ``"failed"``;
        raises :class:`~iotd.relay.forward.CloseTimeout` when its node did not answer."""
        link = self.manager.get(token)
        if link is not None:
            if link.tenant != tenant or not visible(link.device):
                return "unknown"
            return await self.close_here(token, tenant)
        doc = await self.find(token, tenant, visible)
        if doc is None:
            return "unknown"
        return await self.forwarder.ask(doc["node"], token, tenant)

    def _alive(self, node: str, seen_us: int | None) -> bool:
        if self.cluster.alive(node):
            return True
        return seen_us is not None and seen_us >= (self.clock.seconds() - DEAD_AFTER) * 1_000_000

    def close_here(self, token: str, tenant: str) -> defer.Deferred:
        """Close a link of this node; fires with ``"closed"`` once its sockets and row are gone."""
        link = self.manager.get(token)
        if link is None or link.tenant != tenant:
            # Not (or no longer) here: a row of this node's name for it would be stale.
            d = self.store.write(linksql.delete, [token], self.cluster.node)
            return d.addBoth(lambda _: "unknown")
        self.manager.close(token, tenant=tenant)
        waits = [self.rows.removed(token), link.when_closed()]
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: "closed")

    def stop(self) -> None:
        self.forwarder.stop()


def _device_visible(doc: Any, visible: Visible) -> bool:
    device = doc.get("device") if isinstance(doc, dict) else None
    return isinstance(device, str) and visible(device)

"""The ``[websocket]`` connection caps, one :class:`Limits` per daemon for both socket kinds.

The daemon builds it once (:mod:`iotd.tap`) and hands it to each kind's job;
a socket counts from the moment its TCP connection is taken over until it is
gone.
"""

from __future__ import annotations

from typing import Any

from iotd import errors


class Limits:
    """``[websocket] max_connections`` and ``max_connections_per_address``, for all kinds."""

    @classmethod
    def of(cls, websocket: Any) -> "Limits":
        """The limits of a ``[websocket]`` config section."""
        return cls(websocket.max_connections, websocket.max_connections_per_address)

    def __init__(self, total: int, per_address: int):
        self.total = total
        self.per_address = per_address
        self.open = 0
        self._by_address: dict[str, int] = {}

    def check(self, host: str) -> None:
        if self.open >= self.total:
            raise errors.Unavailable("too many websocket connections; try again later")
        if self.per_address and self._by_address.get(host, 0) >= self.per_address:
            raise errors.Unavailable("too many websocket connections from this address")

    def add(self, host: str) -> None:
        self.open += 1
        self._by_address[host] = self._by_address.get(host, 0) + 1

    def remove(self, host: str) -> None:
        self.open -= 1
        left = self._by_address.get(host, 1) - 1
        if left > 0:
            self._by_address[host] = left
        else:
            self._by_address.pop(host, None)


def peer_host(request: Any) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", peer))

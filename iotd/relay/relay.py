"""What the link manager needs of one link's sockets, TCP (:mod:`iotd.relay.tcp`) or UDP
(:mod:`iotd.relay.udp`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

if TYPE_CHECKING:
    from iotd.relay.link import Link


class Relay:
    """The sockets of one link; the ``Link`` owns the timers, the counters and the bookkeeping."""

    def __init__(self, link: Link, reactor: Any, interface: str) -> None:
        self.link = link
        self.reactor = reactor
        self.interface = interface

    def listen(self, port: int) -> None:
        """Bind the link's port on ``interface``; raises ``CannotListenError`` if it is taken."""
        raise NotImplementedError

    def start(self) -> None:
        """Called once the port is bound (nothing to do by default)."""

    def shutdown(self, abort: bool = True) -> defer.Deferred[Any]:
        """Close every socket of the link; fires when all are closed."""
        raise NotImplementedError

    def buffered(self) -> int:
        """Bytes held in userspace write buffers (none by default: UDP never queues)."""
        return 0

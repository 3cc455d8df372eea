"""Shared pieces for the relay tests: fixtures, device servers and clients on real loopback sockets.

Everything waits on Deferreds that fire on socket events, each with a
deadline (``within``) so that a broken relay fails a test instead of hanging
the run.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from zope.interface import implementer

from iotd.relay.links import LinkManager

LOOPBACK = "127.0.0.1"
DEADLINE = 10.0
# The devices of these tests listen on loopback, which a link reaches only when allowed explicitly.
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture
def reactor() -> Any:
    """The global reactor pytest-twisted installed (epoll on Linux)."""
    from twisted.internet import reactor as r

    return r


def free_port_range(n: int, lo: int = 20000, hi: int = 32000) -> tuple[int, int]:
    """``n`` consecutive ports, free for TCP and UDP right now, below the ephemeral range."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(lo, hi - n)
        if all(port_is_free(p, "tcp") and port_is_free(p, "udp") for p in range(base, base + n)):
            return (base, base + n - 1)
    raise RuntimeError("no free port range found")


def port_is_free(port: int, protocol: str) -> bool:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        if protocol == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listenTCP does
        s.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port(protocol: str = "tcp") -> int:
    """A port the kernel just picked (ephemeral range), released again."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def within(reactor: Any, d: defer.Deferred[Any], seconds: float = DEADLINE) -> defer.Deferred[Any]:
    """``d`` with a deadline on the real reactor."""
    return d.addTimeout(seconds, reactor)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def make_manager(reactor: Any) -> Any:
    """``make_manager(**kw)`` -> a LinkManager on loopback with a fresh port range; closed after the test.

    Its devices may be on loopback (``device_networks=127.0.0.0/8``) unless the test says otherwise.
    """
    managers: list[LinkManager] = []

    def make(**kw: Any) -> LinkManager:
        kw.setdefault("interface", LOOPBACK)
        kw.setdefault("port_range", free_port_range(10))
        kw.setdefault("device_networks", LOOPBACK_NETWORKS)
        m = LinkManager(kw.pop("reactor", reactor), **kw)
        managers.append(m)
        return m

    yield make
    for m in managers:
        pytest_twisted.blockon(within(reactor, m.close_all()))


def open_link(manager: LinkManager, protocol: str, device_port: int, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        tenant="t1",
        device="DEV1",
        protocol=protocol,
        device_host=LOOPBACK,
        device_port=device_port,
        timeout_ms=0,
        source=None,
        key=None,
        iv=None,
    )
    args.update(kw)
    return manager.open(**args)


# -- TCP ------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """A TCP end that records what it gets and offers Deferreds on events.

    ``eof_d`` fires on the other side's FIN (or a lost connection), ``lost``
    on a lost connection.  ``echo``: write back what arrives, close after FIN.  ``reply_on_eof``: bytes to send after
    the other side's FIN, then close.  ``paused``: never read (back-pressure).  ``send_then_half_close``: bytes
    to send on connect, followed by this side's FIN (``shutdown(SHUT_WR)``); it keeps reading.
    """

    def __init__(self, echo: bool = False, reply_on_eof: bytes | None = None, paused: bool = False,
                 send_then_half_close: bytes | None = None):
        self.echo = echo
        self.reply_on_eof = reply_on_eof
        self.paused = paused
        self.send_then_half_close = send_then_half_close
        self.received = bytearray()
        self.eof = False
        self.made: defer.Deferred[Peer] = defer.Deferred()
        self.lost: defer.Deferred[Any] = defer.Deferred()
        self.eof_d: defer.Deferred[None] = defer.Deferred()
        self._waits: list[tuple[int, defer.Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        if self.paused:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        if self.send_then_half_close is not None:
            self.transport.write(self.send_then_half_close)  # type: ignore[union-attr]
            self.transport.loseWriteConnection()  # type: ignore[union-attr]
        self.made.callback(self)

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), not a FIN."""
        sock = self.transport.getHandle()  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)  # type: ignore[union-attr]
        for n, d in list(self._waits):
            if len(self.received) >= n:
                self._waits.remove((n, d))
                d.callback(bytes(self.received))

    def wait_for(self, n: int) -> defer.Deferred[bytes]:
        """Fires with everything received once at least ``n`` bytes are in."""
        d: defer.Deferred[bytes] = defer.Deferred()
        if len(self.received) >= n:
            d.callback(bytes(self.received))
        else:
            self._waits.append((n, d))
        return d

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.reply_on_eof is not None:
            self.transport.write(self.reply_on_eof)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif self.echo or self.send_then_half_close is not None:
            self.transport.loseConnection()  # type: ignore[union-attr]  (both directions are done)
        self.eof_d.callback(None)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost_reason = reason
        if not self.eof_d.called:
            self.eof_d.callback(None)
        self.lost.callback(None)


class DeviceServer(Factory):
    """A TCP device on 127.0.0.1:<ephemeral>; ``peers`` are its connections in order."""

    noisy = False

    def __init__(self, **peer_kw: Any) -> None:
        self.peer_kw = peer_kw
        self.peers: list[Peer] = []
        self.connected: defer.Deferred[Peer] = defer.Deferred()
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> Peer:
        p = Peer(**self.peer_kw)
        self.peers.append(p)
        if not self.connected.called:
            p.made.addCallback(self.connected.callback)
        return p

    def listen(self, reactor: Any, rcvbuf: int | None = None) -> int:
        self.port = reactor.listenTCP(0, self, interface=LOOPBACK)
        if rcvbuf is not None:  # accepted sockets inherit it; it also stops autotuning
            self.port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        return int(self.port.getHost().port)


def connect_client(reactor: Any, port: int, bind: tuple[str, int] | None = None, **kw: Any) -> Peer:
    """A Twisted TCP client to the link's port; returns its Peer at once."""
    from twisted.internet.protocol import ClientFactory

    peer = Peer(**kw)

    class F(ClientFactory):
        noisy = False

        def buildProtocol(self, addr: Any) -> Peer:
            return peer

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            peer.connectionLost(reason)

    reactor.connectTCP(LOOPBACK, port, F(), bindAddress=bind)
    return peer


# -- UDP ------------------------------------------------------------------------


class Datagrams(DatagramProtocol):
    """A UDP end: records ``(data, addr)``, optionally echoes; ``wait_for(n)`` fires at n datagrams."""

    noisy = False

    def __init__(self, echo: bool = False, transform: Any = None) -> None:
        self.echo = echo
        self.transform = transform  # applied to what is echoed back
        self.got: list[tuple[bytes, Any]] = []
        self._waits: list[tuple[int, defer.Deferred[list[tuple[bytes, Any]]]]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))
        if self.echo:
            self.transport.write(data, addr)  # type: ignore[union-attr]
        for n, d in list(self._waits):
            if len(self.got) >= n:
                self._waits.remove((n, d))
                d.callback(self.got)

    def wait_for(self, n: int) -> defer.Deferred[list[tuple[bytes, Any]]]:
        d: defer.Deferred[list[tuple[bytes, Any]]] = defer.Deferred()
        if len(self.got) >= n:
            d.callback(self.got)
        else:
            self._waits.append((n, d))
        return d

    def send(self, data: bytes, port: int) -> None:
        self.transport.write(data, (LOOPBACK, port))  # type: ignore[union-attr]

    @property
    def port(self) -> int:
        return int(self.transport.getHost().port)  # type: ignore[union-attr]


def udp_endpoint(reactor: Any, port: int = 0, **kw: Any) -> Datagrams:
    proto = Datagrams(**kw)
    p = reactor.listenUDP(port, proto, interface=LOOPBACK, maxPacketSize=65535)
    p.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    return proto


class Net:
    """Makes device servers and clients and closes them all after the test."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._ports: list[Any] = []
        self._peers: list[Peer] = []

    def tcp_device(self, rcvbuf: int | None = None, **peer_kw: Any) -> tuple[DeviceServer, int]:
        server = DeviceServer(**peer_kw)
        port = server.listen(self.reactor, rcvbuf)
        self._ports.append(server.port)
        return server, port

    def tcp_client(self, port: int, bind: tuple[str, int] | None = None, **kw: Any) -> Peer:
        peer = connect_client(self.reactor, port, bind, **kw)
        self._peers.append(peer)
        return peer

    def udp(self, port: int = 0, **kw: Any) -> Datagrams:
        proto = udp_endpoint(self.reactor, port, **kw)
        self._ports.append(proto.transport)
        return proto

    def close(self) -> defer.Deferred[Any]:
        waits = []
        for server in self._servers():
            for peer in server.peers:
                self._peers.append(peer)
        for peer in self._peers:
            if peer.transport is not None and not peer.lost.called:
                peer.transport.abortConnection()  # type: ignore[attr-defined]
                waits.append(peer.lost)
        for p in self._ports:
            waits.append(defer.maybeDeferred(p.stopListening))
        return defer.DeferredList(waits, consumeErrors=True)

    def _servers(self) -> list[DeviceServer]:
        return [p.factory for p in self._ports if isinstance(getattr(p, "factory", None), DeviceServer)]


@pytest.fixture
def net(reactor: Any) -> Any:
    n = Net(reactor)
    yield n
    pytest_twisted.blockon(within(reactor, n.close()))

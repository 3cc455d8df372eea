"""TCP links over real loopback sockets (timers on a ``Clock`` where the test is about time)."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from typing import Any

import pytest_twisted
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay_helpers import (  # noqa: F401  (fixtures)
    LOOPBACK,
    counter,
    free_port,
    make_manager,
    net,
    open_link,
    port_is_free,
    reactor,
    within,
)

MiB = 1024 * 1024


@pytest_twisted.inlineCallbacks
def test_echo_one_mebibyte_intact(reactor, make_manager, net):
    device, dport = net.tcp_device(echo=True)
    link = open_link(make_manager(), "tcp", dport)
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    payload = os.urandom(MiB)
    client.transport.write(payload)
    got = yield within(reactor, client.wait_for(MiB))
    assert got == payload
    assert bytes(device.peers[0].received) == payload
    assert (link.bytes_up, link.bytes_down) == (MiB, MiB)
    assert link.used and not link.closed


@pytest_twisted.inlineCallbacks
def test_encryption_both_ways_odd_chunks(reactor, make_manager, net):
    key, iv = os.urandom(32), os.urandom(16)
    ours = Cipher(algorithms.AES(key), modes.CTR(iv))
    enc, dec = ours.encryptor(), ours.decryptor()  # the client's own continuous streams
    device, dport = net.tcp_device(echo=True)
    link = open_link(make_manager(), "tcp", dport, key=key, iv=iv)
    assert link.encrypted
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)

    plain = os.urandom(300_001)
    i = 0
    for size in [1, 2, 13, 16, 17, 4095, 65537, 100, 7]:
        client.transport.write(enc.update(plain[i : i + size]))
        i += size
    client.transport.write(enc.update(plain[i:]))

    wire = yield within(reactor, client.wait_for(len(plain)))
    assert bytes(device.peers[0].received) == plain  # decrypted on the way in
    assert wire != plain
    assert dec.update(wire) == plain  # encrypted on the way out, one continuous stream


@pytest_twisted.inlineCallbacks
def test_source_pinning_refuses_other_clients(reactor, make_manager, net):
    device, dport = net.tcp_device(echo=True)
    pinned = free_port()
    link = open_link(make_manager(), "tcp", dport, source=(LOOPBACK, pinned))
    refused_before = counter("iotd_link_failures_total", reason="refused_source")

    stranger = net.tcp_client(link.port)
    yield within(reactor, stranger.eof_d)  # closed at once
    assert stranger.received == b""
    assert not link.used and not link.closed
    assert device.peers == []  # the device was never dialled

    client = net.tcp_client(link.port, bind=(LOOPBACK, pinned))
    yield within(reactor, client.made)
    client.transport.write(b"ping")
    assert (yield within(reactor, client.wait_for(4))) == b"ping"

    late = net.tcp_client(link.port)
    yield within(reactor, late.eof_d)
    assert counter("iotd_link_failures_total", reason="refused_source") == refused_before + 2
    client.transport.write(b"pong")
    assert (yield within(reactor, client.wait_for(8))) == b"pingpong"


@pytest_twisted.inlineCallbacks
def test_first_client_inherits_then_link_closes_with_it(reactor, make_manager, net):
    device, dport = net.tcp_device(echo=True)
    link = open_link(make_manager(), "tcp", dport)
    first = net.tcp_client(link.port)
    yield within(reactor, first.made)
    first.transport.write(b"mine")
    yield within(reactor, first.wait_for(4))

    second = net.tcp_client(link.port)
    yield within(reactor, second.eof_d)
    assert second.received == b""
    assert len(device.peers) == 1

    first.transport.write(b"!")
    assert (yield within(reactor, first.wait_for(5))) == b"mine!"
    first.transport.loseConnection()
    yield within(reactor, link.when_closed())
    assert link.close_reason in ("done", "client_reset")
    assert port_is_free(link.port, "tcp")


@pytest_twisted.inlineCallbacks
def test_half_close_client_still_gets_the_reply(reactor, make_manager, net):
    """shutdown(SHUT_WR) from the client reaches the device as FIN; the reply keeps
    flowing, and the orderly close afterwards does not reset away its tail still in
    the relay's kernel send buffer."""
    reply = os.urandom(512 * 1024)  # more than one write buffer, so it is still flowing after FIN
    device, dport = net.tcp_device(reply_on_eof=reply)
    link = open_link(make_manager(), "tcp", dport)
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    client.transport.write(b"request")
    client.transport.loseWriteConnection()  # shutdown(SHUT_WR)
    yield within(reactor, client.eof_d)  # the device's FIN, after its reply
    assert bytes(client.received) == reply
    assert bytes(device.peers[0].received) == b"request"
    assert device.peers[0].eof
    yield within(reactor, link.when_closed())
    assert link.close_reason == "done"
    assert port_is_free(link.port, "tcp")


@pytest_twisted.inlineCallbacks
def test_close_token_closes_both_sockets_and_frees_the_port(reactor, make_manager, net):
    device, dport = net.tcp_device(echo=True)
    manager = make_manager()
    link = open_link(manager, "tcp", dport)
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    client.transport.write(b"x")
    yield within(reactor, client.wait_for(1))

    assert manager.close("no-such-token") is False
    assert manager.close(link.token, tenant="other-tenant") is False
    assert manager.close(link.token) is True
    assert manager.get(link.token) is None
    yield within(reactor, link.when_closed())
    yield within(reactor, client.eof_d)
    yield within(reactor, device.peers[0].lost)
    assert link.close_reason == "deleted"
    assert port_is_free(link.port, "tcp")
    assert manager.close(link.token) is False


@pytest_twisted.inlineCallbacks
def test_unreachable_device_closes_client_and_counts(reactor, make_manager, net):
    dead_port = free_port()  # nothing listens there
    link = open_link(make_manager(), "tcp", dead_port)
    before = counter("iotd_link_failures_total", reason="connect_failed")
    client = net.tcp_client(link.port)
    yield within(reactor, client.eof_d)
    assert client.received == b""
    yield within(reactor, link.when_closed())
    assert link.close_reason == "connect_failed"
    assert counter("iotd_link_failures_total", reason="connect_failed") == before + 1


class _TCPTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def test_connect_timeout_with_memory_reactor(make_manager):
    """The dial is given up after connect_timeout on the injected clock."""
    mem = MemoryReactorClock()
    manager = make_manager(reactor=mem, connect_timeout=5.0)
    link = open_link(manager, "tcp", 9999)
    factory = mem.tcpServers[0][1]
    client = factory.buildProtocol(IPv4Address("TCP", LOOPBACK, 50000))
    transport = _TCPTransport()
    client.makeConnection(transport)
    assert transport.producerState == "paused"  # nothing is read until the device answers
    assert mem.tcpClients[0][:2] == (LOOPBACK, 9999)

    before = counter("iotd_link_failures_total", reason="connect_timeout")
    mem.advance(4.9)
    assert not link.closed
    mem.advance(0.2)
    assert link.closed and link.close_reason == "connect_timeout"
    assert transport.disconnecting or transport.disconnected
    assert counter("iotd_link_failures_total", reason="connect_timeout") == before + 1
    client.connectionLost(None)  # what the real transport would do next


@pytest_twisted.inlineCallbacks
def test_idle_timeout_rearms_lazily(reactor, make_manager, net):
    clock = task.Clock()
    device, dport = net.tcp_device(echo=True)
    link = open_link(make_manager(clock=clock), "tcp", dport, timeout_ms=1000)
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    client.transport.write(b"a")
    yield within(reactor, client.wait_for(1))

    clock.advance(0.9)
    client.transport.write(b"b")  # activity at t=0.9 re-arms nothing now...
    yield within(reactor, client.wait_for(2))
    assert len(clock.getDelayedCalls()) >= 1
    clock.advance(0.1)  # ...the timer fires at t=1.0, sees 0.1 s idle and re-arms for 0.9
    assert not link.closed
    clock.advance(0.85)
    assert not link.closed
    clock.advance(0.05)  # t=1.9: 1.0 s with no byte either way
    assert link.closed and link.close_reason == "idle_timeout"
    yield within(reactor, client.eof_d)
    yield within(reactor, link.when_closed())


@pytest_twisted.inlineCallbacks
def test_back_pressure_bounds_relay_memory(reactor, make_manager, net):
    """A device that stops reading blocks the client; the relay buffers < 1 MiB of 32 MiB offered."""
    from twisted.internet.task import deferLater

    device, dport = net.tcp_device(paused=True, rcvbuf=64 * 1024)
    link = open_link(make_manager(), "tcp", dport)

    sock = socket.create_connection((LOOPBACK, link.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.setblocking(False)
    yield within(reactor, device.connected)

    block = os.urandom(256 * 1024)
    offered, sent, eagain, stalled_turns, max_buffered = 32 * MiB, 0, 0, 0, 0
    digest = hashlib.sha256()
    attempted = 0
    while attempted < offered and stalled_turns < 50:
        progress = False
        while attempted < offered:
            chunk = block[: min(len(block), offered - attempted)]
            try:
                n = sock.send(chunk)
            except OSError as e:
                assert e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
                eagain += 1
                break
            digest.update(chunk[:n])
            sent += n
            attempted += n
            progress = True
        stalled_turns = 0 if progress else stalled_turns + 1
        yield deferLater(reactor, 0 if progress else 0.002, lambda: None)
        max_buffered = max(max_buffered, link.buffered())

    # The client is blocked well before 32 MiB, and the relay holds little.
    assert eagain > 0 and stalled_turns >= 50
    assert sent < offered
    assert max_buffered < MiB
    relay = link._relay
    assert relay.client.transport not in reactor.getReaders()  # paused: not reading

    # Let the device read again: everything sent arrives intact, and the rest flows too.
    peer = device.peers[0]
    peer.transport.resumeProducing()
    while attempted < offered or len(peer.received) < sent:
        progress = False
        while attempted < offered:
            chunk = block[: min(len(block), offered - attempted)]
            try:
                n = sock.send(chunk)
            except BlockingIOError:
                break
            digest.update(chunk[:n])
            sent += n
            attempted += n
            progress = True
        yield deferLater(reactor, 0 if progress else 0.001, lambda: None)
        max_buffered = max(max_buffered, link.buffered())
    assert sent == offered
    assert max_buffered < MiB
    assert hashlib.sha256(peer.received).digest() == digest.digest()
    sock.close()


# -- the device half-closes first, and resets ------------------------------------


@pytest_twisted.inlineCallbacks
def test_device_fin_first_client_gets_every_byte_then_eof_and_can_still_send(reactor, make_manager, net):
    """The device sends and half-closes at once: the client reads all of it, then EOF; the client's
    own direction stays open until it closes, and only then does the link close and free its port."""
    greeting = os.urandom(512 * 1024)  # more than one write buffer: still flowing when the FIN arrives
    device, dport = net.tcp_device(send_then_half_close=greeting)
    link = open_link(make_manager(), "tcp", dport)
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    yield within(reactor, client.eof_d)
    assert client.eof and not client.lost.called  # a half-close, not a lost connection
    assert bytes(client.received) == greeting
    assert not link.closed

    client.transport.write(b"still talking after your FIN")
    got = yield within(reactor, device.peers[0].wait_for(28))
    assert got == b"still talking after your FIN"
    assert not link.closed and not device.peers[0].lost.called

    client.transport.loseConnection()
    yield within(reactor, device.peers[0].eof_d)
    yield within(reactor, link.when_closed())
    assert link.close_reason == "done"
    yield within(reactor, device.peers[0].lost)
    assert port_is_free(link.port, "tcp")


@pytest_twisted.inlineCallbacks
def test_device_reset_closes_the_client_and_the_link(reactor, make_manager, net):
    device, dport = net.tcp_device(echo=True)
    manager = make_manager()
    link = open_link(manager, "tcp", dport)
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    client.transport.write(b"hello")
    yield within(reactor, client.wait_for(5))
    device.peers[0].reset()
    yield within(reactor, client.lost)
    yield within(reactor, link.when_closed())
    assert link.close_reason == "device_reset"
    assert manager.get(link.token) is None
    assert port_is_free(link.port, "tcp")


@pytest_twisted.inlineCallbacks
def test_client_reset_closes_the_device_connection_and_the_link(reactor, make_manager, net):
    device, dport = net.tcp_device(echo=True)
    manager = make_manager()
    link = open_link(manager, "tcp", dport)
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    client.transport.write(b"hello")
    yield within(reactor, client.wait_for(5))
    client.reset()
    yield within(reactor, device.peers[0].lost)
    yield within(reactor, link.when_closed())
    assert link.close_reason == "client_reset"
    assert manager.get(link.token) is None
    assert port_is_free(link.port, "tcp")


# -- device addresses checked when the client connects ---------------------------


class _Resolver:
    """A name resolver answering every name with ``addresses`` (and counting the questions)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, name: str, portNumber: int = 0, addressTypes: Any = None,
                        transportSemantics: str = "TCP") -> Any:
        self.asked.append(name)
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return None


class _ResolvingReactor:
    """The real reactor, with ``nameResolver`` replaced."""

    def __init__(self, real: Any, resolver: _Resolver) -> None:
        self._real = real
        self.nameResolver = resolver

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest_twisted.inlineCallbacks
def test_host_name_resolving_to_loopback_is_refused_by_default(reactor, make_manager, net):
    """Empty allowed_device_networks: a name for 127.0.0.1 is resolved at connect time and refused;
    the device is never dialled, the client is closed, and that is counted."""
    device, dport = net.tcp_device(echo=True)
    manager = make_manager(device_networks=())
    link = open_link(manager, "tcp", dport, device_host="localhost")  # a name: accepted until resolved
    before = counter("iotd_link_failures_total", reason="refused_address")
    client = net.tcp_client(link.port)
    yield within(reactor, client.lost)
    assert client.received == b""
    yield within(reactor, link.when_closed())
    assert link.close_reason == "refused_address"
    assert device.peers == []
    assert counter("iotd_link_failures_total", reason="refused_address") == before + 1
    assert port_is_free(link.port, "tcp")


@pytest_twisted.inlineCallbacks
def test_host_name_is_resolved_once_and_only_allowed_addresses_are_dialled(reactor, make_manager, net):
    """A name that resolves to a refused address and an allowed one: the relay dials the allowed one
    (as an address, without resolving again)."""
    device, dport = net.tcp_device(echo=True)
    resolver = _Resolver(["169.254.169.254", LOOPBACK])
    manager = make_manager(reactor=_ResolvingReactor(reactor, resolver))
    link = open_link(manager, "tcp", dport, device_host="plc.example")
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    client.transport.write(b"via a name")
    assert (yield within(reactor, client.wait_for(10))) == b"via a name"
    assert len(device.peers) == 1 and resolver.asked == ["plc.example"]


@pytest_twisted.inlineCallbacks
def test_host_name_that_does_not_resolve_closes_the_client(reactor, make_manager, net):
    manager = make_manager(reactor=_ResolvingReactor(reactor, _Resolver([])))
    link = open_link(manager, "tcp", 9, device_host="nowhere.example")
    before = counter("iotd_link_failures_total", reason="connect_failed")
    client = net.tcp_client(link.port)
    yield within(reactor, client.lost)
    yield within(reactor, link.when_closed())
    assert link.close_reason == "connect_failed"
    assert counter("iotd_link_failures_total", reason="connect_failed") == before + 1

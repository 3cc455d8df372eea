"""UDP links over real loopback sockets (timers on a ``Clock`` where the test is about time)."""

from __future__ import annotations

import os
import random

import pytest_twisted
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet import task

from relay_helpers import (  # noqa: F401  (fixtures)
    LOOPBACK,
    counter,
    make_manager,
    net,
    open_link,
    port_is_free,
    reactor,
    within,
)


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest_twisted.inlineCallbacks
def test_echo_keeps_datagram_boundaries(reactor, make_manager, net):
    device = net.udp(echo=True)
    link = open_link(make_manager(), "udp", device.port)
    client = net.udp()
    sizes = list(range(1, 8001)) + [60_000, 65_507]
    # Send in windows that fit the default socket receive buffers (which count
    # ~1 KiB of overhead per datagram), so nothing is lost on the way.
    i = 0
    while i < len(sizes):
        batch, in_flight = [], 0
        while i < len(sizes) and len(batch) < 32 and in_flight < 48 * 1024:
            batch.append(sizes[i])
            in_flight += sizes[i]
            i += 1
        expected = len(client.got) + len(batch)
        for size in batch:
            client.send(payload(size), link.port)
        yield within(reactor, client.wait_for(expected))
    got = sorted((len(d), d) for d, _ in client.got)
    assert [n for n, _ in got] == sorted(sizes)
    assert all(d == payload(n) for n, d in got)
    assert {addr for _, addr in client.got} == {(LOOPBACK, link.port)}
    assert link.datagrams_up == link.datagrams_down == len(sizes)
    assert link.bytes_up == link.bytes_down == sum(sizes)
    assert link.refused == link.dropped == 0


@pytest_twisted.inlineCallbacks
def test_encryption_per_datagram(reactor, make_manager, net):
    key, iv = os.urandom(32), os.urandom(16)

    def ctr(data: bytes) -> bytes:  # the client's own, fresh keystream per datagram
        return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(data)

    device = net.udp(echo=True)
    link = open_link(make_manager(), "udp", device.port, key=key, iv=iv)
    client = net.udp()
    plains = [os.urandom(n) for n in (1, 15, 16, 17, 1200, 8000, 40_000)]
    for p in plains:
        client.send(ctr(p), link.port)
    yield within(reactor, client.wait_for(len(plains)))
    assert [d for d, _ in device.got] == plains  # decrypted on the way in, datagram by datagram
    wire = [d for d, _ in client.got]
    assert all(w != p for w, p in zip(wire, plains) if len(p) > 1)
    assert [ctr(w) for w in wire] == plains  # encrypted on the way out


@pytest_twisted.inlineCallbacks
def test_first_sender_inherits_others_dropped(reactor, make_manager, net):
    device = net.udp(echo=True)
    link = open_link(make_manager(), "udp", device.port)
    first, other = net.udp(), net.udp()
    first.send(b"one", link.port)
    yield within(reactor, first.wait_for(1))
    other.send(b"intruder", link.port)
    first.send(b"two", link.port)  # queued behind the intruder's datagram on the same socket
    yield within(reactor, first.wait_for(2))
    assert [d for d, _ in device.got] == [b"one", b"two"]
    assert other.got == []
    assert link.refused == 1


@pytest_twisted.inlineCallbacks
def test_source_pinning_drops_other_senders(reactor, make_manager, net):
    device = net.udp(echo=True)
    other, client = net.udp(), net.udp()
    link = open_link(make_manager(), "udp", device.port, source=(LOOPBACK, client.port))
    other.send(b"not you", link.port)  # first, but not the pinned address
    client.send(b"me", link.port)
    yield within(reactor, client.wait_for(1))
    assert [d for d, _ in device.got] == [b"me"]
    assert client.got == [(b"me", (LOOPBACK, link.port))]
    assert other.got == []
    assert link.refused == 1


@pytest_twisted.inlineCallbacks
def test_pinned_source_gets_device_datagrams_before_sending(reactor, make_manager, net):
    client = net.udp()
    device = net.udp()
    link = open_link(make_manager(), "udp", device.port, source=(LOOPBACK, client.port))
    device.send(b"unsolicited", link._relay._device_port.getHost().port)
    got = yield within(reactor, client.wait_for(1))
    assert got == [(b"unsolicited", (LOOPBACK, link.port))]
    assert (link.datagrams_up, link.datagrams_down) == (0, 1)


@pytest_twisted.inlineCallbacks
def test_device_datagrams_without_client_are_dropped(reactor, make_manager, net):
    device = net.udp(echo=True)
    link = open_link(make_manager(), "udp", device.port)
    client = net.udp()
    device.send(b"nobody listens", link._relay._device_port.getHost().port)
    client.send(b"now", link.port)  # the device echoes this one after the first went nowhere
    yield within(reactor, client.wait_for(1))
    assert [d for d, _ in client.got] == [b"now"]
    assert link.dropped == 1


@pytest_twisted.inlineCallbacks
def test_idle_timeout(reactor, make_manager, net):
    clock = task.Clock()
    device = net.udp(echo=True)
    link = open_link(make_manager(clock=clock), "udp", device.port, timeout_ms=500)
    client = net.udp()
    client.send(b"a", link.port)
    yield within(reactor, client.wait_for(1))
    clock.advance(0.4)
    client.send(b"b", link.port)
    yield within(reactor, client.wait_for(2))
    clock.advance(0.4)  # t=0.8: 0.4 s since the last datagram
    assert not link.closed
    clock.advance(0.1)
    assert link.closed and link.close_reason == "idle_timeout"
    yield within(reactor, link.when_closed())
    assert port_is_free(link.port, "udp")


@pytest_twisted.inlineCallbacks
def test_close_token_frees_the_port(reactor, make_manager, net):
    device = net.udp(echo=True)
    manager = make_manager()
    link = open_link(manager, "udp", device.port)
    assert not port_is_free(link.port, "udp")
    assert manager.close(link.token) is True
    assert manager.links("t1") == []
    yield within(reactor, link.when_closed())
    assert port_is_free(link.port, "udp")
    assert manager.close(link.token) is False


def test_udp_needs_an_ip_address(make_manager):
    import pytest

    with pytest.raises(ValueError):
        open_link(make_manager(), "udp", 9, device_host="device.example")

"""TCP links relayed in the kernel (``splice(2)``, :mod:`iotd.relay.splice`), over real loopback
sockets through the real relay; and the fall-back to the userspace path."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet.task import deferLater

from iotd.relay import splice as splice_mod
from relay_helpers import (  # noqa: F401  (fixtures)
    LOOPBACK,
    make_manager,
    net,
    open_link,
    port_is_free,
    reactor,
    within,
)

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(not splice_mod.available(), reason="os.splice unavailable or switched off")


def turns(reactor: Any, n: int = 20) -> Any:
    """Let the reactor run ``n`` turns (no timing: a few event-loop iterations)."""
    d = deferLater(reactor, 0, lambda: None)
    for _ in range(n - 1):
        d.addCallback(lambda _: deferLater(reactor, 0, lambda: None))
    return d


@pytest_twisted.inlineCallbacks
def relaying(reactor: Any, link: Any) -> Any:
    """Wait (reactor turns, with a deadline) until the relay has both of its connections."""
    for _ in range(10_000):
        if link.relay.state.value == "relaying":
            return
        yield deferLater(reactor, 0.001, lambda: None)
    raise AssertionError("the link never started relaying")


@pytest_twisted.inlineCallbacks
def linked(reactor: Any, manager: Any, net: Any, link_options: dict | None = None, **device_options: Any) -> Any:
    """A device (``net.tcp_device(**device_options)``), a TCP link to it and a client on the link,
    relaying: ``(device, link, client)``."""
    device, dport = net.tcp_device(**device_options)
    link = open_link(manager, "tcp", dport, **(link_options or {}))
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    yield within(reactor, device.connected)
    yield relaying(reactor, link)
    return device, link, client


@pytest_twisted.inlineCallbacks
def test_plain_link_splices_and_echoes_intact(reactor, make_manager, net):
    device, link, client = yield linked(reactor, make_manager(), net, echo=True)
    relay = link.relay
    assert relay.splice is not None
    payload = os.urandom(8 * MiB + 12345)
    client.transport.write(payload)
    got = yield within(reactor, client.wait_for(len(payload)), 60)
    assert got == payload
    assert bytes(device.peers[0].received) == payload
    assert (link.bytes_up, link.bytes_down) == (len(payload), len(payload))
    assert link.buffered() == 0 and relay.splice.buffered() == 0


@pytest_twisted.inlineCallbacks
def test_large_transfer_both_ways_at_once(reactor, make_manager, net):
    """64 MiB up while 16 MiB come down, on one spliced link: every byte, in order."""
    down = os.urandom(16 * MiB)
    device, link, client = yield linked(reactor, make_manager(), net, send_then_half_close=down)
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    for i in range(64):
        chunk = bytes([i]) + block[1:]
        digest.update(chunk)
        client.transport.write(chunk)
    got = yield within(reactor, device.peers[0].wait_for(64 * MiB), 120)
    assert hashlib.sha256(got).digest() == digest.digest()
    yield within(reactor, client.eof_d, 60)
    assert bytes(client.received) == down
    assert link.relay.splice is not None
    assert (link.bytes_up, link.bytes_down) == (64 * MiB, 16 * MiB)


@pytest_twisted.inlineCallbacks
def test_client_half_close_passes_fin_after_the_bytes_and_the_reply_comes_back(reactor, make_manager, net):
    device, link, client = yield linked(reactor, make_manager(), net, reply_on_eof=b"got it")
    payload = os.urandom(3 * MiB)
    client.transport.write(payload)
    client.transport.loseWriteConnection()
    yield within(reactor, device.peers[0].eof_d, 30)
    assert bytes(device.peers[0].received) == payload
    yield within(reactor, client.eof_d, 30)
    assert bytes(client.received) == b"got it"
    yield within(reactor, link.when_closed())
    assert link.close_reason == "done"
    assert link.relay.splice.up.closed and link.relay.splice.down.closed
    assert port_is_free(link.port, "tcp")


@pytest_twisted.inlineCallbacks
def test_device_fin_first_client_still_sends(reactor, make_manager, net):
    greeting = os.urandom(2 * MiB)
    device, link, client = yield linked(reactor, make_manager(), net, send_then_half_close=greeting)
    yield within(reactor, client.eof_d, 30)
    assert bytes(client.received) == greeting and not client.lost.called
    client.transport.write(b"after your FIN")
    got = yield within(reactor, device.peers[0].wait_for(14))
    assert got == b"after your FIN"
    client.transport.loseConnection()
    yield within(reactor, link.when_closed())
    assert link.close_reason == "done"


@pytest_twisted.inlineCallbacks
def test_device_reset_and_delete_close_everything(reactor, make_manager, net):
    device, dport = net.tcp_device(echo=True)
    manager = make_manager()
    link = open_link(manager, "tcp", dport)
    client = net.tcp_client(link.port)
    yield within(reactor, client.made)
    yield within(reactor, device.connected)
    yield relaying(reactor, link)
    client.transport.write(b"hello")
    yield within(reactor, client.wait_for(5))
    device.peers[0].reset()
    yield within(reactor, client.lost)
    yield within(reactor, link.when_closed())
    assert link.close_reason == "device_reset"
    assert link.relay.splice.up.closed and link.relay.splice.down.closed

    link2 = open_link(manager, "tcp", dport)
    client2 = net.tcp_client(link2.port)
    yield within(reactor, client2.made)
    yield relaying(reactor, link2)
    client2.transport.write(b"x" * 100_000)
    yield within(reactor, client2.wait_for(100_000))
    link2.close("closed")
    yield within(reactor, client2.lost)
    yield within(reactor, link2.when_closed())
    assert link2.relay.splice.up.closed and port_is_free(link2.port, "tcp")


@pytest_twisted.inlineCallbacks
def test_a_device_that_stops_reading_blocks_the_client(reactor, make_manager, net):
    """Back-pressure: the client stalls well before 32 MiB, the relay holds nothing in userspace
    and stops reading the client; once the device reads again every byte arrives intact."""
    device, dport = net.tcp_device(paused=True, rcvbuf=64 * 1024)
    link = open_link(make_manager(), "tcp", dport)
    sock = socket.create_connection((LOOPBACK, link.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.setblocking(False)
    yield within(reactor, device.connected)
    yield relaying(reactor, link)
    relay = link.relay
    assert relay.splice is not None

    block = os.urandom(256 * 1024)
    offered, sent, stalled = 32 * MiB, 0, 0
    digest = hashlib.sha256()
    while sent < offered and stalled < 50:
        progress = False
        while sent < offered:
            chunk = block[: min(len(block), offered - sent)]
            try:
                n = sock.send(chunk)
            except OSError as e:
                assert e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
                break
            digest.update(chunk[:n])
            sent += n
            progress = True
        stalled = 0 if progress else stalled + 1
        yield deferLater(reactor, 0 if progress else 0.002, lambda: None)
        assert link.buffered() == 0
        assert relay.splice.buffered() <= splice_mod.PIPE_SIZE
    assert sent < offered
    assert relay.splice.up.pending > 0  # the pipe holds what the device's socket did not take
    assert relay.client.transport not in reactor.getReaders()

    peer = device.peers[0]
    peer.transport.resumeProducing()
    while sent < offered or len(peer.received) < sent:
        progress = False
        while sent < offered:
            chunk = block[: min(len(block), offered - sent)]
            try:
                n = sock.send(chunk)
            except BlockingIOError:
                break
            digest.update(chunk[:n])
            sent += n
            progress = True
        yield deferLater(reactor, 0 if progress else 0.001, lambda: None)
    assert hashlib.sha256(peer.received).digest() == digest.digest()
    assert link.bytes_up == offered
    sock.close()


@pytest_twisted.inlineCallbacks
def test_a_paused_side_stops_splicing_until_resumed(reactor, make_manager, net):
    device, link, client = yield linked(reactor, make_manager(), net)
    relay = link.relay
    client.transport.write(b"a" * 1000)
    yield within(reactor, device.peers[0].wait_for(1000))

    relay.client.pipe.pauseProducing()
    client.transport.write(b"b" * 500_000)
    yield turns(reactor, 50)
    assert link.bytes_up == 1000  # nothing read from the paused side
    assert relay.client.transport not in reactor.getReaders()

    relay.client.pipe.resumeProducing()
    got = yield within(reactor, device.peers[0].wait_for(501_000))
    assert got == b"a" * 1000 + b"b" * 500_000


@pytest_twisted.inlineCallbacks
def test_encrypted_link_falls_back_to_the_userspace_path(reactor, make_manager, net):
    key, iv = os.urandom(32), os.urandom(16)
    ours = Cipher(algorithms.AES(key), modes.CTR(iv))
    enc, dec = ours.encryptor(), ours.decryptor()
    device, link, client = yield linked(reactor, make_manager(), net, echo=True, link_options=dict(key=key, iv=iv))
    assert link.relay.splice is None
    plain = os.urandom(MiB)
    client.transport.write(enc.update(plain))
    got = yield within(reactor, client.wait_for(MiB))
    assert bytes(device.peers[0].received) == plain  # decrypted on the way in
    assert dec.update(got) == plain  # encrypted on the way out


@pytest_twisted.inlineCallbacks
def test_rate_limited_link_falls_back(reactor, make_manager, net):
    device, link, client = yield linked(reactor, make_manager(), net, echo=True, link_options=dict(rate_limit=10 * MiB))
    assert link.relay.splice is None
    client.transport.write(b"z" * 70_000)
    got = yield within(reactor, client.wait_for(70_000))
    assert got == b"z" * 70_000


@pytest_twisted.inlineCallbacks
def test_switched_off_falls_back(reactor, make_manager, net, monkeypatch):
    monkeypatch.setattr(splice_mod, "ENABLED", False)
    device, link, client = yield linked(reactor, make_manager(), net, echo=True)
    assert link.relay.splice is None
    payload = os.urandom(2 * MiB)
    client.transport.write(payload)
    got = yield within(reactor, client.wait_for(len(payload)))
    assert got == payload


@pytest_twisted.inlineCallbacks
def test_no_pipes_left_falls_back(reactor, make_manager, net, monkeypatch):
    def no_pipe() -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(splice_mod, "_pipe", no_pipe)
    device, link, client = yield linked(reactor, make_manager(), net, echo=True)
    assert link.relay.splice is None
    client.transport.write(b"still relayed")
    got = yield within(reactor, client.wait_for(13))
    assert got == b"still relayed"


@pytest_twisted.inlineCallbacks
def test_devicelink_splice_off_in_the_config_keeps_the_userspace_path(reactor, make_manager, net):
    from iotd import config

    cfg = config.parse_text("[devicelink]\nsplice = off\n").devicelink
    assert cfg.splice is False and config.Config().devicelink.splice is True  # default: auto
    device, link, client = yield linked(reactor, make_manager(splice=cfg.splice), net, echo=True)
    assert link.relay.splice is None
    client.transport.write(b"userspace")
    got = yield within(reactor, client.wait_for(9))
    assert got == b"userspace"

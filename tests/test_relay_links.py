"""LinkManager: ports, limits, lookups, unused_ttl, metrics and logs."""

from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher

from iotd.relay.links import AddressNotAllowed, NoFreePort, TenantLinkLimit, TooManyLinks
from relay_helpers import (  # noqa: F401  (fixtures)
    LOOPBACK,
    counter,
    free_port_range,
    make_manager,
    net,
    open_link,
    port_is_free,
    reactor,
    within,
)


@pytest_twisted.inlineCallbacks
def test_no_free_port_when_range_exhausted(reactor, make_manager):
    lo, hi = free_port_range(2)
    manager = make_manager(port_range=(lo, hi))
    a = open_link(manager, "tcp", 9)
    b = open_link(manager, "tcp", 9)
    assert {a.port, b.port} == {lo, hi}
    before = counter("iotd_link_failures_total", reason="no_free_port")
    with pytest.raises(NoFreePort):
        open_link(manager, "tcp", 9)
    assert counter("iotd_link_failures_total", reason="no_free_port") == before + 1
    # UDP ports are a separate space.
    u = open_link(manager, "udp", 9)
    assert u.port in (lo, hi)

    manager.close(a.token)
    yield within(reactor, a.when_closed())
    c = open_link(manager, "tcp", 9)
    assert c.port == a.port


@pytest_twisted.inlineCallbacks
def test_ports_taken_by_others_are_skipped_and_the_last_free_port_is_found(reactor, make_manager):
    lo, hi = free_port_range(5)
    free = lo + 3
    squatters = []
    for port in range(lo, hi + 1):
        if port != free:
            s = socket.socket()
            s.bind((LOOPBACK, port))
            s.listen()
            squatters.append(s)
    try:
        manager = make_manager(port_range=(lo, hi))
        for _ in range(10):  # every time, whatever the random picks
            link = open_link(manager, "tcp", 9)
            assert link.port == free
            with pytest.raises(NoFreePort):
                open_link(manager, "tcp", 9)
            manager.close(link.token)
            yield within(reactor, link.when_closed())
    finally:
        for s in squatters:
            s.close()


def test_link_ports_are_random_within_the_range_not_in_sequence(make_manager):
    """A scanner cannot guess the next link's port: ports are drawn at random from port_range."""
    lo, hi = free_port_range(1000)
    manager = make_manager(port_range=(lo, hi), max_links=20)
    ports = [open_link(manager, "udp", 9).port for _ in range(20)]
    assert len(set(ports)) == 20 and all(lo <= p <= hi for p in ports)
    # In sequence, 19 of 19 steps would be +1; at random about one step in a thousand is.
    steps = sum(1 for a, b in zip(ports, ports[1:]) if b == a + 1)
    assert steps <= 3, ports
    assert ports != sorted(ports)


def test_max_links_per_tenant_leaves_room_for_other_tenants(make_manager):
    manager = make_manager(max_links=5, max_links_per_tenant=2)
    open_link(manager, "udp", 9, tenant="greedy")
    held = open_link(manager, "tcp", 9, tenant="greedy")
    with pytest.raises(TenantLinkLimit) as exc:
        open_link(manager, "udp", 9, tenant="greedy")
    assert "max_links_per_tenant" in str(exc.value)
    assert open_link(manager, "udp", 9, tenant="other").tenant == "other"
    manager.close(held.token)  # a closed link frees the tenant's slot at once
    assert open_link(manager, "udp", 9, tenant="greedy").tenant == "greedy"
    assert len(manager) == 3


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1",
                                  "169.254.169.254", "fe80::1", "::ffff:169.254.0.1"])
def test_default_policy_refuses_local_device_addresses(make_manager, host):
    manager = make_manager(device_networks=())
    before = counter("iotd_link_failures_total", reason="refused_address")
    for protocol in ("tcp", "udp"):
        with pytest.raises(AddressNotAllowed):
            open_link(manager, protocol, 9, device_host=host)
    assert len(manager) == 0
    assert counter("iotd_link_failures_total", reason="refused_address") == before + 2


def test_max_links(make_manager):
    manager = make_manager(max_links=2)
    open_link(manager, "tcp", 9)
    open_link(manager, "udp", 9)
    with pytest.raises(TooManyLinks) as exc:
        open_link(manager, "tcp", 9)
    assert isinstance(exc.value, NoFreePort)
    assert len(manager) == 2


@pytest.mark.parametrize(
    "bad",
    [
        dict(protocol="sctp"),
        dict(device_port=0),
        dict(device_port=65536),
        dict(timeout_ms=-1),
        dict(key=os.urandom(32)),
        dict(key=os.urandom(16), iv=os.urandom(16)),
        dict(key=os.urandom(32), iv=os.urandom(12)),
        dict(source=("not-an-ip", 1234)),
        dict(source=(LOOPBACK, 0)),
    ],
)
def test_bad_arguments(make_manager, bad):
    manager = make_manager()
    args = {"protocol": "tcp", "device_port": 9, **bad}
    with pytest.raises(ValueError):
        open_link(manager, args.pop("protocol"), args.pop("device_port"), **args)
    assert len(manager) == 0


def test_lookups_and_close_device(make_manager):
    manager = make_manager()
    a = open_link(manager, "tcp", 9, tenant="t1", device="DEV1")
    b = open_link(manager, "udp", 9, tenant="t1", device="DEV1")
    c = open_link(manager, "tcp", 9, tenant="t1", device="DEV2")
    d = open_link(manager, "tcp", 9, tenant="t2", device="DEV1")
    assert manager.get(a.token) is a and manager.get("nope") is None
    assert manager.links("t1") == [a, b, c]
    assert manager.links("t2") == [d]
    assert len({x.token for x in (a, b, c, d)}) == 4
    assert all(len(x.token) >= 32 for x in (a, b, c, d))  # 24 random bytes, URL-safe
    assert manager.close_device("t1", "dev1") == 2
    assert a.closed and b.closed and not c.closed and not d.closed
    assert a.close_reason == "device_removed"
    assert manager.links("t1") == [c]


def test_to_json_has_counters_and_no_key_material(make_manager):
    key, iv = os.urandom(32), os.urandom(16)
    link = open_link(make_manager(), "udp", 5683, key=key, iv=iv, source=(LOOPBACK, 4000))
    j = link.to_json()
    assert j["protocol"] == "udp" and j["port"] == link.port and j["devicePort"] == 5683
    assert j["encrypted"] is True and j["source"] == {"host": LOOPBACK, "port": 4000}
    assert {"bytesUp", "bytesDown", "datagramsUp", "datagramsDown", "createdAt", "lastActivity"} <= set(j)
    text = repr(j) + repr(link)
    assert key.hex() not in text and iv.hex() not in text
    assert link.token not in repr(link)


@pytest_twisted.inlineCallbacks
def test_unused_ttl_closes_and_frees_port(reactor, make_manager):
    clock = task.Clock()
    manager = make_manager(clock=clock, unused_ttl=60.0)
    idle = open_link(manager, "tcp", 9)
    clock.advance(59.9)
    assert not idle.closed
    clock.advance(0.1)
    assert idle.closed and idle.close_reason == "unused"
    assert manager.get(idle.token) is None
    yield within(reactor, idle.when_closed())
    assert port_is_free(idle.port, "tcp")


@pytest_twisted.inlineCallbacks
def test_used_link_outlives_unused_ttl(reactor, make_manager, net):
    clock = task.Clock()
    device = net.udp(echo=True)
    link = open_link(make_manager(clock=clock, unused_ttl=5.0), "udp", device.port)
    client = net.udp()
    client.send(b"hi", link.port)
    yield within(reactor, client.wait_for(1))
    clock.advance(3600)  # timeout_ms=0: never idle
    assert not link.closed


@pytest_twisted.inlineCallbacks
def test_metrics_and_logs(reactor, make_manager, net):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = task.Clock()
        manager = make_manager(clock=clock, flush_interval=10.0)
        device = net.udp(echo=True)
        open_before = counter("iotd_links_open", protocol="udp")
        total_before = counter("iotd_links_total", protocol="udp")
        up_before = counter("iotd_relayed_bytes_total", protocol="udp", direction="up")
        dg_before = counter("iotd_relayed_datagrams_total", direction="down")

        link = open_link(manager, "udp", device.port)
        assert counter("iotd_links_open", protocol="udp") == open_before + 1
        assert counter("iotd_links_total", protocol="udp") == total_before + 1
        client = net.udp()
        client.send(b"12345", link.port)
        yield within(reactor, client.wait_for(1))
        # Counted in plain ints first; Prometheus sees them at the next flush.
        assert counter("iotd_relayed_bytes_total", protocol="udp", direction="up") == up_before
        clock.advance(10.0)
        assert counter("iotd_relayed_bytes_total", protocol="udp", direction="up") == up_before + 5
        assert counter("iotd_relayed_datagrams_total", direction="down") == dg_before + 1

        client.send(b"678", link.port)
        yield within(reactor, client.wait_for(2))
        manager.close(link.token)  # flushes the rest
        assert counter("iotd_relayed_bytes_total", protocol="udp", direction="up") == up_before + 8
        assert counter("iotd_links_open", protocol="udp") == open_before
        yield within(reactor, link.when_closed())
    finally:
        globalLogPublisher.removeObserver(events.append)

    mine = [e for e in events if e.get("log_namespace", "").startswith("iotd.relay")]
    texts = [formatEvent(e) for e in mine]
    opened = [t for t in texts if "opened" in t]
    closed = [t for t in texts if "closed" in t and "reason deleted" in t]
    assert opened and closed
    for t in opened + closed:
        assert link.token[:6] in t and str(link.port) in t and "udp" in t and "DEV1" in t
    assert not any(link.token in t for t in texts)
    assert all(e.get("token") == link.token[:6] for e in mine if "token" in e)


@pytest_twisted.inlineCallbacks
def test_close_all_waits_for_ports(reactor, make_manager):
    manager = make_manager()
    links = [open_link(manager, p, 9) for p in ("tcp", "udp", "tcp")]
    d = manager.close_all()
    assert all(link.closed for link in links) and len(manager) == 0
    yield within(reactor, d)
    assert port_is_free(links[0].port, "tcp") and port_is_free(links[1].port, "udp")

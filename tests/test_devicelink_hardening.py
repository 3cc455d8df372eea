"""DeviceLink against a hostile key holder: no link to the daemon's own host, no port grabbing.

A key with ``devices:create`` + ``deviceLink:create`` chooses the address a link connects to. With
an empty ``[devicelink] allowed_device_networks`` (the default) loopback, unspecified and link-local
addresses are refused — as literals at link creation (403), as names when the client connects.
``require_source`` and ``max_links_per_tenant`` bound what one key or tenant can take.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import protocol, reactor, threads

from ws_helpers import eventually

PORTS = "31330-31349"
LOCAL_HOSTS = ["127.0.0.1", "127.0.0.53", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1", "169.254.169.254",
               "fe80::1", "::ffff:169.254.169.254", "::ffff:0.0.0.0"]


@pytest.fixture
def daemon_config():
    return {"devicelink": {"port_range": PORTS}}  # allowed_device_networks left empty: the default


def refused_count() -> float:
    return REGISTRY.get_sample_value("iotd_link_failures_total", {"reason": "refused_address"}) or 0.0


async def linker_key(daemon) -> str:
    """A non-admin key that may register devices and open links (what the attack needed)."""
    return await daemon.new_key("read_only", permissions=["devices:create", "devices:update",
                                                          "deviceLink:create", "deviceLink:delete"])


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@pytest.fixture
def echo_port():
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` to the link port and read until the link closes (or 5 s pass)."""
    got = b""
    try:  # (a refused link may reset the connection before connect() has even returned)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        pass
    return got


@pytest_twisted.ensureDeferred
async def test_empty_allowed_device_networks_refuses_local_addresses_with_403(daemon):
    key = await linker_key(daemon)
    for n, host in enumerate(LOCAL_HOSTS):
        await daemon.put_device(f"local-{n}", key=key, host=host, ports={"default": daemon.port})
        for proto in ("tcp", "udp"):
            status, body = await daemon.request("POST", f"/api/v1/devicelink/local-{n}", {"protocol": proto},
                                                key=key)
            assert status == 403, (host, proto, body)
            assert body["error"]["code"] == "device_host_not_allowed"
            assert "allowed_device_networks" in body["error"]["message"]
    assert (await daemon.request("GET", "/api/v1/devicelink"))[1]["items"] == []
    # Other addresses are still linked (nothing needs to answer until a client connects).
    await daemon.put_device("remote", key=key, host="192.0.2.10", ports={"default": 502})
    status, link = await daemon.request("POST", "/api/v1/devicelink/remote", {"protocol": "tcp"}, key=key)
    assert status == 201, link


@pytest_twisted.ensureDeferred
async def test_a_host_name_for_loopback_cannot_reach_the_daemons_own_metrics(daemon):
    """``localhost`` is a name: the link is created, resolved when the client connects, and refused —
    the client gets not one byte of /metrics and the link closes, logged and counted."""
    key = await linker_key(daemon)
    await daemon.put_device("sneaky", key=key, host="localhost", ports={"default": daemon.port})
    status, link = await daemon.request("POST", "/api/v1/devicelink/sneaky", {"protocol": "tcp"}, key=key)
    assert status == 201, link
    before = refused_count()
    got = await threads.deferToThread(exchange, link["port"], b"GET /metrics HTTP/1.0\r\n\r\n")
    assert got == b""
    await eventually(lambda: refused_count() == before + 1)
    assert (await daemon.request("GET", "/api/v1/devicelink"))[1]["items"] == []  # the link closed


@pytest.mark.parametrize("daemon_config", [{"devicelink": {"port_range": PORTS,
                                                           "allowed_device_networks": "127.0.0.0/8"}}])
@pytest_twisted.ensureDeferred
async def test_explicit_allowed_device_networks_allows_loopback_also_by_name(daemon, echo_port):
    for n, host in enumerate(["127.0.0.1", "::ffff:127.0.0.1", "localhost"]):
        await daemon.put_device(f"plc-{n}", host=host, ports={"default": echo_port})
        status, link = await daemon.request("POST", f"/api/v1/devicelink/plc-{n}", {"protocol": "tcp"})
        assert status == 201, (host, link)
        with socket.create_connection(("127.0.0.1", link["port"]), timeout=5) as s:
            s.sendall(b"ping")
            assert await threads.deferToThread(s.recv, 4) == b"ping"
    await daemon.put_device("v6", host="::1", ports={"default": echo_port})
    assert (await daemon.request("POST", "/api/v1/devicelink/v6", {"protocol": "tcp"}))[0] == 403


@pytest.mark.parametrize("daemon_config", [{"devicelink": {"port_range": PORTS, "require_source": "true",
                                                           "allowed_device_networks": "192.0.2.0/24"}}])
@pytest_twisted.ensureDeferred
async def test_require_source_refuses_a_link_without_source_with_422(daemon):
    await daemon.put_device("plc", host="192.0.2.10", ports={"default": 502})
    status, body = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"})
    assert status == 422 and "source" in body["error"]["message"]
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc",
                                        {"protocol": "tcp", "source": {"host": "198.51.100.7", "port": 4000}})
    assert status == 201 and link["source"] == {"host": "198.51.100.7", "port": 4000}


@pytest.mark.parametrize("daemon_config", [{"devicelink": {"port_range": PORTS, "max_links": "10",
                                                           "max_links_per_tenant": "2",
                                                           "allowed_device_networks": "192.0.2.0/24"}}])
@pytest_twisted.ensureDeferred
async def test_one_tenant_cannot_take_every_link_max_links_per_tenant(daemon):
    other = await daemon.new_key("admin", tenant="other")
    for key in (None, other):
        await daemon.put_device("plc", key=key, host="192.0.2.10", ports={"default": 5683})
    tokens = []
    for _ in range(2):
        status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"})
        assert status == 201
        tokens.append(link["token"])
    status, body = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"})
    assert status == 503 and body["error"]["code"] == "too_many_links"
    assert "max_links_per_tenant" in body["error"]["message"] and "2" in body["error"]["message"]
    status, _ = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"}, key=other)
    assert status == 201  # another tenant still gets its link
    assert (await daemon.request("DELETE", f"/api/v1/devicelink/{tokens[0]}"))[0] == 204
    assert (await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"}))[0] == 201


@pytest.mark.parametrize("daemon_config", [{"devicelink": {"port_range": PORTS,
                                                           "allowed_device_networks": "192.0.2.0/24"}}])
@pytest_twisted.ensureDeferred
async def test_group_key_deletes_only_links_of_devices_in_its_groups(daemon):
    await daemon.put_device("mine", host="192.0.2.10", ports={"default": 502}, tags=["a"])
    await daemon.put_device("theirs", host="192.0.2.11", ports={"default": 502}, tags=["b"])
    group = await daemon.new_key("group", groups=["a"], permissions=["deviceLink:create", "deviceLink:delete"])
    status, theirs = await daemon.request("POST", "/api/v1/devicelink/theirs", {"protocol": "tcp"})
    assert status == 201
    status, mine = await daemon.request("POST", "/api/v1/devicelink/mine", {"protocol": "tcp"}, key=group)
    assert status == 201
    status, body = await daemon.request("DELETE", f"/api/v1/devicelink/{theirs['token']}", key=group)
    assert status == 404 and body["error"]["code"] == "not_found"
    listing = (await daemon.request("GET", "/api/v1/devicelink"))[1]["items"]
    assert sorted(link["token"] for link in listing) == sorted([theirs["token"], mine["token"]])
    assert (await daemon.request("DELETE", f"/api/v1/devicelink/{mine['token']}", key=group))[0] == 204
    listing = (await daemon.request("GET", "/api/v1/devicelink"))[1]["items"]
    assert [link["token"] for link in listing] == [theirs["token"]]

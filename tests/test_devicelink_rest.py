"""DeviceLink over REST: create, use, list, delete, and every 4xx/503 of the spec."""

import socket

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet import protocol, reactor, threads


@pytest.fixture
def daemon_config():
    return {"devicelink": {"port_range": "31310-31312", "allowed_device_networks": "127.0.0.0/8"}}


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@pytest.fixture
def echo_server():
    factory = protocol.Factory.forProtocol(Echo)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def closed(sock):
    """True when the peer closed or reset the connection."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def talk(port, payload, expect):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while len(got) < expect:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


@pytest_twisted.ensureDeferred
async def test_tcp_link_relays_and_delete_closes_and_frees_the_port(daemon, echo_server):
    await daemon.put_device("plc-1", host="127.0.0.1", ports={"default": echo_server})
    status, link = await daemon.request("POST", "/api/v1/devicelink/Plc-1", {"protocol": "tcp"})
    assert status == 201, link
    assert link["device"] == "PLC-1" and link["devicePort"] == echo_server and link["timeout"] == 0
    assert len(link["token"]) >= 22 and 31310 <= link["port"] <= 31312
    client = socket.create_connection(("127.0.0.1", link["port"]), timeout=5)
    try:
        client.sendall(b"hello device")
        got = await threads.deferToThread(client.recv, 100)
        assert got == b"hello device"
        status, listing = await daemon.request("GET", "/api/v1/devicelink")
        assert [l["token"] for l in listing["items"]] == [link["token"]]
        assert listing["items"][0]["bytesUp"] >= 0 and "encrypt" not in listing["items"][0]
        assert (await daemon.request("DELETE", f"/api/v1/devicelink/{link['token']}"))[0] == 204
        assert await threads.deferToThread(closed, client)  # closed by the daemon at once
    finally:
        client.close()
    assert (await daemon.request("DELETE", f"/api/v1/devicelink/{link['token']}"))[0] == 404
    status, listing = await daemon.request("GET", "/api/v1/devicelink")
    assert listing["items"] == []
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", link["port"]))


@pytest_twisted.ensureDeferred
async def test_encrypted_link_checked_against_independent_ctr(daemon, echo_server):
    await daemon.put_device("plc-2", host="127.0.0.1", ports={"default": echo_server})
    key, iv = bytes(range(32)), bytes(range(16))
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc-2", {
        "protocol": "tcp", "encrypt": {"key": key.hex(), "initializationVector": iv.hex()}})
    assert status == 201 and link["encrypt"]["key"] == key.hex()
    up = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    down = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
    plain = b"secret reading 42"
    got = await threads.deferToThread(talk, link["port"], up.update(plain), len(plain))
    assert got != plain and down.update(got) == plain


@pytest_twisted.ensureDeferred
async def test_validation_errors(daemon):
    await daemon.put_device("noport", host="127.0.0.1")
    await daemon.put_device("nohost", ports={"default": 1})
    await daemon.put_device("far", host="10.1.2.3", ports={"default": 1})
    await daemon.put_device("named", host="localhost", ports={"default": 1})
    cases = [
        ("ghost", {"protocol": "tcp"}, 404),
        ("nohost", {"protocol": "tcp"}, 422),
        ("noport", {"protocol": "tcp"}, 422),
        ("noport", {"protocol": "sctp", "devicePort": 1}, 422),
        ("noport", {"protocol": "tcp", "devicePort": 70000}, 422),
        ("noport", {"protocol": "udp", "devicePort": 1, "timeout": -5}, 422),
        ("noport", {"protocol": "tcp", "devicePort": 1, "encrypt": {"key": "ab", "initializationVector": "00" * 16}}, 422),
        ("noport", {"protocol": "tcp", "devicePort": 1, "encrypt": {"key": "zz" * 32, "initializationVector": "00" * 16}}, 422),
        ("noport", {"protocol": "tcp", "devicePort": 1, "source": {"host": "nowhere", "port": 1}}, 422),
        ("far", {"protocol": "tcp"}, 403),
    ]
    # a host name is checked when the client connects (tests/test_devicelink_hardening.py); UDP needs an address
    status, out = await daemon.request("POST", "/api/v1/devicelink/named", {"protocol": "tcp"})
    assert status == 201 and out["device"] == "NAMED"
    status, out = await daemon.request("POST", "/api/v1/devicelink/named", {"protocol": "udp"})
    assert status == 422 and "udp" in out["error"]["message"].lower()
    for device, body, code in cases:
        status, out = await daemon.request("POST", f"/api/v1/devicelink/{device}", body)
        assert status == code, (device, body, out)
        assert "error" in out


@pytest_twisted.ensureDeferred
async def test_port_exhaustion_is_503(daemon, echo_server):
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": echo_server})
    tokens = []
    for _ in range(3):
        status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"})
        assert status == 201
        tokens.append(link["token"])
    status, out = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"})
    assert status == 503 and out["error"]["code"] == "no_free_port"
    await daemon.request("DELETE", f"/api/v1/devicelink/{tokens[0]}")
    status, _ = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"})
    assert status == 201


@pytest_twisted.ensureDeferred
async def test_tenants_and_permissions(daemon, echo_server):
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": echo_server})
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"})
    other = await daemon.new_key("admin", tenant="other")
    assert (await daemon.request("DELETE", f"/api/v1/devicelink/{link['token']}", key=other))[0] == 404
    assert (await daemon.request("GET", "/api/v1/devicelink", key=other))[1]["items"] == []
    assert (await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"}, key=other))[0] == 404
    ro = await daemon.new_key("read_only")
    assert (await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"}, key=ro))[0] == 403
    linker = await daemon.new_key("read_only", permissions=["deviceLink:create"])
    status, link2 = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"}, key=linker)
    assert status == 201
    assert (await daemon.request("DELETE", f"/api/v1/devicelink/{link2['token']}", key=linker))[0] == 403


@pytest_twisted.ensureDeferred
async def test_deleting_the_device_closes_its_links(daemon, echo_server):
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": echo_server})
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"})
    assert (await daemon.request("DELETE", "/api/v1/devices/plc"))[0] == 204
    status, listing = await daemon.request("GET", "/api/v1/devicelink")
    assert listing["items"] == []


@pytest_twisted.ensureDeferred
async def test_udp_link_to_a_host_name_is_422(tmp_path):
    from conftest import make_config, start_daemon, stop_daemon

    d = await start_daemon(make_config(tmp_path, {"devicelink": {"port_range": "31320-31322"}}))
    try:
        await d.put_device("named", host="localhost", ports={"default": 9})
        status, out = await d.request("POST", "/api/v1/devicelink/named", {"protocol": "udp"})
        assert status == 422 and "udp" in out["error"]["message"].lower()
        status, out = await d.request("POST", "/api/v1/devicelink/named", {"protocol": "tcp"})
        assert status == 201
    finally:
        await stop_daemon(d)

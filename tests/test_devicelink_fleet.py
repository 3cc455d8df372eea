"""DeviceLink at fleet scale, on the real daemon and real sockets: maxDuration, rateLimit, and a
TCP link used over a websocket on the HTTP port (spec 20, "Fleet scale (added)")."""

import os
import socket
import time

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet import defer, protocol, reactor, task, threads

from iotd.web.site import access_log, redact_uri

CHUNK = 64 * 1024


@pytest.fixture
def daemon_config():
    return {"devicelink": {"port_range": "31330-31339", "allowed_device_networks": "127.0.0.0/8"}}


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Sink(protocol.Protocol):
    """Counts what arrives; ``done`` fires with the bytes once ``want`` have come."""

    def __init__(self, want):
        self.want, self.got, self.done = want, bytearray(), defer.Deferred()

    def dataReceived(self, data):
        self.got += data
        if len(self.got) >= self.want and not self.done.called:
            self.done.callback((bytes(self.got), reactor.seconds()))


class Flood(protocol.Protocol):
    """Writes ``size`` bytes to the relay as fast as the relay takes them."""

    def __init__(self, payload):
        self.payload = payload

    def connectionMade(self):
        self.transport.write(self.payload)


def listen(proto_factory):
    factory = protocol.Factory()
    factory.buildProtocol = lambda addr: proto_factory()
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


@pytest.fixture
def servers():
    ports = []
    yield lambda make: ports.append(listen(make)) or ports[-1].getHost().port
    for p in ports:
        p.stopListening()


def manager_of(daemon):
    return daemon.top.getServiceNamed("devicelink").manager


async def open_link(daemon, device_port, **fields):
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": device_port})
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp", **fields})
    assert status == 201, link
    return link


class WSClient(WebSocketClientProtocol):
    def __init__(self):
        super().__init__()
        self.opened, self.closed = defer.Deferred(), defer.Deferred()
        self.got, self.want, self.enough = bytearray(), None, None

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        assert isBinary
        self.got += payload
        if self.want is not None and len(self.got) >= self.want and not self.enough.called:
            self.enough.callback(bytes(self.got))

    def wait_for(self, n):
        self.want, self.enough = n, defer.Deferred()
        if len(self.got) >= n:
            self.enough.callback(bytes(self.got))
        return self.enough

    def onClose(self, wasClean, code, reason):
        if not self.closed.called:
            self.closed.callback((wasClean, code))
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"websocket refused: {code} {reason}"))


class WSFactory(WebSocketClientFactory):
    protocol = WSClient

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        self.made.callback(proto)
        return proto


async def ws_connect(daemon, token):
    factory = WSFactory(f"ws://127.0.0.1:{daemon.port}/api/v1/devicelink/{token}/socket")
    factory.made = defer.Deferred()
    connectWS(factory)
    client = await factory.made
    await client.opened
    return client


def ctr(key, iv):
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


# -- maxDuration ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_active_link_closes_at_max_duration(daemon, servers):
    link = await open_link(daemon, servers(Echo), maxDuration=1500)
    created = time.monotonic()
    assert link["maxDuration"] == 1500 and "expiresAt" in link

    def chatter():
        with socket.create_connection(("127.0.0.1", link["port"]), timeout=5) as s:
            while True:
                try:
                    s.sendall(b"ping")
                    if not s.recv(100):
                        break
                except OSError:
                    break
                time.sleep(0.05)
        return time.monotonic() - created

    lived = await threads.deferToThread(chatter)
    assert 1.0 <= lived <= 2.0, lived
    status, _ = await daemon.request("GET", f"/api/v1/devicelink/{link['token']}")
    assert status == 404


@pytest.mark.parametrize("daemon_config", [{"devicelink": {"port_range": "31330-31339",
                                                           "allowed_device_networks": "127.0.0.0/8",
                                                           "max_duration_ms": "60000"}}])
@pytest_twisted.ensureDeferred
async def test_max_duration_default_and_bad_values(daemon, servers):
    link = await open_link(daemon, servers(Echo))
    assert link["maxDuration"] == 60000 and link["expiresAt"].endswith("Z")
    for field, value in (("maxDuration", -1), ("rateLimit", "fast"), ("maxDuration", True)):
        status, body = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp", field: value})
        assert status == 422 and field in body["error"]["message"], body


# -- rateLimit --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_300_kb_through_a_100_kb_per_second_link_take_2_to_3_seconds(daemon, servers):
    payload = os.urandom(300_000)
    sink = Sink(len(payload))
    link = await open_link(daemon, servers(lambda: sink), rateLimit=100_000)
    assert link["rateLimit"] == 100_000
    started = reactor.seconds()

    def send():
        with socket.create_connection(("127.0.0.1", link["port"]), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)

    sent = threads.deferToThread(send)
    got, at = await sink.done
    assert got == payload
    assert 2.0 <= at - started <= 3.0, at - started
    await sent


@pytest_twisted.ensureDeferred
async def test_udp_datagrams_over_the_rate_are_dropped_and_counted(daemon):
    device = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    device.bind(("127.0.0.1", 0))
    device.settimeout(2)
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": device.getsockname()[1]})
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp", "rateLimit": 1000})
    assert status == 201, link
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(5):
            client.sendto(b"x" * 400, ("127.0.0.1", link["port"]))
        got = []

        def receive():
            try:
                while True:
                    got.append(device.recv(65536))
            except OSError:
                pass

        await threads.deferToThread(receive)
        assert len(got) == 2  # 800 of the 1000 bytes of the first second's burst
        status, doc = await daemon.request("GET", f"/api/v1/devicelink/{link['token']}")
        assert doc["datagramsRateDropped"] == 3 and doc["datagramsUp"] == 2
    finally:
        client.close()
        device.close()


# -- over a websocket -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_mib_over_a_websocket_both_ways_encrypted(daemon, servers):
    key, iv = os.urandom(32), os.urandom(16)
    link = await open_link(daemon, servers(Echo),
                           encrypt={"key": key.hex(), "initializationVector": iv.hex()})
    client = await ws_connect(daemon, link["token"])
    payload = os.urandom(1024 * 1024)
    up, down = ctr(key, iv), ctr(key, iv)
    for i in range(0, len(payload), CHUNK):
        client.sendMessage(up.update(payload[i:i + CHUNK]), isBinary=True)
    echoed = await client.wait_for(len(payload))
    assert down.update(echoed) == payload
    # the websocket is the link's one client: the port refuses another
    with socket.create_connection(("127.0.0.1", link["port"]), timeout=5) as s:
        assert await threads.deferToThread(s.recv, 10) == b""
    status, doc = await daemon.request("GET", f"/api/v1/devicelink/{link['token']}")
    assert doc["bytesUp"] == doc["bytesDown"] == len(payload)
    client.sendClose(1000)
    await client.closed
    for _ in range(50):
        if (await daemon.request("GET", f"/api/v1/devicelink/{link['token']}"))[0] == 404:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    else:
        raise AssertionError("the link did not close after the websocket's clean close")


@pytest_twisted.ensureDeferred
async def test_a_stalled_websocket_reader_pauses_the_device_side(daemon, servers):
    payload = os.urandom(8 * 1024 * 1024)
    link = await open_link(daemon, servers(lambda: Flood(payload)))
    client = await ws_connect(daemon, link["token"])
    client.transport.pauseProducing()  # the client stops reading
    relay = manager_of(daemon).get(link["token"]).relay
    await task.deferLater(reactor, 1.0, lambda: None)
    live = manager_of(daemon).get(link["token"])
    assert live.buffered() <= 512 * 1024, live.buffered()
    assert relay.device.transport not in reactor.getReaders()  # the device side is paused
    assert live.bytes_down < len(payload) // 2
    client.transport.resumeProducing()
    got = await client.wait_for(len(payload))
    assert got == payload


@pytest_twisted.ensureDeferred
async def test_websocket_refusals_are_json_before_the_upgrade(daemon, servers):
    headers = {b"Upgrade": [b"websocket"], b"Connection": [b"Upgrade"], b"Sec-WebSocket-Version": [b"13"],
               b"Sec-WebSocket-Key": [b"dGhlIHNhbXBsZSBub25jZQ=="]}
    status, body = await daemon.request("GET", "/api/v1/devicelink/nosuchtoken/socket", headers=headers)
    assert status == 404 and body["error"]["code"] == "not_found"
    pinned = await open_link(daemon, servers(Echo), source={"host": "127.0.0.1", "port": 9})
    status, body = await daemon.request("GET", f"/api/v1/devicelink/{pinned['token']}/socket", headers=headers)
    assert status == 403 and body["error"]["code"] == "refused_source"
    link = await open_link(daemon, servers(Echo))
    status, body = await daemon.request("GET", f"/api/v1/devicelink/{link['token']}/socket")
    assert status == 426
    client = await ws_connect(daemon, link["token"])
    status, body = await daemon.request("GET", f"/api/v1/devicelink/{link['token']}/socket", headers=headers)
    assert status == 409 and body["error"]["code"] == "link_taken"
    client.sendClose(1000)
    await client.closed


def test_the_access_log_strips_a_link_socket_token():
    assert redact_uri(b"/api/v1/devicelink/abcDEF_123-x/socket") == b"/api/v1/devicelink/REDACTED/socket"
    assert redact_uri(b"/api/v1/devicelink/plc-1") == b"/api/v1/devicelink/plc-1"


class Stalled(protocol.Protocol):
    """A device that reads nothing until told to."""

    def __init__(self):
        self.got = bytearray()
        self.done = defer.Deferred()
        self.want = None

    def connectionMade(self):
        # a fixed receive buffer (no autotuning up to tcp_rmem's max, 32 MiB on some machines)
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.transport.pauseProducing()

    def dataReceived(self, data):
        self.got += data
        if self.want is not None and len(self.got) >= self.want and not self.done.called:
            self.done.callback(bytes(self.got))


@pytest_twisted.ensureDeferred
async def test_a_slow_device_pauses_reading_the_websocket(daemon, servers):
    device = Stalled()
    link = await open_link(daemon, servers(lambda: device))
    client = await ws_connect(daemon, link["token"])
    # more than the kernel holds on the way (iotd's send buffer autotunes up to tcp_wmem's max, 4 MiB)
    payload = os.urandom(16 * 1024 * 1024)
    for i in range(0, len(payload), CHUNK):
        client.sendMessage(payload[i:i + CHUNK], isBinary=True)
    await task.deferLater(reactor, 1.0, lambda: None)
    live = manager_of(daemon).get(link["token"])
    assert live.buffered() <= 512 * 1024, live.buffered()
    assert live.relay.client.transport not in reactor.getReaders()  # the websocket is not read
    assert live.bytes_up < len(payload) // 2
    device.want = len(payload)
    device.transport.resumeProducing()
    assert await device.done == payload
    client.sendClose(1000)
    await client.closed


@pytest_twisted.ensureDeferred
async def test_rate_limit_slows_the_device_side_of_a_websocket_link(daemon, servers):
    payload = os.urandom(300_000)
    link = await open_link(daemon, servers(lambda: Flood(payload)), rateLimit=100_000)
    client = await ws_connect(daemon, link["token"])
    started = reactor.seconds()
    got = await client.wait_for(len(payload))
    assert got == payload
    assert 2.0 - 0.1 <= reactor.seconds() - started <= 3.0  # (the device may start just before the open)
    client.sendClose(1000)
    await client.closed


def test_the_access_log_strips_a_link_token_from_get_and_delete():
    class Request:
        uri, clientproto, code, sentLength = b"/api/v1/devicelink/Tok3n_x", b"HTTP/1.1", 204, 0

        def __init__(self, method):
            self.method = method

        def getClientAddress(self):
            return None

        def getHeader(self, name):
            return None

    for method in (b"GET", b"DELETE"):
        line = access_log("[ts]", Request(method))
        assert "Tok3n_x" not in line and "/api/v1/devicelink/REDACTED" in line
    assert "/api/v1/devicelink/Tok3n_x" in access_log("[ts]", Request(b"POST"))  # a device identifier

"""HTTP connection limits on real sockets: per-address cap, header deadline, 413 before buffering.

Each client is a blocking socket run in a thread (the daemon runs on the
reactor of the test thread).  On Linux every 127.0.0.0/8 address is
loopback, so a client bound to 127.0.0.2 is "another address".
"""

from __future__ import annotations

import json
import select
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import defer
from ws_helpers import Client, in_thread, ws_url

OTHER_ADDRESS = "127.0.0.2"


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response (content-length or chunked): (status, headers, body)."""
    data = b""

    def more() -> None:
        nonlocal data
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response: {data[:200]!r}")
        data += chunk

    while b"\r\n\r\n" not in data:
        more()
    head, data = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    status = int(lines[0].split(" ")[1])
    if headers.get("transfer-encoding", "").lower() != "chunked":
        length = int(headers.get("content-length", "0"))
        while len(data) < length:
            more()
        return status, headers, data[:length]
    body = b""
    while True:
        while b"\r\n" not in data:
            more()
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        while len(data) < size + 2:
            more()
        body, data = body + data[:size], data[size + 2:]
        if size == 0:
            return status, headers, body


def exchange(sock: socket.socket, request: bytes) -> tuple[int, dict, bytes]:
    sock.sendall(request)
    return read_response(sock)


def refused(port: int, timeout: float = 5) -> tuple[str, float]:
    """Open a connection and send a request; how the server ended it without answering
    ("reset" or "eof") and after how many seconds.  Raises if it answered or kept it open."""
    started = time.monotonic()
    try:
        sock = connect(port)
    except ConnectionError:  # reset before connect() even returned
        return "reset", time.monotonic() - started
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(get("/healthz"))
            data = sock.recv(65536)
        except ConnectionError:
            return "reset", time.monotonic() - started
        except TimeoutError:
            raise AssertionError("the connection is still open") from None
    assert data == b"", f"the connection was served: {data[:80]!r}"
    return "eof", time.monotonic() - started


@pytest.mark.parametrize("daemon_config", [{"http": {"max_connections_per_address": "5"}}])
@pytest_twisted.ensureDeferred
async def test_connection_over_max_per_address_is_closed_at_once_and_another_address_is_served(daemon):
    def run():
        held = [connect(daemon.port) for _ in range(5)]
        try:
            for sock in held:  # five keep-alive connections, each served and still open
                assert exchange(sock, get("/healthz"))[0] == 200
            how, cut_after = refused(daemon.port)
            with connect(daemon.port, OTHER_ADDRESS) as other:
                other_status = exchange(other, get("/healthz"))[0]
                _, _, text = exchange(other, get("/metrics"))
            for sock in held:  # the five are still served
                assert exchange(sock, get("/healthz"))[0] == 200
            held.pop().close()
            # The closed connection frees its slot: a new one from 127.0.0.1 is served again.
            deadline = time.monotonic() + 10
            while True:
                try:
                    with connect(daemon.port) as sock:
                        status = exchange(sock, get("/healthz"))[0]
                    break
                except ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            return how, cut_after, other_status, text.decode(), status
        finally:
            for sock in held:
                sock.close()

    how, cut_after, other_status, metrics_text, again = await in_thread(run)
    assert how in ("eof", "reset") and cut_after < 3
    assert other_status == 200
    assert 'iotd_http_connections_closed_total{reason="per_address"}' in metrics_text
    assert again == 200


def trickle_headers(port: int, every: float, give_up: float) -> tuple[float, bytes]:
    """Send a request's headers one byte every ``every`` s; (seconds until the server ended it, what it sent)."""
    sock = connect(port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()
    received = b""
    sock.settimeout(every)
    try:
        while time.monotonic() - started < give_up:
            try:
                sock.send(b"a")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            received += chunk
        return time.monotonic() - started, received
    finally:
        sock.close()


def keep_alive_requests(port: int, count: int, every: float) -> list[int]:
    """``count`` requests on one keep-alive connection, ``every`` s apart (it outlives header_timeout)."""
    with connect(port) as sock:
        statuses = []
        for _ in range(count):
            statuses.append(exchange(sock, get("/healthz"))[0])
            time.sleep(every)
        return statuses


def slow_body(port: int, key: str, seconds: float) -> int:
    """Headers at once, then a body that takes ``seconds`` (longer than header_timeout)."""
    body = json.dumps({"tags": ["slow"]}).encode()
    with connect(port) as sock:
        sock.sendall(f"PUT /api/v1/devices/slowbody HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        for i in range(len(body)):
            sock.sendall(body[i:i + 1])
            time.sleep(seconds / len(body))
        return read_response(sock)[0]


@pytest.mark.parametrize("daemon_config", [{"http": {"header_timeout": "1"}}])
@pytest_twisted.ensureDeferred
async def test_headers_trickling_in_are_cut_at_header_timeout_while_normal_clients_are_served(daemon):
    trickled, normal, body = await defer.gatherResults([
        in_thread(trickle_headers, daemon.port, every=0.2, give_up=15),
        in_thread(keep_alive_requests, daemon.port, count=6, every=0.5),
        in_thread(slow_body, daemon.port, daemon.admin_key, seconds=2.0),
    ])
    cut_after, received = trickled
    assert 0.9 <= cut_after < 6, cut_after  # bytes every 0.2 s did not extend the 1 s deadline
    if received:  # the 408 may be lost to a reset while the client is still sending
        assert received.startswith(b"HTTP/1.1 408"), received[:80]
        assert b'"code": "header_timeout"' in received
    assert normal == [200] * 6  # a keep-alive connection living 3 s is not cut
    assert body == 201  # the deadline ends with the headers: a slow body is not cut by it
    status, _ = await daemon.request("GET", "/api/v1/devices/SLOWBODY")
    assert status == 200


@pytest.mark.parametrize("daemon_config", [{"http": {"header_timeout": "1"}}])
@pytest_twisted.ensureDeferred
async def test_header_timeout_answers_408_json_to_a_client_that_stopped_sending(daemon):
    def run():
        with connect(daemon.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            status, headers, body = read_response(sock)
            return time.monotonic() - started, status, headers, json.loads(body), sock.recv(10)

    elapsed, status, headers, body, after = await in_thread(run)
    assert status == 408 and 0.9 <= elapsed < 6
    assert headers["content-type"] == "application/json"
    assert body["error"]["code"] == "header_timeout"
    assert after == b""  # and the connection is closed
    text = (await daemon.request("GET", "/metrics"))[1].decode()
    assert 'iotd_http_connections_closed_total{reason="header_timeout"}' in text


@pytest.mark.parametrize("daemon_config", [{"http": {"header_timeout": "1"}}])
@pytest_twisted.ensureDeferred
async def test_a_keep_alive_request_whose_headers_stall_gets_408_one_timeout_after_its_first_byte(daemon):
    """The deadline of a later request on the connection runs from that request's first byte
    (started while the timer of the request before is still pending, and started later)."""
    def run(pause: float):
        with connect(daemon.port) as sock:
            first = exchange(sock, get("/healthz"))[0]
            time.sleep(pause)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: stalled
            started = time.monotonic()
            status = read_response(sock)[0]
            return first, status, time.monotonic() - started

    for pause in (0.3, 1.6):
        first, status, elapsed = await in_thread(run, pause)
        assert first == 200
        assert status == 408 and 0.9 <= elapsed < 3, (pause, status, elapsed)


MAX_BODY = 65536


def send_chunked_until_answered(port: int, key: str, limit: int) -> tuple[int | None, bytes, int, str]:
    """POST a chunked body that never ends; (status, body, bytes sent before the answer, how it ended)."""
    sock = connect(port)
    sock.setblocking(False)
    head = (f"POST /api/v1/devices/big/packets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"4000\r\n" + b"7" * 0x4000 + b"\r\n"
    pending, sent, received = head, 0, b""
    deadline = time.monotonic() + 30
    try:
        while sent < limit and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionError:
                    return None, received, sent, "reset"
                if not data:
                    break
                received += data
                if b"\r\n\r\n" in received:
                    head_part, body = received.split(b"\r\n\r\n", 1)
                    return int(head_part.split(b" ")[1]), body, sent, "answered"
            if writable:
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    return None, received, sent, "reset"
                sent += n
                pending = pending[n:] or chunk
        return None, received, sent, "eof" if sent < limit else "still open"
    finally:
        sock.close()


@pytest.mark.parametrize("daemon_config", [{"http": {"max_body_bytes": str(MAX_BODY)}}])
@pytest_twisted.ensureDeferred
async def test_chunked_body_over_max_body_bytes_is_answered_413_while_the_client_still_sends(daemon):
    await daemon.put_device("big")
    limit = 64 * 1024 * 1024  # what a daemon that buffers would take in before answering
    status, body, sent, how = await in_thread(send_chunked_until_answered, daemon.port, daemon.admin_key, limit)
    assert how == "answered", (how, sent)
    assert status == 413
    # The answer came while the client was still sending, long before the 64 MiB it meant to:
    # only what the socket buffers hold passed max_body_bytes.
    assert sent < 16 * 1024 * 1024, sent
    assert json.loads(body[body.index(b"{"):])["error"]["code"] == "too_large"
    # Nothing of it was stored: a replay from the beginning has only the packet sent after it.
    status, stored = await daemon.request("POST", "/api/v1/devices/big/packets", {"payload": {"n": 1}})
    assert status == 201
    client = await Client.open(ws_url(daemon, "/api/v1/devices/big/packets/socket", auth=daemon.admin_key,
                                      after="1970-01-01T00:00:00Z"))
    try:
        assert [e["body"] for e in await client.recv_json()] == [stored]
    finally:
        await client.close()


def post_whole_body_then_read(port: int, key: str, size: int) -> tuple[int, dict]:
    """What most clients do: send the whole body (Content-Length), and only then read the answer."""
    with connect(port) as sock:
        sock.sendall(f"POST /api/v1/devices/big/packets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        sock.sendall(b"7" * size)
        status, _, body = read_response(sock)
        return status, json.loads(body)


@pytest.mark.parametrize("daemon_config", [{"http": {"max_body_bytes": str(MAX_BODY)}}])
@pytest_twisted.ensureDeferred
async def test_a_client_that_sends_its_whole_oversized_body_first_still_reads_the_413(daemon):
    await daemon.put_device("big")
    for _ in range(3):
        status, body = await in_thread(post_whole_body_then_read, daemon.port, daemon.admin_key, 4 * 1024 * 1024)
        assert status == 413 and body["error"]["code"] == "too_large"


@pytest.mark.parametrize("daemon_config", [{"http": {"max_connections_per_address": "2"}}])
@pytest_twisted.ensureDeferred
async def test_websockets_leave_the_http_connection_count_once_upgraded(daemon):
    await daemon.put_device("ws1")
    url = ws_url(daemon, "/api/v1/devices/ws1/readings/socket", auth=daemon.admin_key)
    sockets = [await Client.open(url) for _ in range(3)]  # each starts as one of the 2 HTTP connections
    try:
        status, _ = await daemon.request("GET", "/healthz")
        assert status == 200
        stored = (await daemon.request("POST", "/api/v1/devices/ws1/readings", {"data": {"n": 1}}))[1]
        for client in sockets:  # and the websockets keep working
            assert [e["body"] for e in await client.events(1)] == [stored]
    finally:
        for client in sockets:
            await client.close()


@pytest.mark.parametrize("daemon_config", [{"http": {"max_connections_per_address": "2"},
                                             "push": {"listen": "tcp:0:interface=127.0.0.1"}}])
@pytest_twisted.ensureDeferred
async def test_the_push_listener_has_the_same_connection_limit(daemon):
    port = (await daemon.top.getServiceNamed("push-0")._waitingForPort).getHost().port

    def run():
        held = [connect(port) for _ in range(2)]
        try:
            for sock in held:
                assert exchange(sock, get("/push?deviceId=4711"))[0] == 200
            how, _ = refused(port)
            with connect(port, OTHER_ADDRESS) as other:
                return how, exchange(other, get("/push?deviceId=4712"))[0]
        finally:
            for sock in held:
                sock.close()

    how, other = await in_thread(run)
    assert how in ("eof", "reset") and other == 200

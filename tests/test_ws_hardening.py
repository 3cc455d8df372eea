"""Both websocket kinds against hostile and unusual clients (issue 12).

Handshakes with undecodable header bytes or odd origins, iThings front ends'
connect parameters, the subscription cap counting refusals, slow clients of
each kind, and memory: the packet cache, the replay buffer and the preload
queue are bounded in bytes (the last test watches a real twistd's RSS).
"""

from __future__ import annotations

import base64
import json
import os
import socket

import pytest
import pytest_twisted
import treq
from twisted.internet import defer

from daemon_process import DaemonProcess
from ws_helpers import Client, RawClient, eventually, handshake_error, in_thread, sockets_of, ws_url

CONNECT = "/api/v1/system/common/websocket/connect"
AUTH_FAILED = {"code": 100002, "msg": "认证失败"}
OK = "成功"


def raw_upgrade(port: int, path: str, headers: list[tuple[bytes, bytes]], timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Send an upgrade request with raw header bytes: (status, response headers, body)."""
    nonce = base64.b64encode(os.urandom(16))
    lines = [b"GET " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % port]
    names = {name.lower() for name, _ in headers}
    for name, value in ((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                        (b"Sec-WebSocket-Key", nonce), (b"Sec-WebSocket-Version", b"13")):
        if name.lower() not in names:
            lines.append(name + b": " + value)
    lines.extend(name + b": " + value for name, value in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        response = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
        status = int(status_line.split(" ", 2)[1])
        if status == 101:
            return status, response, b""
        length = response.get("content-length")
        chunked = response.get("transfer-encoding", "").lower() == "chunked"
        while True:  # read the whole body (the server closes, or the length is reached)
            if length is not None and len(body) >= int(length):
                break
            if chunked and body.endswith(b"0\r\n\r\n"):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    if chunked:
        body = dechunk(body)
    return status, response, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


async def upgrade(daemon, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, bytes]:
    return await in_thread(raw_upgrade, daemon.port, path, headers)


def bearer(daemon) -> tuple[bytes, bytes]:
    return (b"Authorization", b"Bearer " + daemon.admin_key.encode())


async def metric(daemon, name: str) -> float:
    text = await (await treq.get(daemon.url + "/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- handshakes: header bytes, origins, JSON bodies (items 4 and 13) -------------------------------


@pytest_twisted.ensureDeferred
async def test_undecodable_header_bytes_on_socket_urls_are_400_json(daemon):
    await daemon.put_device("gate-01")
    cases = [
        ("/api/v1/packets/socket", [bearer(daemon), (b"Upgrade", b"\xff")], "Upgrade"),
        ("/api/v1/devices/gate-01/readings/socket", [(b"Authorization", b"Bearer \xff\xfe")], "Authorization"),
        ("/api/v1/packets/socket", [bearer(daemon), (b"X-Whatever", b"caf\xe9")], "X-Whatever"),
        (CONNECT, [(b"token", b"\xff")], "token"),
        (CONNECT, [(b"ithings-token", b"\xc3\x28")], "ithings-token"),
        (CONNECT, [(b"Upgrade", b"\xff"), (b"token", daemon.admin_key.encode())], "Upgrade"),
        (CONNECT, [(b"ithings-tenant-code", b"\xff"), (b"token", daemon.admin_key.encode())], "tenant-code"),
    ]
    for path, headers, name in cases:
        status, response, body = await upgrade(daemon, path, headers)
        assert status == 400, (path, headers, status, body)
        assert response["content-type"].startswith("application/json"), (path, headers)
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_header" and name.lower() in error["message"].lower(), (path, error)
    # the daemon is fine afterwards
    client = await Client.open(ws_url(daemon, "/api/v1/packets/socket", auth=daemon.admin_key))
    await client.close()


@pytest_twisted.ensureDeferred
async def test_undecodable_origin_on_a_socket_url_is_400_json(daemon):
    for path in ("/api/v1/packets/socket", CONNECT):
        status, response, body = await upgrade(daemon, path, [bearer(daemon), (b"Origin", b"\xff")])
        assert status == 400, (path, status, body)
        assert response["content-type"].startswith("application/json")
        assert "origin" in json.loads(body)["error"]["message"].lower()


@pytest_twisted.ensureDeferred
async def test_any_origin_is_accepted_on_both_socket_kinds(daemon):
    await daemon.put_device("gate-01")
    for origin in ("null", "file://", "file:///home/me/screen.html", "chrome-extension://abcdef",
                   "http://elsewhere.example:8080", "not a url"):
        headers = {"Origin": origin}
        element = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket",
                                           auth=daemon.admin_key), headers)
        sub = await Client.open(ws_url(daemon, CONNECT, token=daemon.admin_key), headers)
        try:
            assert (await sub.recv_json())["code"] == 200
            reply = await sub.request({"type": "up.sub", "body": {"code": "devicePublish", "params": {
                "productID": "GATE-01", "deviceName": "GATE-01"}}})
            assert reply == {"code": 200, "msg": OK, "type": "down.subRet"}
            status, stored = await daemon.request("POST", "/api/v1/devices/gate-01/packets",
                                                  {"payload": origin, "payload_encoding": "utf8"})
            assert status == 201
            assert (await element.recv_json())[0]["body"]["id"] == stored["id"]
            assert (await sub.recv_json())["body"]["requestID"] == str(stored["id"])
        finally:
            await element.close()
            await sub.close()


@pytest_twisted.ensureDeferred
async def test_every_refused_handshake_has_a_json_body(daemon):
    await daemon.put_device("gate-01")
    paths = ("/api/v1/devices/gate-01/packets/socket", CONNECT)
    refusals = [
        [(b"Sec-WebSocket-Version", b"99")],  # a version nobody speaks
        [(b"Connection", b"keep-alive")],  # no "Connection: Upgrade"
        [(b"Sec-WebSocket-Protocol", b"a, a")],  # a protocol twice
    ]
    for path in paths:
        for headers in refusals:
            status, response, body = await upgrade(daemon, path, [bearer(daemon), *headers])
            assert 400 <= status < 500, (path, headers, status)
            assert response.get("content-type", "").startswith("application/json"), (path, headers, response)
            error = json.loads(body)["error"]
            assert error["code"] and error["message"], (path, headers)
    # the refusals the routes make themselves are JSON too
    for path in paths:
        status, response, body = await upgrade(daemon, path, [])
        assert status == 401 and response["content-type"].startswith("application/json")
        assert json.loads(body) in (AUTH_FAILED, {"error": {"code": "unauthorized",
                                                            "message": "a valid API key is required"}})


# -- iThings front ends (item 13) ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ithings_names_in_the_query_are_honoured(daemon):
    key = daemon.admin_key
    other = await daemon.new_key("admin", tenant="other")
    # ithings-token in the query authenticates, and is tried before token
    for query in ({"ithings-token": key}, {"ithings-token": key, "token": "f" * 64},
                  {"ithings-token": key, "ithings-app-code": "core", "ithings-project-id": "7",
                   "ithings-tenant-code": "default"}):
        client = await Client.open(ws_url(daemon, CONNECT, **query))
        hello = await client.recv_json()
        await client.close()
        assert hello["code"] == 200 and hello["msg"] == OK, query
    # ithings-tenant-code in the query is checked like tenant-code
    for query in ({"token": key, "ithings-tenant-code": "other"},
                  {"ithings-token": other, "ithings-tenant-code": "default"},
                  {"ithings-token": "f" * 64}):
        assert await handshake_error(ws_url(daemon, CONNECT, **query)) == (401, AUTH_FAILED), query


@pytest_twisted.ensureDeferred
async def test_a_client_sent_down_subret_is_ignored_and_down_pub_gets_100018(daemon):
    client = await Client.open(ws_url(daemon, CONNECT, token=daemon.admin_key))
    try:
        await client.recv_json()
        for type_ in ("down.subRet", "down.unSubRet", "down.pong", "down.anything"):
            await client.send({"type": type_, "body": {}})
        await client.silent(0.2)
        assert await client.request({"type": "down.pub", "body": {}}) == {
            "code": 100018, "msg": "尚未实现", "type": "down.pub"}
        assert (await client.request({"type": "up.ping"}))["type"] == "down.pong"
    finally:
        await client.close()


# -- the subscription cap counts refusals (item 7) -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refused_up_sub_requests_count_toward_the_1000_cap(daemon):
    await daemon.put_device("theirs", tags=["b"], projectID="p2")
    await daemon.put_device("mine", tags=["a"], projectID="p1")
    group = await daemon.new_key("group", groups=["a"])
    client = await Client.open(ws_url(daemon, CONNECT, token=group))
    refused = {"code": 100012, "msg": "权限不足", "type": "up.sub"}
    capped = {"code": 100006, "msg": "参数错误", "type": "up.sub"}

    def sub(params):
        return {"type": "up.sub", "body": {"code": "deviceConn", "params": params}}

    try:
        await client.recv_json()
        assert await client.request(sub({"projectID": "p1"})) == {"code": 200, "msg": OK, "type": "down.subRet"}
        await client.send_many([sub({"projectID": "p2"})] * 999)
        assert await client.recv_many(999) == [refused] * 999
        # one subscription + 999 refusals: the 1,001st request is over the cap, whatever it asks
        assert await client.request(sub({"projectID": "p2"})) == capped
        assert await client.request(sub({"projectID": "p1", "areaID": "x"})) == capped
        # unsubscribing frees only the subscription's place; refusals stay counted
        unsub = {"type": "up.unSub", "body": {"code": "deviceConn", "params": {"projectID": "p1"}}}
        assert (await client.request(unsub))["code"] == 200
        assert (await client.request(sub({"projectID": "p1"})))["code"] == 200
        assert await client.request(sub({"productID": "MINE", "deviceName": "MINE"})) == capped
        assert (await client.request({"type": "up.ping"}))["type"] == "down.pong"
    finally:
        await client.close()


# -- slow clients of each kind -------------------------------------------------------------------


@pytest.mark.parametrize("daemon_config", [{"websocket": {"max_buffer_bytes": "262144"}}])
@pytest.mark.parametrize("kind", ["element", "subscribe"])
@pytest_twisted.ensureDeferred
async def test_a_never_reading_socket_is_cut_and_counted_while_a_reader_gets_everything(daemon, kind):
    await daemon.put_device("gate-01")
    key = daemon.admin_key
    factory = sockets_of(daemon, kind)
    subscription = {"type": "up.sub", "body": {"code": "devicePublish",
                                               "params": {"productID": "GATE-01", "deviceName": "GATE-01"}}}
    if kind == "element":
        path = "/api/v1/devices/gate-01/packets/socket"
        slow = await RawClient.open(daemon, f"{path}?auth={key}")
        reader = await Client.open(ws_url(daemon, path, auth=key), max_size=None, max_queue=None)
    else:
        slow = await RawClient.open(daemon, f"{CONNECT}?token={key}")
        await in_thread(slow.send_text, json.dumps(subscription, separators=(",", ":")))
        reader = await Client.open(ws_url(daemon, CONNECT, token=key), max_size=None, max_queue=None)
        await reader.recv_json()
        assert (await reader.request(subscription))["type"] == "down.subRet"
    assert slow.status == 101
    await eventually(lambda: len(factory.sockets) == 2 and all(
        getattr(s, "subs", True) for s in factory.sockets))
    name = f'iotd_websocket_slow_dropped_total{{kind="{kind}"}}'
    before = await metric(daemon, name)
    sent = []
    try:
        for _ in range(200):  # up to 200 x 100 x 2 KB: far more than any socket buffer
            items = [{"payload": "ab" * 1000, "payload_encoding": "binary"} for _ in range(100)]
            status, stored = await daemon.request("POST", "/api/v1/devices/gate-01/packets", items)
            assert status == 201
            sent.extend(s["id"] for s in stored)
            if await metric(daemon, name) > before:
                break
        assert await metric(daemon, name) == before + 1
        await eventually(lambda: len(factory.sockets) == 1)
        # the never-reading client finds its connection ended by the server
        _, ending = await in_thread(slow.drain_until_closed)
        assert ending in ("reset", "eof")
        # the reader got every event, in order
        if kind == "element":
            got = [e["body"]["id"] for e in await reader.events(len(sent), timeout=20)]
        else:
            got = [int(m["body"]["requestID"]) for m in await reader.recv_many(len(sent), timeout=20)]
        assert got == sent
    finally:
        slow.close()
        await reader.close()


# -- memory (item 5) -------------------------------------------------------------------------------


async def packet(daemon, payload: str, device: str = "gate-01") -> dict:
    status, stored = await daemon.request("POST", f"/api/v1/devices/{device}/packets",
                                          {"payload": payload, "payload_encoding": "utf8"})
    assert status == 201, stored
    return stored


async def reading_of(daemon, packet_id: int, device: str = "gate-01") -> dict:
    status, stored = await daemon.request("POST", f"/api/v1/devices/{device}/readings",
                                          {"data": {"t": 1}, "packet_id": packet_id})
    assert status == 201, stored
    return stored


@pytest.mark.parametrize("daemon_config", [{"websocket": {"packet_cache_bytes": "1048576"}}])
@pytest_twisted.ensureDeferred
async def test_the_packet_cache_is_bounded_in_bytes_and_preloads_still_work(daemon):
    await daemon.put_device("gate-01")
    cache = sockets_of(daemon, "element").packets.cache
    client = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/readings/socket", auth=daemon.admin_key,
                                      preload="packet"), max_size=None)
    try:
        stored = [await packet(daemon, chr(0x61 + n % 26) * 100_000) for n in range(40)]  # 4 MB
        assert cache.bytes <= 1048576 and 5 <= len(cache) <= 10
        # the newest packet (cached) and the oldest (read from the store) are both preloaded
        for pkt in (stored[-1], stored[0]):
            reading = await reading_of(daemon, pkt["id"])
            body = (await client.recv_json())[0]["body"]
            assert body["id"] == reading["id"] and body["packet"]["id"] == pkt["id"]
            assert body["packet"]["payload"] == pkt["payload"]
        assert cache.bytes <= 1048576
    finally:
        await client.close()
    await eventually(lambda: len(cache) == 0)  # nobody preloads packets any more: nothing kept


@pytest_twisted.ensureDeferred
async def test_a_replay_buffer_is_bounded_in_bytes_without_gap_or_duplicate(daemon):
    await daemon.put_device("gate-01")
    events = daemon.ctx.events
    before = [await packet(daemon, "x" * 500) for _ in range(30)]
    delivered: list[int] = []
    follower = events.follow("default", ("packet",), 0, lambda e: delivered.append(e.id), page=10, max_bytes=4096)
    ingested = [p["id"] for p in before]
    most = 0
    try:
        while True:
            page = await follower.replay_page()
            if not page:
                break
            delivered.extend(e.id for e in page)
            if len(ingested) < 200:  # events keep arriving while the replay pages
                status, stored = await daemon.request("POST", "/api/v1/devices/gate-01/packets",
                                                      [{"payload": "y" * 500, "payload_encoding": "utf8"}] * 10)
                assert status == 201
                ingested.extend(s["id"] for s in stored)
                most = max(most, follower.buffered_bytes)
        follower.go_live()
        for _ in range(3):
            ingested.append((await packet(daemon, "live"))["id"])
    finally:
        follower.cancel()
    assert follower.drops > 0 and most <= 4096  # the buffer passed its budget and was dropped
    assert delivered == ingested  # every event once, in order, across the seam


@pytest.mark.parametrize("daemon_config", [{"websocket": {"max_buffer_bytes": "65536"}}])
@pytest_twisted.ensureDeferred
async def test_live_events_waiting_for_a_packet_are_bounded_by_max_buffer_bytes(daemon):
    await daemon.put_device("gate-01")
    factory = sockets_of(daemon, "element")
    pkt = await packet(daemon, "p")
    client = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/readings/socket",
                                      auth=daemon.admin_key, preload="packet"))
    name = 'iotd_websocket_slow_dropped_total{kind="element"}'
    before = await metric(daemon, name)
    stalled: list[defer.Deferred] = []

    def never_answers(tenant, packet_id):  # a store that does not answer the packet reads
        d = defer.Deferred()
        stalled.append(d)
        return d

    factory.packets.deferred = never_answers
    try:
        for n in range(100):  # 100 readings of ~2 KB wait behind their packets: past 64 KiB
            status, _ = await daemon.request("POST", "/api/v1/devices/gate-01/readings",
                                             {"data": {"blob": "z" * 2000, "n": n}, "packet_id": pkt["id"]})
            assert status == 201
            if not factory.sockets:
                break
        assert not factory.sockets and await metric(daemon, name) == before + 1
        code, _ = await client.closed(timeout=5)
        assert code in (1006, 1008)
    finally:
        del factory.packets.deferred
        await client.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest_twisted.ensureDeferred
async def test_large_packets_to_an_open_packet_socket_keep_the_daemon_small(tmp_path):
    d = DaemonProcess(tmp_path, extra="[websocket]\npacket_cache_bytes = 8388608\n").start()
    try:
        key = d.admin_key
        d.request("PUT", "/api/v1/devices/big", {}, key=key)
        packets = await Client.open(ws_url(d, "/api/v1/packets/socket", auth=key), max_size=None, max_queue=None)
        readings = await Client.open(ws_url(d, "/api/v1/devices/big/readings/socket", auth=key, preload="packet"),
                                     max_size=None)
        payload = "x" * 900_000

        async def ingest(count: int) -> list[dict]:
            out = []
            for _ in range(count):
                status, stored = await in_thread(d.request, "POST", "/api/v1/devices/big/packets",
                                                 {"payload": payload, "payload_encoding": "utf8"}, key)
                assert status == 201
                got = await packets.recv_json(timeout=20)
                assert got[0]["body"]["id"] == stored["id"]
                out.append(stored)
            return out

        await ingest(20)  # warm up: allocator pools, the cache filled to its bound
        base = rss_kib(d.proc.pid)
        stored = await ingest(150)  # 135 MB of payloads
        grown = rss_kib(d.proc.pid) - base
        assert grown < 64 * 1024, f"RSS grew by {grown} KiB"  # it held every packet: 500+ MB
        # the preload still embeds a recent packet
        status, reading = await in_thread(d.request, "POST", "/api/v1/devices/big/readings",
                                          {"data": {"t": 1}, "packet_id": stored[-1]["id"]}, key)
        assert status == 201
        body = (await readings.recv_json(timeout=20))[0]["body"]
        assert body["id"] == reading["id"] and body["packet"]["payload"] == payload
        await packets.close()
        await readings.close()
    finally:
        assert d.stop() == 0


def cli_key(daemon) -> str:
    """``iotd-admin key create`` on the daemon's store, from this source tree (blocking)."""
    import subprocess
    import sys

    import dbutil
    from conftest import repo_root

    ini = os.path.join(os.path.dirname(daemon.ctx.config.database_path), "ws-cli.ini")
    with open(ini, "w") as f:
        f.write(dbutil.cli_ini(daemon.ctx.config))
    out = subprocess.run([sys.executable, "-m", "iotd.admin", "-c", ini, "key", "create", "--role", "read_only"],
                         capture_output=True, text=True, timeout=60, cwd=repo_root(),
                         env=dict(os.environ, PYTHONPATH=repo_root()))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest_twisted.ensureDeferred
async def test_a_key_created_by_the_cli_connects_at_once_as_ithings_token(daemon):
    for _ in range(3):
        key = await in_thread(cli_key, daemon)
        client = await Client.open(ws_url(daemon, CONNECT, **{"ithings-token": key}))
        try:
            assert (await client.recv_json())["code"] == 200
        finally:
            await client.close()

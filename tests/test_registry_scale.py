"""With 100,000 devices a request's work does not grow with the registry.

The devices are written to SQLite in one transaction and loaded by the
daemon's own start-up (a restart).  Then every Device object of the registry
counts the attribute reads made on it (its class is swapped for a counting
subclass of the same layout), and each request path is asked how many devices
it *touched*: a path that sorts, filters or scans the tenant touches all
100,000; an indexed one touches about what it answers.  Work is asserted by
that count, never by timing.
"""

from __future__ import annotations

import contextlib

import pytest_twisted

from conftest import make_config, start_daemon, stop_daemon
from iotd.registry import Device
from iotd.store import devices as devsql
from ws_helpers import Client, handshake_error, ws_url

N = 100_000
CONNECT = "/api/v1/system/common/websocket/connect"
_touched: set[int] | None = None


class CountingDevice(Device):
    """A Device that records that something read one of its attributes."""

    __slots__ = ()

    def __getattribute__(self, name):
        if _touched is not None:
            _touched.add(id(self))
        return object.__getattribute__(self, name)


@contextlib.contextmanager
def counting():
    """``with counting() as touched:`` — ``touched`` is the set of devices read meanwhile."""
    global _touched
    _touched = seen = set()
    try:
        yield seen
    finally:
        _touched = None


def ident(i: int) -> str:
    return f"D{i:06d}"


def doc(i: int) -> dict:
    """Device i: tag t<i % 100>, project p<i % 100>, area a<i % 7>, product P, name N<i>."""
    return {"name": None, "host": None, "productID": "P", "deviceName": f"N{i}", "projectID": f"p{i % 100}",
            "areaID": f"a{i % 7}", "pushId": None, "ports": {}, "tags": [f"t{i % 100}"], "fields": {},
            "interfaces": [], "online": False, "lastSeen": None, "lastAddress": None}


def write_devices(conn) -> None:
    for i in range(N):
        devsql.upsert(conn, "default", ident(i), None, doc(i))


@pytest_twisted.async_yield_fixture(scope="module")
async def big(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("big"))
    d = await start_daemon(cfg)
    await d.ctx.store.write(write_devices)
    await stop_daemon(d)
    d = await start_daemon(cfg)  # the registry loads them as at any start
    try:
        devices = list(d.ctx.registry.all_devices())
        assert len(devices) == N
        for device in devices:
            device.__class__ = CountingDevice
        yield d
    finally:
        await stop_daemon(d)


async def listed(d, query: str, key: str | None = None) -> tuple[list[str], str | None, int]:
    """``GET /api/v1/devices?query``: identifiers, ``next`` and how many devices were touched."""
    with counting() as touched:
        status, body = await d.request("GET", "/api/v1/devices?" + query, key=key)
    assert status == 200, body
    return [item["identifier"] for item in body["items"]], body.get("next"), len(touched)


@pytest_twisted.ensureDeferred
async def test_a_page_of_100000_devices_touches_only_the_page(big):
    assert await listed(big, "limit=1") == ([ident(0)], ident(0), 1)
    assert await listed(big, f"limit=1&after={ident(0)}") == ([ident(1)], ident(1), 1)
    assert await listed(big, f"limit=2&after={ident(N - 2)}") == ([ident(N - 1)], None, 1)
    assert await listed(big, "limit=1&tag=t7") == ([ident(7)], ident(7), 1)
    assert await listed(big, f"limit=2&tag=t7&after={ident(7)}") == ([ident(107), ident(207)], ident(207), 2)
    # a group key: the union of its groups, in order
    group = await big.new_key("group", groups=["t3", "t5"])
    assert await listed(big, "limit=3", key=group) == ([ident(3), ident(5), ident(103)], ident(103), 3)
    assert await listed(big, "limit=1&tag=t5", key=group) == ([ident(5)], ident(5), 1)
    # a tag outside its groups walks that tag's devices (1,000 of them), not the tenant's
    names, nxt, touched = await listed(big, "limit=1&tag=t4", key=group)
    assert (names, nxt) == ([], None) and touched <= 1000


@pytest_twisted.ensureDeferred
async def test_refused_subscriptions_look_at_no_device(big):
    group = await big.new_key("group", groups=["t3"])
    client = await Client.open(ws_url(big, CONNECT, token=group))
    assert (await client.recv_json())["code"] == 200
    refused = {"code": 100012, "msg": "权限不足", "type": "up.sub"}
    try:
        requests = []
        for n in range(50):
            for params in ({"projectID": "p4"}, {"projectID": "p4", "areaID": "a1"},
                           {"productID": "P", "deviceName": "N4"}, {"projectID": f"none-{n}"}):
                requests.append({"type": "up.sub", "body": {"code": "deviceConn", "params": params}})
        with counting() as touched:
            await client.send_many(requests)
            replies = await client.recv_many(len(requests))
        assert replies == [refused] * 200
        assert len(touched) == 0
        # what the key may read is granted, still without a scan
        with counting() as touched:
            for params in ({"projectID": "p3"}, {"projectID": "p3", "areaID": "a3"},
                           {"productID": "P", "deviceName": "N3"}, {"productID": "P", "deviceName": "N103"}):
                reply = await client.request({"type": "up.sub", "body": {"code": "deviceConn", "params": params}})
                assert reply == {"code": 200, "msg": "成功", "type": "down.subRet"}, params
        assert len(touched) == 0
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_tag_and_stream_sockets_look_only_at_their_devices(big):
    key = big.admin_key
    with counting() as touched:
        status, body = await handshake_error(ws_url(big, "/api/v1/tags/no-such-tag/packets/socket", auth=key))
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert len(touched) == 0
    stored = {}
    for i in (1, 7):
        status, stored[i] = await big.request("POST", f"/api/v1/devices/{ident(i)}/packets",
                                              {"payload": "hi", "payload_encoding": "utf8"})
        assert status == 201
    status, _ = await big.request("PUT", "/api/v1/streams/few", {"devices": [ident(1)], "tags": ["t9"]})
    assert status in (200, 201)
    after = "2000-01-01T00:00:00Z"
    # (path, the packet it replays, the devices of its scope: tag t7, or D000001 plus tag t9)
    for path, packet, scope in (("/api/v1/tags/t7/packets/socket", stored[7], 1000),
                                ("/api/v1/streams/few/packets/socket", stored[1], 1001)):
        with counting() as touched:
            client = await Client.open(ws_url(big, path, auth=key, after=after))
            try:
                got = await client.recv_json()  # the replay reads only the scope's devices
            finally:
                await client.close()
        assert [e["body"]["id"] for e in got] == [packet["id"]]
        assert len(touched) <= scope + 10, (path, len(touched))

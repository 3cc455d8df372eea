"""Subscriptions: connect and auth, messages and replies, error codes, heartbeat, limits."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet.task import Clock

from ws_helpers import Client, RawClient, eventually, handshake_error, in_thread, parse_frames, sockets_of, ws_url

PATH = "/api/v1/system/common/websocket/connect"
AUTH_FAILED = {"code": 100002, "msg": "认证失败"}


async def connect(daemon, headers: dict | None = None, **query) -> tuple[Client, dict]:
    client = await Client.open(ws_url(daemon, PATH, **query), headers=headers)
    return client, await client.recv_json()


def sub(code: str, **params) -> dict:
    return {"type": "up.sub", "body": {"code": code, "params": params}}


# -- connect ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_token_in_query_or_header_and_the_connect_reply(daemon):
    key = daemon.admin_key
    seen_ids = set()
    for headers, query in (
        (None, {"token": key}),
        ({"token": key}, {}),
        ({"ithings-token": key}, {}),
        ({"Authorization": f"Bearer {key}"}, {}),
        ({"token": key, "app-code": "core", "project-id": "7", "tenant-code": "default"}, {}),
        ({"ithings-app-code": "core", "ithings-project-id": "7"}, {"token": key, "tenant-code": "default"}),
    ):
        client, hello = await connect(daemon, headers, **query)
        assert set(hello) == {"code", "msg", "handler"}
        assert hello["code"] == 200 and hello["msg"] == "成功"
        assert re.fullmatch(r"[0-9a-f]{32}", hello["handler"]["Traceparent"])
        assert re.fullmatch(r"[0-9]+", hello["handler"]["connectID"])
        seen_ids.add(hello["handler"]["connectID"])
        await client.close()
    assert len(seen_ids) == 6  # connectID is unique per connection


@pytest_twisted.ensureDeferred
async def test_auth_failures_answer_401_json_before_the_upgrade(daemon):
    other_tenant = await daemon.new_key("admin", tenant="other")
    for headers, query in (
        (None, {}),
        (None, {"token": "f" * 64}),
        ({"token": "not-a-key"}, {}),
        ({"tenant-code": "other"}, {"token": daemon.admin_key}),
        (None, {"token": daemon.admin_key, "tenant-code": "other"}),
        ({"ithings-tenant-code": "default"}, {"token": other_tenant}),
    ):
        status, body = await handshake_error(ws_url(daemon, PATH, **query), headers)
        assert (status, body) == (401, AUTH_FAILED)
    client, hello = await connect(daemon, {"tenant-code": "other"}, token=other_tenant)
    assert hello["code"] == 200
    await client.close()


# -- messages -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ping_sub_and_unsub_replies(daemon):
    client, _ = await connect(daemon, token=daemon.admin_key)
    try:
        assert await client.request({"type": "up.ping"}) == {"code": 200, "msg": "成功", "type": "down.pong"}
        request = sub("devicePropertyReport", productID="k0sr6A5BMbN", deviceName="cB05016F7")
        assert await client.request(request) == {"code": 200, "msg": "成功", "type": "down.subRet"}
        request["type"] = "up.unSub"
        assert await client.request(request) == {"code": 200, "msg": "成功", "type": "down.unSubRet"}
        # unsubscribing what was never subscribed is fine too
        assert await client.request(request) == {"code": 200, "msg": "成功", "type": "down.unSubRet"}
        # handler and path may come along
        reply = await client.request({"type": "up.ping", "handler": {"Traceparent": "x"}, "path": "/p"})
        assert reply["type"] == "down.pong"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_every_error_code_echoes_the_request_type(daemon):
    await daemon.put_device("gate-01", tags=["a"], productID="P1", deviceName="D1", projectID="p1")
    await daemon.put_device("gate-02", tags=["b"], productID="P2", deviceName="D2", projectID="p2", areaID="a2")
    client, _ = await connect(daemon, token=daemon.admin_key)
    group = await daemon.new_key("group", groups=["a"])
    limited, _ = await connect(daemon, token=group)
    param = {"code": 100006, "msg": "参数错误"}
    try:
        # not JSON (or not a JSON object): 100014, no type
        for raw in ("not json", "[1, 2]", '"up.sub"'):
            assert await client.request(raw) == {"code": 100014, "msg": "参数的类型不对"}
        # missing type: 100006 without a type
        assert await client.request({"body": {}}) == param
        assert await client.request({"type": 5}) == param
        # body not an object, unknown code, params in no known form: 100006 with the type
        bad_bodies = [
            None, "x", [], {"params": {"projectID": "p1"}},
            {"code": "nope", "params": {"projectID": "p1"}},
            {"code": "deviceConn"},
            {"code": "deviceConn", "params": "p1"},
            {"code": "deviceConn", "params": {}},
            {"code": "deviceConn", "params": {"productID": "P1"}},
            {"code": "deviceConn", "params": {"areaID": "a1"}},
            {"code": "deviceConn", "params": {"projectID": "p1", "deviceName": "D1"}},
            {"code": "deviceConn", "params": {"projectID": ""}},
            {"code": "deviceConn", "params": {"projectID": True}},
            {"code": "deviceConn", "params": {"projectID": ["p1"]}},
            {"code": "deviceConn", "params": {"productID": "P1", "deviceName": "D1", "identifier": "t"}},
        ]
        for body in bad_bodies:
            for type_ in ("up.sub", "up.unSub"):
                assert await client.request({"type": type_, "body": body}) == dict(param, type=type_), body
        # a client sending down.pub: 100018; other down.* types are ignored silently
        assert await client.request({"type": "down.pub", "body": {}}) == {"code": 100018, "msg": "尚未实现",
                                                                         "type": "down.pub"}
        for type_ in ("down.subRet", "down.unSubRet", "down.pong"):
            await client.send({"type": type_, "body": {}})
        await client.silent(0.15)
        # a key that may not read the device/project/area: 100012
        forbidden = {"code": 100012, "msg": "权限不足", "type": "up.sub"}
        for params in ({"productID": "P2", "deviceName": "D2"}, {"projectID": "p2"},
                       {"projectID": "p2", "areaID": "a2"}, {"productID": "P9", "deviceName": "D9"}):
            assert await limited.request(sub("deviceConn", **params)) == forbidden
        reply = await limited.request(sub("devicePublish", productID="P1", deviceName="D1"))
        assert reply["code"] == 200
        assert (await limited.request(sub("deviceConn", projectID="p1")))["code"] == 200
        # unknown types are ignored
        await client.send({"type": "up.somethingNew", "body": {}})
        await client.silent(0.15)
        assert (await client.request({"type": "up.ping"}))["type"] == "down.pong"
    finally:
        await client.close()
        await limited.close()


@pytest_twisted.ensureDeferred
async def test_at_most_1000_subscriptions_per_connection(daemon):
    client, _ = await connect(daemon, token=daemon.admin_key)
    try:
        requests = [sub("deviceConn", projectID=str(n)) for n in range(1000)]
        await client.send_many(requests)
        replies = await client.recv_many(1000)
        assert all(r == {"code": 200, "msg": "成功", "type": "down.subRet"} for r in replies)
        # the same subscription again is no new one
        assert (await client.request(sub("deviceConn", projectID=7)))["code"] == 200
        assert await client.request(sub("deviceConn", projectID="1000")) == {"code": 100006, "msg": "参数错误",
                                                                           "type": "up.sub"}
        unsub = {"type": "up.unSub", "body": {"code": "deviceConn", "params": {"projectID": "0"}}}
        assert (await client.request(unsub))["code"] == 200
        assert (await client.request(sub("deviceConn", projectID="1000")))["code"] == 200
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_client_messages_are_capped_at_64_kib(daemon):
    client, _ = await connect(daemon, token=daemon.admin_key)
    await client.send("x" * 70000)
    code, _ = await client.closed()
    assert code == 1009


# -- heartbeat ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_five_unanswered_pings_close_the_connection(daemon):
    clock = Clock()
    sockets_of(daemon, "subscribe").clock = clock
    raw = await RawClient.open(daemon, f"{PATH}?token={daemon.admin_key}")
    assert raw.status == 101
    factory = sockets_of(daemon, "subscribe")
    await eventually(lambda: len(factory.sockets) == 1)
    (sock,) = factory.sockets
    for _ in range(5):
        clock.advance(10)
    assert sock._missed == 5 and sock.state == sock.STATE_OPEN
    clock.advance(10)  # the sixth beat finds five pings unanswered
    data, _ = await in_thread(raw.drain_until_closed)
    frames = parse_frames(data)
    assert frames[0][0] == 0x1  # the connect reply
    assert [op for op, _ in frames[1:6]] == [0x9] * 5
    assert frames[6][0] == 0x8 and int.from_bytes(frames[6][1][:2], "big") == 1000
    raw.close()


@pytest_twisted.ensureDeferred
async def test_any_client_frame_resets_the_heartbeat_count(daemon):
    clock = Clock()
    factory = sockets_of(daemon, "subscribe")
    factory.clock = clock
    raw = await RawClient.open(daemon, f"{PATH}?token={daemon.admin_key}")
    await eventually(lambda: len(factory.sockets) == 1)
    (sock,) = factory.sockets
    for _ in range(4):
        clock.advance(10)
    assert sock._missed == 4
    await in_thread(raw.send_text, '{"type":"up.ping"}')
    await eventually(lambda: sock._missed == 0)
    for _ in range(5):
        clock.advance(10)
    assert sock.state == sock.STATE_OPEN  # five pings since the message, not yet closed
    raw.close()

    # a real client answers every ping with a pong and stays connected
    client, _ = await connect(daemon, token=daemon.admin_key)
    await eventually(lambda: len(factory.sockets) == 1)
    (sock,) = factory.sockets
    for _ in range(12):
        clock.advance(10)
        await eventually(lambda: sock._missed == 0)
    assert (await client.request({"type": "up.ping"}))["type"] == "down.pong"
    await client.close()

"""Subscriptions: the six codes from their real sources, param forms, matching, isolation."""

from __future__ import annotations

import pytest_twisted

from iotd.timefmt import parse_iso
from ws_helpers import Client, eventually, sockets_of, ws_url

PATH = "/api/v1/system/common/websocket/connect"
DEVICE = {"productID": "k0sr6A5BMbN", "deviceName": "cB05016F7", "projectID": "p1", "areaID": "a1",
          "tags": ["building-a"]}
WHO = {"productID": "k0sr6A5BMbN", "deviceName": "cB05016F7"}


async def connect(daemon, key: str | None = None) -> Client:
    client = await Client.open(ws_url(daemon, PATH, token=key or daemon.admin_key))
    assert (await client.recv_json())["code"] == 200
    return client


async def subscribe(client: Client, code: str, type_: str = "up.sub", **params) -> None:
    reply = await client.request({"type": type_, "body": {"code": code, "params": params}})
    assert reply["code"] == 200, reply


async def post(daemon, path: str, body, key: str | None = None):
    status, stored = await daemon.request("POST", path, body, key=key)
    assert status == 201, stored
    return stored


def ms(iso: str) -> str:
    return str(parse_iso(iso) // 1000)


def pub(code: str, body: dict) -> dict:
    return {"code": 200, "msg": "成功", "type": "down.pub", "path": code, "body": body}


@pytest_twisted.ensureDeferred
async def test_property_reports_from_an_ingested_reading(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    whole = await connect(daemon)
    one = await connect(daemon)
    v2 = await connect(daemon)
    try:
        await subscribe(whole, "devicePropertyReport", **WHO)
        await subscribe(one, "devicePropertyReport", identifier="humidity", **WHO)
        await subscribe(v2, "devicePropertyReportV2", **WHO)
        stored = await post(daemon, "/api/v1/devices/gate-01/readings",
                            {"data": {"temperature": 21.5, "humidity": {"rel": 40}},
                             "measured_at": "2026-11-23T18:30:00.123456Z"})
        stamp = "1795458600123"
        assert ms(stored["measured_at"]) == stamp
        assert await whole.frames(2) == [
            pub("devicePropertyReport", {"device": WHO, "timestamp": stamp, "identifier": "temperature",
                                         "param": 21.5}),
            pub("devicePropertyReport", {"device": WHO, "timestamp": stamp, "identifier": "humidity",
                                         "param": {"rel": 40}}),
        ]
        assert await one.recv_json() == pub("devicePropertyReport", {
            "device": WHO, "timestamp": stamp, "identifier": "humidity", "param": {"rel": 40}})
        assert await v2.recv_json() == pub("devicePropertyReportV2", {
            "device": WHO, "timestamp": stamp, "params": {"temperature": 21.5, "humidity": {"rel": 40}}})
        for client in (whole, one, v2):
            await client.silent(0.1)
    finally:
        for client in (whole, one, v2):
            await client.close()


@pytest_twisted.ensureDeferred
async def test_device_publish_from_ingested_packets(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    client = await connect(daemon)
    try:
        await subscribe(client, "devicePublish", projectID="p1")
        cases = [
            ({"payload": "héllo", "payload_encoding": "utf8", "interface": "lan"}, "héllo", "lan"),
            ({"payload": {"a": [1, 2]}, "payload_encoding": "json"}, '{"a":[1,2]}', ""),
            ({"payload": "00FF10", "payload_encoding": "binary"}, "00ff10", ""),
            ({"payload": None, "payload_encoding": "none", "transceived_at": "2026-01-01T00:00:00Z"}, "", ""),
        ]
        for body, content, topic in cases:
            stored = await post(daemon, "/api/v1/devices/gate-01/packets", body)
            assert await client.recv_json() == pub("devicePublish", {
                "productID": WHO["productID"], "deviceName": WHO["deviceName"], "content": content,
                "topic": topic, "action": "up", "timestamp": ms(stored["transceived_at"]),
                "requestID": str(stored["id"]), "traceID": "", "resultCode": 200, "respPayload": ""})
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ota_report_from_the_ota_ingest(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    client = await connect(daemon)
    try:
        await subscribe(client, "deviceOtaReport", projectID="p1", areaID="a1")
        stored = await post(daemon, "/api/v1/devices/gate-01/ota", {"status": 1, "step": 50, "detail": "downloading"})
        message = await client.recv_json()
        assert message == pub("deviceOtaReport", {"device": WHO, "timestamp": ms(stored["inserted_at"]),
                                                  "status": 1, "detail": "downloading", "step": 50})
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_action_and_conn_events_from_the_push_job(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    client = await connect(daemon)
    try:
        await subscribe(client, "deviceActionReport", **WHO)
        await subscribe(client, "deviceConn", **WHO)
        action = {"dir": "down", "reqType": "req", "actionID": "/api/reboot", "params": {"delay": 5},
                  "code": 200, "msg": "sent", "msgToken": "17", "response": None}
        result = dict(action, reqType="resp", code=500, msg="device error", response={"err": 1})
        events = await daemon.ctx.events.append([
            ("default", "action", "GATE-01", action),
            ("default", "conn", "GATE-01", {"status": 1}),
            ("default", "action", "GATE-01", result),
            ("default", "conn", "GATE-01", {"status": 2}),
        ])
        stamps = [str(e.inserted_us // 1000) for e in events]
        assert await client.frames(4) == [
            pub("deviceActionReport", {"device": WHO, "msgToken": "17", "timestamp": stamps[0],
                                       "actionID": "/api/reboot", "params": {"delay": 5}, "code": 200,
                                       "msg": "sent", "dir": "down", "reqType": "req"}),
            pub("deviceConn", {"device": WHO, "timestamp": stamps[1], "status": 1}),
            pub("deviceActionReport", {"device": WHO, "msgToken": "17", "timestamp": stamps[2],
                                       "actionID": "/api/reboot", "params": {"delay": 5}, "code": 500,
                                       "msg": "device error", "dir": "down", "reqType": "resp"}),
            pub("deviceConn", {"device": WHO, "timestamp": stamps[3], "status": 2}),
        ]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_param_forms_match_by_device_identity_with_ids_as_strings(daemon):
    await daemon.put_device("gate-01", productID="P", deviceName="D", projectID=42, areaID=7)
    await daemon.put_device("plain-02")  # no productID/deviceName/project: its identifier is both
    await daemon.put_device("gate-03", productID="P", deviceName="D3", projectID="42", areaID="8")
    by_pd = await connect(daemon)
    by_project = await connect(daemon)
    by_area = await connect(daemon)
    by_identifier = await connect(daemon)
    try:
        await subscribe(by_pd, "deviceConn", productID="P", deviceName="D")
        await subscribe(by_project, "deviceConn", projectID=42)
        await subscribe(by_area, "deviceConn", projectID="42", areaID=7.0)
        await subscribe(by_identifier, "deviceConn", productID="PLAIN-02", deviceName="PLAIN-02")
        await daemon.ctx.events.append([("default", "conn", d, {"status": 1})
                                        for d in ("GATE-01", "PLAIN-02", "GATE-03")])

        def names(frames):
            return [f["body"]["device"]["deviceName"] for f in frames]

        assert names(await by_pd.frames(1)) == ["D"]
        assert names(await by_project.frames(2)) == ["D", "D3"]
        assert names(await by_area.frames(1)) == ["D"]
        assert names(await by_identifier.frames(1)) == ["PLAIN-02"]
        for client in (by_pd, by_project, by_area, by_identifier):
            await client.silent(0.1)
    finally:
        for client in (by_pd, by_project, by_area, by_identifier):
            await client.close()


@pytest_twisted.ensureDeferred
async def test_unsubscribe_stops_the_messages(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    client = await connect(daemon)
    try:
        await subscribe(client, "devicePropertyReportV2", projectID="p1")
        await post(daemon, "/api/v1/devices/gate-01/readings", {"data": {"t": 1}})
        assert (await client.recv_json())["body"]["params"] == {"t": 1}
        await subscribe(client, "devicePropertyReportV2", type_="up.unSub", projectID="p1")
        await post(daemon, "/api/v1/devices/gate-01/readings", {"data": {"t": 2}})
        await client.silent(0.2)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_overlapping_subscriptions_deliver_each_event_once(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    client = await connect(daemon)
    try:
        await subscribe(client, "devicePropertyReport", **WHO)
        await subscribe(client, "devicePropertyReport", identifier="t", **WHO)
        await subscribe(client, "devicePropertyReport", projectID="p1")
        await subscribe(client, "devicePropertyReport", projectID="p1", areaID="a1")
        await subscribe(client, "devicePublish", **WHO)
        await subscribe(client, "devicePublish", projectID="p1")
        await post(daemon, "/api/v1/devices/gate-01/readings", {"data": {"t": 1, "h": 2}})
        await post(daemon, "/api/v1/devices/gate-01/packets", {"payload": "x"})
        frames = await client.frames(3)
        assert [(f["path"], f["body"].get("identifier")) for f in frames] == [
            ("devicePropertyReport", "t"), ("devicePropertyReport", "h"), ("devicePublish", None)]
        await client.silent(0.2)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_group_keys_get_only_their_devices_and_membership_is_checked_per_event(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    await daemon.put_device("gate-02", **dict(DEVICE, productID="P2", deviceName="D2", tags=["building-b"]))
    group = await daemon.new_key("group", groups=["building-a"])
    client = await connect(daemon, group)
    try:
        reply = await client.request({"type": "up.sub", "body": {
            "code": "deviceConn", "params": {"productID": "P2", "deviceName": "D2"}}})
        assert reply == {"code": 100012, "msg": "权限不足", "type": "up.sub"}
        await subscribe(client, "deviceConn", projectID="p1")  # p1 holds a device of its group
        await daemon.ctx.events.append([("default", "conn", "GATE-02", {"status": 1}),
                                        ("default", "conn", "GATE-01", {"status": 1})])
        assert [f["body"]["device"]["productID"] for f in await client.frames(1)] == [WHO["productID"]]
        await client.silent(0.1)
        # gate-01 moves to another project: the p1 subscription no longer matches it
        await daemon.put_device("gate-01", **dict(DEVICE, projectID="p9"))
        await daemon.ctx.events.append([("default", "conn", "GATE-01", {"status": 2})])
        await client.silent(0.2)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_key_never_receives_another_tenants_events(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    other_key = await daemon.new_key("admin", tenant="other")
    await daemon.put_device("gate-01", key=other_key, **DEVICE)
    ours = await connect(daemon)
    theirs = await connect(daemon, other_key)
    try:
        for client in (ours, theirs):
            await subscribe(client, "devicePublish", projectID="p1")
            await subscribe(client, "devicePublish", **WHO)
        mine = await post(daemon, "/api/v1/devices/gate-01/packets", {"payload": "ours"})
        other = await post(daemon, "/api/v1/devices/gate-01/packets", {"payload": "theirs"}, key=other_key)
        assert (await ours.recv_json())["body"]["requestID"] == str(mine["id"])
        assert (await theirs.recv_json())["body"]["requestID"] == str(other["id"])
        await ours.silent(0.15)
        await theirs.silent(0.05)
    finally:
        await ours.close()
        await theirs.close()


@pytest_twisted.ensureDeferred
async def test_closing_a_connection_clears_its_subscriptions(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    client = await connect(daemon)
    await subscribe(client, "deviceConn", projectID="p1")
    await subscribe(client, "deviceConn", **WHO)
    factory = sockets_of(daemon, "subscribe")
    assert len(factory._plain) == 2
    await client.close()
    await eventually(lambda: not factory._plain and not factory._tenants)


@pytest_twisted.ensureDeferred
async def test_an_expired_command_and_an_error_result_detail_reach_the_subscription(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    client = await connect(daemon)
    try:
        await subscribe(client, "deviceActionReport", **WHO)
        base = {"dir": "down", "reqType": "resp", "actionID": "x", "params": None, "msgToken": "5",
                "response": None}
        events = await daemon.ctx.events.append([
            ("default", "action", "GATE-01", dict(base, code=408, msg="expired")),
            ("default", "action", "GATE-01", dict(base, code=500, msg="no such object", errorDetail={"code": 1})),
        ])
        stamps = [str(e.inserted_us // 1000) for e in events]
        common = {"device": WHO, "msgToken": "5", "actionID": "x", "params": None, "dir": "down",
                  "reqType": "resp"}
        assert await client.frames(2) == [
            pub("deviceActionReport", dict(common, timestamp=stamps[0], code=408, msg="expired")),
            pub("deviceActionReport", dict(common, timestamp=stamps[1], code=500, msg="no such object",
                                           errorDetail={"code": 1})),
        ]
    finally:
        await client.close()

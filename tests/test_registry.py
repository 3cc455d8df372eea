"""The device registry and streams over REST."""

import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_crud_with_case_insensitive_identifiers(daemon):
    status, body = await daemon.request("PUT", "/api/v1/devices/gate-01", {
        "name": "Main gate", "pushId": 478435, "host": "192.168.1.40", "ports": {"default": 502},
        "tags": ["building-a"], "productID": "k0sr6A5BMbN", "deviceName": "cB05016F7",
        "projectID": "p1", "areaID": "a1", "fields": {"serial": "X1"},
        "interfaces": [{"id": "lan", "type": "tcp"}]})
    assert status == 201
    assert body["identifier"] == "GATE-01" and body["online"] is False and body["lastSeen"] is None
    status, body = await daemon.request("GET", "/api/v1/devices/Gate-01")
    assert status == 200 and body["ports"] == {"default": 502} and body["fields"] == {"serial": "X1"}
    status, body = await daemon.request("PUT", "/api/v1/devices/GATE-01", {"name": "Side gate"})
    assert status == 200 and body["name"] == "Side gate" and body["pushId"] is None
    assert (await daemon.request("DELETE", "/api/v1/devices/gate-01"))[0] == 204
    assert (await daemon.request("GET", "/api/v1/devices/GATE-01"))[0] == 404
    assert (await daemon.request("DELETE", "/api/v1/devices/gate-01"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_registry_survives_restart(tmp_path):
    from conftest import make_config, start_daemon, stop_daemon

    cfg = make_config(tmp_path)
    d = await start_daemon(cfg)
    await d.put_device("keep-me", tags=["x"], pushId=7)
    await stop_daemon(d)
    d = await start_daemon(cfg)
    try:
        status, body = await d.request("GET", "/api/v1/devices/keep-me")
        assert status == 200 and body["tags"] == ["x"] and body["pushId"] == 7
    finally:
        await stop_daemon(d)


@pytest_twisted.ensureDeferred
async def test_push_id_unique_across_tenants(daemon):
    await daemon.put_device("a", pushId=1)
    status, body = await daemon.request("PUT", "/api/v1/devices/b", {"pushId": 1})
    assert status == 409 and body["error"]["code"] == "conflict"
    other = await daemon.new_key("admin", tenant="other")
    status, _ = await daemon.request("PUT", "/api/v1/devices/c", {"pushId": 1}, key=other)
    assert status == 409
    await daemon.put_device("a", pushId=2)  # re-assigning frees the old id
    await daemon.put_device("b", pushId=1)


@pytest_twisted.ensureDeferred
async def test_bad_device_fields_are_422(daemon):
    for body, word in [({"ports": {"default": 70000}}, "ports"), ({"tags": "x"}, "tags"),
                       ({"pushId": 2**64}, "pushId"), ({"colour": "red"}, "colour"),
                       ({"fields": []}, "fields")]:
        status, out = await daemon.request("PUT", "/api/v1/devices/x", body)
        assert status == 422 and word in out["error"]["message"]
    status, out = await daemon.request("PUT", "/api/v1/devices/x", [1, 2])
    assert status == 422


@pytest_twisted.ensureDeferred
async def test_list_filters_by_tag_and_pages(daemon):
    for i in range(5):
        await daemon.put_device(f"dev-{i}", tags=["even"] if i % 2 == 0 else ["odd"])
    status, body = await daemon.request("GET", "/api/v1/devices?tag=even")
    assert [d["identifier"] for d in body["items"]] == ["DEV-0", "DEV-2", "DEV-4"]
    status, body = await daemon.request("GET", "/api/v1/devices?limit=2")
    assert [d["identifier"] for d in body["items"]] == ["DEV-0", "DEV-1"] and body["next"] == "DEV-1"
    status, body = await daemon.request("GET", f"/api/v1/devices?limit=2&after={body['next']}")
    assert [d["identifier"] for d in body["items"]] == ["DEV-2", "DEV-3"]
    status, body = await daemon.request("GET", "/api/v1/devices?limit=2&after=DEV-3")
    assert [d["identifier"] for d in body["items"]] == ["DEV-4"] and "next" not in body
    status, body = await daemon.request("GET", "/api/v1/devices?limit=5000")
    assert status == 400 and "limit" in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_streams(daemon):
    status, body = await daemon.request("PUT", "/api/v1/streams/s1", {"devices": ["gate-01"], "tags": ["a"]})
    assert status == 201 and body == {"id": "s1", "devices": ["GATE-01"], "tags": ["a"]}
    status, body = await daemon.request("GET", "/api/v1/streams/s1")
    assert status == 200 and body["devices"] == ["GATE-01"]
    status, body = await daemon.request("PUT", "/api/v1/streams/s1", {"devices": "x"})
    assert status == 422
    assert (await daemon.request("DELETE", "/api/v1/streams/s1"))[0] == 204
    assert (await daemon.request("GET", "/api/v1/streams/s1"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_methods_are_json(daemon):
    status, body = await daemon.request("GET", "/api/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await daemon.request("PATCH", "/api/v1/devices/x")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


async def ids(daemon, query: str = "", key: str | None = None) -> list[str]:
    status, body = await daemon.request("GET", "/api/v1/devices" + query, key=key)
    assert status == 200, body
    return [d["identifier"] for d in body["items"]]


async def may_subscribe(daemon, key: str, params: dict) -> bool:
    from ws_helpers import Client, ws_url

    client = await Client.open(ws_url(daemon, "/api/v1/system/common/websocket/connect", token=key))
    try:
        await client.recv_json()
        reply = await client.request({"type": "up.sub", "body": {"code": "deviceConn", "params": params}})
    finally:
        await client.close()
    assert reply["code"] in (200, 100012), reply
    return reply["code"] == 200


@pytest_twisted.ensureDeferred
async def test_lookups_follow_puts_deletes_and_auto_registration(daemon):
    import treq

    registry = daemon.ctx.registry
    group = await daemon.new_key("group", groups=["blue"])
    await daemon.put_device("m-1", tags=["red"], projectID="p1", areaID="a1", productID="P", deviceName="N")
    await daemon.put_device("m-2", tags=["red", "blue"], projectID="p2")
    assert await ids(daemon, "?tag=red") == ["M-1", "M-2"]
    assert await ids(daemon, key=group) == ["M-2"]
    assert not await may_subscribe(daemon, group, {"projectID": "p1"})
    assert not await may_subscribe(daemon, group, {"productID": "P", "deviceName": "N"})
    # PUT again with other tags, project and area: every lookup follows
    await daemon.put_device("m-1", tags=["blue"], projectID="p9", areaID="a9", productID="P", deviceName="N")
    assert await ids(daemon, "?tag=red") == ["M-2"]
    assert await ids(daemon, "?tag=blue") == ["M-1", "M-2"]
    assert await ids(daemon, key=group) == ["M-1", "M-2"]
    assert not await may_subscribe(daemon, group, {"projectID": "p1"})
    assert await may_subscribe(daemon, group, {"projectID": "p9", "areaID": "a9"})
    assert await may_subscribe(daemon, group, {"productID": "P", "deviceName": "N"})
    assert registry.count("default") == 2
    # a push device that polls is auto-registered and listed
    resp = await treq.get(daemon.url + "/push", params={"deviceId": "4711"})
    assert resp.code == 200
    await resp.content()
    assert await ids(daemon) == ["4711", "M-1", "M-2"] and registry.count("default") == 3
    # deleted: gone from every lookup
    assert (await daemon.request("DELETE", "/api/v1/devices/m-1"))[0] == 204
    assert await ids(daemon, "?tag=blue") == ["M-2"]
    assert await ids(daemon, key=group) == ["M-2"]
    assert not await may_subscribe(daemon, group, {"projectID": "p9"})
    assert await ids(daemon) == ["4711", "M-2"] and registry.count("default") == 2
    status, body = await daemon.request("GET", "/api/v1/tags/blue/packets/socket")
    assert status == 426, body  # blue still names a device (M-2): only the upgrade is missing
    assert (await daemon.request("DELETE", "/api/v1/devices/m-2"))[0] == 204
    status, body = await daemon.request("GET", "/api/v1/tags/blue/packets/socket")
    assert status == 404, body


@pytest_twisted.ensureDeferred
async def test_a_group_key_sees_only_its_devices_in_a_stream(daemon):
    await daemon.put_device("mine", tags=["g"])
    await daemon.put_device("theirs", tags=["h"])
    status, _ = await daemon.request("PUT", "/api/v1/streams/s", {"devices": ["mine", "theirs", "ghost"],
                                                                  "tags": ["h"]})
    assert status == 201
    group = await daemon.new_key("group", groups=["g"])
    status, body = await daemon.request("GET", "/api/v1/streams/s", key=group)
    assert status == 200 and body == {"id": "s", "devices": ["MINE"], "tags": ["h"]}
    status, body = await daemon.request("GET", "/api/v1/streams/s")
    assert body["devices"] == ["MINE", "THEIRS", "GHOST"]


@pytest_twisted.ensureDeferred
async def test_the_runtime_flush_keeps_a_doc_holding_a_nul_character(tmp_path):
    from twisted.internet import reactor

    import dbutil
    from iotd.registry import Registry

    store = dbutil.new_store(tmp_path / "nul.sqlite3", reactor)
    await store.start()
    try:
        reg = Registry(store, reactor)
        await reg.start()
        device, _ = await reg.put("t", "nul", {"tags": ["a\u0000b"]})
        reg.touch(device, "10.0.0.1", 123)
        await reg.flush()  # (PostgreSQL's jsonb would refuse this doc)
        again = Registry(store, reactor)
        await again.start()
        stored = again.get("t", "NUL")
        assert stored.tags == ["a\u0000b"] and stored.lastAddress == "10.0.0.1" and stored.lastSeen == 123
        await again.stop()
        await reg.stop()
    finally:
        await store.stop()

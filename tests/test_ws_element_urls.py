"""Event sockets: every URL, the frame shape, handshake errors and filtering."""

from __future__ import annotations

import pytest
import pytest_twisted

from ws_helpers import Client, handshake_error, sleep, sockets_of, ws_url


async def packet(daemon, device: str, key: str | None = None, **body) -> dict:
    body.setdefault("payload", {"t": 1})
    status, stored = await daemon.request("POST", f"/api/v1/devices/{device}/packets", body, key=key)
    assert status == 201, stored
    return stored


async def reading(daemon, device: str, key: str | None = None, **body) -> dict:
    body.setdefault("data", {"temperature": 21.5})
    status, stored = await daemon.request("POST", f"/api/v1/devices/{device}/readings", body, key=key)
    assert status == 201, stored
    return stored


async def setup_registry(daemon) -> None:
    await daemon.put_device("gate-01", tags=["building-a"], name="Main gate")
    await daemon.put_device("gate-02", tags=["building-b"])
    status, _ = await daemon.request("PUT", "/api/v1/streams/s1", {"devices": ["gate-01"]})
    assert status in (200, 201)


URLS = [
    ("device", "/api/v1/devices/gate-01/{part}/socket"),
    ("device-lowercase", "/api/v1/devices/GATE-01/{part}/socket"),
    ("tag", "/api/v1/tags/building-a/{part}/socket"),
    ("stream", "/api/v1/streams/s1/{part}/socket"),
    ("mandate", "/api/v1/{part}/socket"),
]


@pytest.mark.parametrize("part", ["packets", "readings"])
@pytest.mark.parametrize("name,template", URLS, ids=[u[0] for u in URLS])
@pytest_twisted.ensureDeferred
async def test_every_url_delivers_its_kind_one_event_per_frame(daemon, name, template, part):
    await setup_registry(daemon)
    client = await Client.open(ws_url(daemon, template.format(part=part), auth=daemon.admin_key))
    try:
        stored_packet = await packet(daemon, "gate-01", payload="hello", payload_encoding="utf8")
        stored_reading = await reading(daemon, "gate-01", data={"temperature": 20.25})
        frame = await client.recv_json()
        assert isinstance(frame, list) and len(frame) == 1
        if part == "packets":
            assert frame[0] == {"event": "packet_added", "body": stored_packet}
            body = frame[0]["body"]
            assert body["device_id"] == "GATE-01" and body["payload"] == "hello"
            assert body["payload_encoding"] == "utf8" and body["packet_type"] == "up"
            assert body["inserted_at"].endswith("Z") and len(body["inserted_at"]) == 27
        else:
            assert frame[0] == {"event": "reading_added", "body": stored_reading}
            body = frame[0]["body"]
            assert body["data"] == {"temperature": 20.25} and body["parser_id"] is None
            assert body["location"] is None and body["meta"] == {}
        await client.silent(0.2)  # the other kind never arrives on this socket
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_bearer_header_also_authenticates(daemon):
    await setup_registry(daemon)
    client = await Client.open(ws_url(daemon, "/api/v1/packets/socket"),
                               headers={"Authorization": f"Bearer {daemon.admin_key}"})
    stored = await packet(daemon, "gate-02")
    assert (await client.recv_json())[0]["body"] == stored
    await client.close()


@pytest_twisted.ensureDeferred
async def test_unknown_query_parameters_are_ignored(daemon):
    await setup_registry(daemon)
    client = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket",
                                      auth=daemon.admin_key, foo="bar"))
    stored = await packet(daemon, "gate-01")
    assert (await client.recv_json())[0]["body"]["id"] == stored["id"]
    await client.close()


# -- handshake errors -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_handshake_errors_are_json_before_the_upgrade(daemon):
    await setup_registry(daemon)
    admin = daemon.admin_key
    group = await daemon.new_key("group", groups=["building-a"])

    async def refused(path, **query):
        return await handshake_error(ws_url(daemon, path, **query))

    # 401: no key, unknown key, malformed key
    for query in ({}, {"auth": "ab" * 32}, {"auth": "nope"}):
        status, body = await refused("/api/v1/devices/gate-01/packets/socket", **query)
        assert status == 401 and body["error"]["code"] == "unauthorized"
    # 403: mandate sockets refuse group keys
    for part in ("packets", "readings"):
        status, body = await refused(f"/api/v1/{part}/socket", auth=group)
        assert status == 403 and body["error"]["code"] == "forbidden"
    # 403: a device outside the group key's groups; a tag not among its groups
    status, _ = await refused("/api/v1/devices/gate-02/readings/socket", auth=group)
    assert status == 403
    status, _ = await refused("/api/v1/tags/building-b/packets/socket", auth=group)
    assert status == 403
    # 404: unknown device, tag, stream
    for path in ("/api/v1/devices/nope/packets/socket", "/api/v1/tags/nope/readings/socket",
                 "/api/v1/streams/nope/packets/socket"):
        status, body = await refused(path, auth=admin)
        assert status == 404 and body["error"]["code"] == "not_found"
    # 400: after that is no ISO 8601 date; unknown preload (packet is for readings only)
    status, body = await refused("/api/v1/devices/gate-01/packets/socket", auth=admin, after="yesterday")
    assert status == 400 and "ISO 8601" in body["error"]["message"]
    for preload in ("nonsense", "packet", "device,packet.interface"):
        status, body = await refused("/api/v1/devices/gate-01/packets/socket", auth=admin, preload=preload)
        assert status == 400 and "preload" in body["error"]["message"]
    status, _ = await refused("/api/v1/devices/gate-01/readings/socket", auth=admin, preload="device,bogus")
    assert status == 400
    # the group key may use its own device, tag and a stream
    for path in ("/api/v1/devices/gate-01/packets/socket", "/api/v1/tags/building-a/packets/socket",
                 "/api/v1/streams/s1/readings/socket"):
        client = await Client.open(ws_url(daemon, path, auth=group))
        await client.close()


@pytest_twisted.ensureDeferred
async def test_plain_http_get_is_told_to_upgrade(daemon):
    await setup_registry(daemon)
    status, body = await daemon.request("GET", "/api/v1/devices/gate-01/packets/socket")
    assert status == 426 and body["error"]["code"] == "upgrade_required"
    status, body = await daemon.request("GET", "/api/v1/packets/socket", key="00" * 32)
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_another_tenants_device_is_not_found(daemon):
    await setup_registry(daemon)
    other = await daemon.new_key("admin", tenant="other")
    status, _ = await handshake_error(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=other))
    assert status == 404


# -- filtering ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sockets_never_see_other_devices_or_tenants(daemon):
    await setup_registry(daemon)
    await daemon.put_device("gate-03", tags=["building-a", "building-b"])
    other_admin = await daemon.new_key("admin", tenant="other")
    await daemon.put_device("gate-01", key=other_admin, tags=["building-a"])
    group = await daemon.new_key("group", groups=["building-a"])

    dev1 = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=daemon.admin_key))
    tag_b = await Client.open(ws_url(daemon, "/api/v1/tags/building-b/packets/socket", auth=daemon.admin_key))
    mandate = await Client.open(ws_url(daemon, "/api/v1/packets/socket", auth=daemon.admin_key))
    other = await Client.open(ws_url(daemon, "/api/v1/packets/socket", auth=other_admin))
    # a stream naming gate-02 (outside the group) and tag building-a: the group key gets only its devices
    status, _ = await daemon.request("PUT", "/api/v1/streams/mixed", {"devices": ["gate-02"], "tags": ["building-a"]})
    assert status in (200, 201)
    stream_group = await Client.open(ws_url(daemon, "/api/v1/streams/mixed/packets/socket", auth=group))
    try:
        sent = {}
        for device in ("gate-02", "gate-03", "gate-01"):
            sent[device] = (await packet(daemon, device))["id"]
        theirs = (await packet(daemon, "gate-01", key=other_admin))["id"]

        assert [f[0]["body"]["id"] for f in await dev1.frames(1)] == [sent["gate-01"]]
        assert [f[0]["body"]["id"] for f in await tag_b.frames(2)] == [sent["gate-02"], sent["gate-03"]]
        assert [f[0]["body"]["id"] for f in await mandate.frames(3)] == [sent["gate-02"], sent["gate-03"],
                                                                      sent["gate-01"]]
        assert [f[0]["body"]["id"] for f in await other.frames(1)] == [theirs]
        assert [f[0]["body"]["id"] for f in await stream_group.frames(2)] == [sent["gate-03"], sent["gate-01"]]
        for client in (dev1, tag_b, mandate, other, stream_group):
            await client.silent(0.15)
    finally:
        for client in (dev1, tag_b, mandate, other, stream_group):
            await client.close()


@pytest_twisted.ensureDeferred
async def test_membership_changes_apply_at_once(daemon):
    await setup_registry(daemon)
    tag_socket = await Client.open(ws_url(daemon, "/api/v1/tags/building-a/readings/socket", auth=daemon.admin_key))
    stream_socket = await Client.open(ws_url(daemon, "/api/v1/streams/s1/readings/socket", auth=daemon.admin_key))
    try:
        await reading(daemon, "gate-02")  # not tagged building-a, not in s1
        await tag_socket.silent(0.15)
        await stream_socket.silent(0.05)
        await daemon.put_device("gate-02", tags=["building-a"])
        status, _ = await daemon.request("PUT", "/api/v1/streams/s1", {"devices": ["gate-01", "gate-02"]})
        assert status == 200
        stored = await reading(daemon, "gate-02")
        assert (await tag_socket.recv_json())[0]["body"]["id"] == stored["id"]
        assert (await stream_socket.recv_json())[0]["body"]["id"] == stored["id"]
        await daemon.put_device("gate-01", tags=[])  # gate-01 leaves the tag
        await reading(daemon, "gate-01")
        await tag_socket.silent(0.15)
    finally:
        await tag_socket.close()
        await stream_socket.close()


@pytest_twisted.ensureDeferred
async def test_group_key_loses_events_when_the_device_leaves_its_groups(daemon):
    await setup_registry(daemon)
    group = await daemon.new_key("group", groups=["building-a"])
    client = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=group))
    try:
        first = await packet(daemon, "gate-01")
        assert (await client.recv_json())[0]["body"]["id"] == first["id"]
        await daemon.put_device("gate-01", tags=["building-b"])
        await packet(daemon, "gate-01")
        await client.silent(0.2)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_many_sockets_on_one_device_all_get_each_event_once(daemon):
    await setup_registry(daemon)
    clients = [await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/readings/socket", auth=daemon.admin_key))
               for _ in range(5)]
    try:
        ids = [(await reading(daemon, "gate-01"))["id"] for _ in range(3)]
        for client in clients:
            assert [f[0]["body"]["id"] for f in await client.frames(3)] == ids
            await client.silent(0.05)
    finally:
        for client in clients:
            await client.close()
    await sleep(0.1)
    assert len(sockets_of(daemon, "element").index) == 0


@pytest_twisted.ensureDeferred
async def test_events_larger_than_the_client_message_cap_are_delivered(daemon):
    await setup_registry(daemon)
    client = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=daemon.admin_key))
    try:
        stored = await packet(daemon, "gate-01", payload="x" * 200_000, payload_encoding="utf8")
        assert (await client.recv_json())[0]["body"] == stored
    finally:
        await client.close()

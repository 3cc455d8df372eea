"""Ingest: packets, readings, OTA; single and batch; committed before 201; errors as JSON."""

import dbutil

import pytest
import pytest_twisted


@pytest.fixture
def daemon_config():
    return {"http": {"max_body_bytes": "4096"}}


def stored(daemon):
    conn = dbutil.connect(daemon.ctx.config)
    try:
        return conn.execute("SELECT id, kind, device FROM events ORDER BY id").fetchall()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_single_packet_is_committed_before_201(daemon):
    await daemon.put_device("gate-01")
    status, body = await daemon.request("POST", "/api/v1/devices/gate-01/packets",
                                        {"payload": "0aff", "payload_encoding": "binary", "meta": {"rssi": -70}})
    assert status == 201
    assert body["device_id"] == "GATE-01" and body["payload"] == "0aff" and body["packet_type"] == "up"
    assert body["inserted_at"].endswith("Z") and len(body["inserted_at"]) == 27
    # A separate connection (another process would see the same) finds it already.
    assert stored(daemon) == [(body["id"], "packet", "GATE-01")]


@pytest_twisted.ensureDeferred
async def test_batch_readings_answer_an_array_in_order(daemon):
    await daemon.put_device("t1")
    items = [{"data": {"temperature": 20 + i}, "measured_at": "2026-11-23T18:30:00+01:00"} for i in range(50)]
    status, body = await daemon.request("POST", "/api/v1/devices/T1/readings", items)
    assert status == 201 and len(body) == 50
    assert [b["data"]["temperature"] for b in body] == [20 + i for i in range(50)]
    assert body[0]["measured_at"] == "2026-11-23T17:30:00.000000Z"
    ids = [b["id"] for b in body]
    stamps = [b["inserted_at"] for b in body]
    assert ids == sorted(ids) and stamps == sorted(stamps) and len(set(stamps)) == 50


@pytest_twisted.ensureDeferred
async def test_one_bad_item_rejects_the_whole_batch(daemon):
    await daemon.put_device("t1")
    items = [{"data": {"t": 1}}, {"data": {"t": 2}}, {"data": "not an object"}]
    status, body = await daemon.request("POST", "/api/v1/devices/t1/readings", items)
    assert status == 422 and body["error"]["message"].startswith("item 2:")
    assert stored(daemon) == []


@pytest_twisted.ensureDeferred
async def test_batch_size_limits(daemon):
    await daemon.put_device("t1")
    status, body = await daemon.request("POST", "/api/v1/devices/t1/readings", [])
    assert status == 422


@pytest_twisted.ensureDeferred
async def test_ota_needs_devices_update(daemon):
    await daemon.put_device("t1")
    status, body = await daemon.request("POST", "/api/v1/devices/t1/ota", {"status": 1, "step": 40, "detail": "dl"})
    assert status == 201 and body["step"] == 40
    ro = await daemon.new_key("read_only", permissions=["readings:create"])
    status, body = await daemon.request("POST", "/api/v1/devices/t1/ota", {"status": 1, "step": 50}, key=ro)
    assert status == 403 and body["error"]["code"] == "forbidden"


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400(daemon):
    await daemon.put_device("t1")
    status, body = await daemon.request("POST", "/api/v1/devices/t1/readings", raw=b'{"data": {')
    assert status == 400 and body["error"]["code"] == "invalid_json"


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413_json(daemon):
    await daemon.put_device("t1")
    big = b'{"data": {"blob": "' + b"x" * 10000 + b'"}}'
    status, body = await daemon.request("POST", "/api/v1/devices/t1/readings", raw=big)
    assert status == 413 and body["error"]["code"] == "too_large"
    assert stored(daemon) == []
    status, _ = await daemon.request("GET", "/healthz")
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_wrong_content_type_is_415(daemon):
    await daemon.put_device("t1")
    status, body = await daemon.request("POST", "/api/v1/devices/t1/readings", raw=b"data=1",
                                        headers={b"Content-Type": [b"text/plain"]})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"


@pytest_twisted.ensureDeferred
async def test_unknown_device_404_and_bad_fields_422(daemon):
    status, body = await daemon.request("POST", "/api/v1/devices/ghost/readings", {"data": {}})
    assert status == 404
    await daemon.put_device("t1")
    for item, word in [({"payload": "zz", "payload_encoding": "binary"}, "hex"),
                       ({"payload": 5, "payload_encoding": "utf8"}, "string"),
                       ({"payload": 1, "transceived_at": "yesterday"}, "transceived_at")]:
        status, body = await daemon.request("POST", "/api/v1/devices/t1/packets", item)
        assert status == 422 and word in body["error"]["message"], body


@pytest_twisted.ensureDeferred
async def test_live_subscribers_see_events_before_the_ack(daemon):
    await daemon.put_device("t1")
    seen = []
    daemon.ctx.events.bus.subscribe(lambda e: seen.append(e.id), tenant="default", kinds=["reading"])
    status, body = await daemon.request("POST", "/api/v1/devices/t1/readings", [{"data": {"a": 1}}, {"data": {"a": 2}}])
    assert seen == [b["id"] for b in body]


# -- packet_id: a packet of the same device (issue 12 item 2) ---------------------------------


async def _packet(daemon, device: str, key: str | None = None) -> dict:
    status, body = await daemon.request("POST", f"/api/v1/devices/{device}/packets", {"payload": {"n": 1}}, key=key)
    assert status == 201, body
    return body


@pytest_twisted.ensureDeferred
async def test_packet_id_must_name_a_packet_of_the_same_device_or_the_reading_is_422(daemon):
    from ws_helpers import Client, ws_url

    await daemon.put_device("mine", tags=["g1"])
    await daemon.put_device("theirs", tags=["g2"])
    own = await _packet(daemon, "mine")
    secret = await _packet(daemon, "theirs")  # outside the group key's scope
    other_tenant = await daemon.new_key("admin", tenant="other")
    await daemon.put_device("mine", key=other_tenant)  # same identifier, another tenant
    foreign = await _packet(daemon, "mine", key=other_tenant)
    group = await daemon.new_key("group", groups=["g1"], permissions=["readings:create"])
    status, reading = await daemon.request("POST", "/api/v1/devices/mine/readings",
                                           {"data": {"t": 1}, "packet_id": own["id"]}, key=group)
    assert status == 201, reading
    before = stored(daemon)

    for packet_id in (secret["id"], foreign["id"], reading["id"], 10**9):  # theirs, a tenant's, a reading, none
        status, body = await daemon.request("POST", "/api/v1/devices/mine/readings",
                                            {"data": {"t": 2}, "packet_id": packet_id}, key=group)
        assert status == 422 and body["error"]["code"] == "invalid_body", body
        assert body["error"]["message"].startswith(f"packet_id {packet_id} "), body
        status, body = await daemon.request("POST", "/api/v1/devices/mine/readings",
                                            [{"data": {"t": 3}, "packet_id": own["id"]},
                                             {"data": {"t": 4}, "packet_id": packet_id}], key=group)
        assert status == 422 and body["error"]["message"].startswith(f"item 1: packet_id {packet_id} "), body
    for bad in (0, -1, 2**63, "1", True):
        status, body = await daemon.request("POST", "/api/v1/devices/mine/readings",
                                            {"data": {"t": 5}, "packet_id": bad}, key=group)
        assert status == 422 and body["error"]["message"].startswith("packet_id"), body
    assert stored(daemon) == before  # nothing of any refused request was committed

    # what the group key reads back through preload=packet is only ever its own device's packet
    client = await Client.open(ws_url(daemon, "/api/v1/devices/mine/readings/socket", auth=group,
                                      preload="packet", after="2000-01-01T00:00:00Z"))
    try:
        frame = await client.recv_json()
        assert [e["body"]["packet"]["id"] for e in frame] == [own["id"]]
        assert frame[0]["body"]["packet"]["device_id"] == "MINE"
        await client.silent(0.1)
    finally:
        await client.close()

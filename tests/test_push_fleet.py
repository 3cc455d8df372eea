"""Push at fleet scale, on the real daemon: expiry, bulk commands and batches, results kept, ``//push``."""

from __future__ import annotations

import base64
import json

import dbutil

import pytest
import pytest_twisted
import treq

from push_helpers import clocked, poll, post_result, push_config, push_service, settle  # noqa: F401


async def queue(d, identifier: str, spec: dict, key: str | None = None) -> tuple[int, dict]:
    return await d.request("POST", f"/api/v1/devices/{identifier}/commands", spec, key=key)


async def command(d, cid: int) -> dict:
    status, body = await d.request("GET", f"/api/v1/commands/{cid}")
    assert status == 200
    return body


def action_events(d) -> list[dict]:
    conn = dbutil.connect(d.ctx.config)
    try:
        rows = conn.execute("SELECT data FROM events WHERE kind = 'action' ORDER BY id").fetchall()
    finally:
        conn.close()
    return [json.loads(r[0]) for r in rows]


# -- expiry -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_unsent_command_past_its_ttl_is_expired_by_the_sweep_and_never_handed_out(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=10)
    status, body = await queue(d, "gate", {"endpoint": "load_objects", "ttl": 30})
    assert status == 201 and body["expiresAt"].endswith("Z")
    cid = body["id"]
    clock.advance(29)
    await settle(d)
    assert (await command(d, cid))["status"] == "queued"
    clock.advance(1.5)  # the sweep's timer fires at the deadline
    await settle(d)
    got = await command(d, cid)
    assert got["status"] == "expired" and got["sentAt"] is None and got["finishedAt"] is not None
    assert (await poll(d.url, 10))[:2] == (200, None)
    assert push_service(d).tally.counts["expired"] == 1
    [event] = action_events(d)
    assert event["reqType"] == "resp" and event["code"] == 408 and event["msg"] == "expired"
    assert event["msgToken"] == str(cid)


@pytest_twisted.ensureDeferred
async def test_a_poll_right_after_the_deadline_does_not_get_the_command_even_before_the_sweep(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=10)
    svc = push_service(d)
    svc.sweeps.stopService()  # (no sweep: the hand-out itself must expire it)
    old = (await queue(d, "gate", {"endpoint": "old", "ttl": 10}))[1]["id"]
    fresh = (await queue(d, "gate", {"endpoint": "fresh"}))[1]["id"]
    clock.advance(10)
    status, cmd, _ = await poll(d.url, 10)
    assert status == 200 and cmd == {"endpoint": "fresh"}
    assert (await command(d, old))["status"] == "expired"
    assert (await command(d, fresh))["status"] == "sent"
    assert [(e["code"], e["msgToken"]) for e in action_events(d)] == [(408, str(old)), (200, str(fresh))]


@pytest_twisted.ensureDeferred
async def test_a_sent_command_is_not_expired(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=10)
    cid = (await queue(d, "gate", {"endpoint": "x", "ttl": 5}))[1]["id"]
    assert (await poll(d.url, 10))[1] == {"endpoint": "x"}
    clock.advance(20)
    await settle(d)
    assert (await command(d, cid))["status"] == "sent"


@pytest.mark.parametrize("push_config", [{"push": {"command_ttl": "60"}}])
@pytest_twisted.ensureDeferred
async def test_command_ttl_is_the_default_and_expires_at_wins(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=10)
    default = (await queue(d, "gate", {"endpoint": "a"}))[1]
    later = (await queue(d, "gate", {"endpoint": "b", "expiresAt": "2999-01-01T00:00:00Z"}))[1]
    assert later["expiresAt"].startswith("2999-01-01T00:00:00")
    clock.advance(61)
    await settle(d)
    assert (await command(d, default["id"]))["status"] == "expired"
    assert (await command(d, later["id"]))["status"] == "queued"


@pytest.mark.parametrize("spec, message", [
    ({"endpoint": "x", "ttl": 0}, "ttl"),
    ({"endpoint": "x", "ttl": 2_592_001}, "ttl"),
    ({"endpoint": "x", "ttl": "10"}, "ttl"),
    ({"endpoint": "x", "expiresAt": "tomorrow"}, "expiresAt"),
    ({"endpoint": "x", "ttl": 5, "expiresAt": "2999-01-01T00:00:00Z"}, "ttl"),
])
@pytest_twisted.ensureDeferred
async def test_bad_expiry_is_422_naming_the_field(clocked, spec, message):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    status, body = await queue(d, "gate", spec)
    assert status == 422 and message in body["error"]["message"]


# -- bulk -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_bulk_command_to_a_tag_makes_one_command_each_and_the_batch_counts_them(clocked):
    d, _ = clocked
    for n in range(3):
        await d.put_device(f"gate-{n}", pushId=20 + n, tags=["lobby"])
    await d.put_device("door", pushId=30, tags=["other"])
    status, body = await d.request("POST", "/api/v1/commands",
                                   {"tag": "lobby", "command": {"endpoint": "load_objects", "ttl": 600}})
    assert status == 201, body
    assert sorted(c["device"] for c in body["commands"]) == ["GATE-0", "GATE-1", "GATE-2"]
    batch = body["batch"]
    for n in range(3):  # each reaches the idle-poll work set
        assert (await poll(d.url, 20 + n))[1] == {"endpoint": "load_objects"}
    assert (await poll(d.url, 30))[1] is None
    await post_result(d.url, 20, {"response": "{}"})
    await settle(d)
    status, view = await d.request("GET", f"/api/v1/command-batches/{batch}")
    assert status == 200 and view["batch"] == batch and view["total"] == 3
    assert view["byStatus"]["done"] == 1 and view["byStatus"]["sent"] == 2 and view["byStatus"]["queued"] == 0
    assert [c["status"] for c in view["commands"]] == ["done", "sent", "sent"]
    status, page = await d.request("GET", f"/api/v1/command-batches/{batch}?limit=2")
    assert len(page["commands"]) == 2 and page["next"] == page["commands"][-1]["id"]
    status, rest = await d.request("GET", f"/api/v1/command-batches/{batch}?limit=2&after={page['next']}")
    assert len(rest["commands"]) == 1 and "next" not in rest
    assert (await command(d, body["commands"][0]["id"]))["batch"] == batch


@pytest_twisted.ensureDeferred
async def test_a_group_key_cannot_bulk_command_outside_its_groups(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10, tags=["a"])
    await d.put_device("door", pushId=11, tags=["b"])
    group = await d.new_key(role="group", groups=["a"], permissions=["commands:create"])
    status, body = await d.request("POST", "/api/v1/commands",
                                   {"devices": ["gate", "door"], "command": {"endpoint": "x"}}, key=group)
    assert status == 403 and "DOOR" in body["error"]["message"].upper()
    status, body = await d.request("POST", "/api/v1/commands",
                                   {"tag": "b", "command": {"endpoint": "x"}}, key=group)
    assert status == 403
    assert await push_service(d).unfinished_for("default", "GATE") == []  # nothing queued
    status, body = await d.request("POST", "/api/v1/commands",
                                   {"devices": ["gate"], "command": {"endpoint": "x"}}, key=group)
    assert status == 201
    other = (await d.request("POST", "/api/v1/commands", {"devices": ["door"], "command": {"endpoint": "x"}}))[1]
    assert (await d.request("GET", f"/api/v1/command-batches/{body['batch']}", key=group))[0] == 200
    assert (await d.request("GET", f"/api/v1/command-batches/{other['batch']}", key=group))[0] == 404


@pytest.mark.parametrize("request_body, status, message", [
    ({"command": {"endpoint": "x"}}, 422, "devices or tag"),
    ({"devices": ["gate"]}, 422, "command"),
    ({"devices": "gate", "command": {"endpoint": "x"}}, 422, "devices"),
    ({"devices": ["gate"] * 10_001, "command": {"endpoint": "x"}}, 422, "10000"),
    ({"tag": "nosuch", "command": {"endpoint": "x"}}, 422, "tag"),
    ({"devices": ["gate"], "command": {"endpoint": "a/b"}}, 422, "endpoint"),
    ({"devices": ["nosuch"], "command": {"endpoint": "x"}}, 403, "NOSUCH"),
])
@pytest_twisted.ensureDeferred
async def test_bad_bulk_requests_name_the_field(clocked, request_body, status, message):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    got, body = await d.request("POST", "/api/v1/commands", request_body)
    assert got == status and message.lower() in body["error"]["message"].lower()


# -- results kept, uuid, //push ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_binary_result_comes_back_byte_identical_from_result_raw(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    cid = (await queue(d, "gate", {"endpoint": "x"}))[1]["id"]
    assert (await poll(d.url, 10, uuid="fw-1"))[1] == {"endpoint": "x"}
    raw = bytes(range(256))
    assert (await post_result(d.url, 10, raw=raw, uuid="fw-1"))[0] == 200
    got = await command(d, cid)
    assert got["status"] == "failed" and got["error"].startswith("malformed result")
    assert got["resultEncoding"] == "base64" and base64.b64decode(got["resultRaw"]) == raw
    assert got["sentUuid"] == "fw-1" and got["resultUuid"] == "fw-1"


@pytest_twisted.ensureDeferred
async def test_an_error_result_keeps_its_extra_fields_and_the_body_as_text(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    cid = (await queue(d, "gate", {"endpoint": "x"}))[1]["id"]
    await poll(d.url, 10)
    body = b'{"error": "no such object", "code": 1}'
    await post_result(d.url, 10, raw=body)
    got = await command(d, cid)
    assert got["status"] == "failed" and got["error"] == "no such object"
    assert got["errorDetail"] == {"code": 1}
    assert got["resultRaw"] == body.decode() and "resultEncoding" not in got


@pytest_twisted.ensureDeferred
async def test_double_slash_push_and_result_are_served(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    cid = (await queue(d, "gate", {"endpoint": "x"}))[1]["id"]
    resp = await treq.get(d.url + "//push", params={"deviceId": "10"})
    assert resp.code == 200 and await resp.json() == {"endpoint": "x"}
    resp = await treq.post(d.url + "//result", params={"deviceId": "10"}, data=b'{"response": "ok"}')
    assert resp.code == 200 and await resp.content() == b""
    assert (await command(d, cid))["status"] == "done"

"""Operator REST for commands: queue (with ?wait=), get, list, cancel; keys, tenants, validation."""

from __future__ import annotations

import dbutil
import json

import pytest
import pytest_twisted
from twisted.internet import defer

from push_helpers import clocked, poll, post_result, push_config, push_service, settle  # noqa: F401


async def queue(d, identifier: str, spec: dict, key: str | None = None, query: str = "") -> tuple[int, dict]:
    return await d.request("POST", f"/api/v1/devices/{identifier}/commands{query}", spec, key=key)


@pytest_twisted.ensureDeferred
async def test_queue_answers_201_with_the_queued_command(clocked):
    d, _ = clocked
    await d.put_device("gate-01", pushId=10)
    status, body = await queue(d, "gate-01", {"verb": "post", "endpoint": "load_objects",
                                              "body": {"object": "users"}, "contentType": "application/json",
                                              "queryString": "session=1"})
    assert status == 201
    assert isinstance(body["id"], int) and body["device"] == "GATE-01" and body["status"] == "queued"
    assert body["verb"] == "POST" and body["endpoint"] == "load_objects" and body["body"] == {"object": "users"}
    assert body["contentType"] == "application/json" and body["queryString"] == "session=1"
    assert body["attempts"] == 0 and body["createdAt"].endswith("Z")
    assert body["sentAt"] is None and body["finishedAt"] is None
    status, got = await d.request("GET", f"/api/v1/commands/{body['id']}")
    assert status == 200 and got == body


@pytest.mark.parametrize("spec, message", [
    ({"verb": "PUT", "endpoint": "x"}, "verb"),
    ({}, "endpoint"),
    ({"endpoint": ""}, "endpoint"),
    ({"endpoint": "a/b"}, "endpoint"),
    ({"endpoint": "../etc"}, "endpoint"),
    ({"endpoint": "load objects"}, "endpoint"),
    ({"endpoint": "x", "body": 5}, "body"),
    ({"endpoint": "x", "contentType": "application/octet-stream", "body": "not base64!"}, "base64"),
    ({"endpoint": "x", "contentType": "application/octet-stream", "body": {"a": 1}}, "base64"),
    ({"endpoint": "x", "queryString": "a\r\nb"}, "queryString"),
    ({"endpoint": "x", "priority": 1}, "priority"),
    ([{"endpoint": "x"}], "object"),
])
@pytest_twisted.ensureDeferred
async def test_invalid_commands_are_422_naming_the_field(clocked, spec, message):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    status, body = await queue(d, "gate", spec)
    assert status == 422 and body["error"]["code"] == "invalid_body"
    assert message in body["error"]["message"]
    assert await push_service(d).unfinished_for("default", "GATE") == []


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400_and_unknown_device_404(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    status, body = await d.request("POST", "/api/v1/devices/gate/commands", raw=b"{nope")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = await queue(d, "nosuch", {"endpoint": "x"})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await d.request("GET", "/api/v1/commands/999")
    assert status == 404
    status, body = await d.request("GET", "/api/v1/commands/99999999999999999999999")
    assert status == 404


@pytest_twisted.ensureDeferred
async def test_wait_answers_200_with_the_finished_command_when_the_result_comes_in_time(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=10)
    pending = defer.ensureDeferred(queue(d, "gate", {"endpoint": "load_objects", "body": {"object": "users"}},
                                         query="?wait=30"))
    # The device polls until it finds the command (the POST commits it first).
    for _ in range(200):
        status, cmd, _ = await poll(d.url, 10)
        if cmd is not None:
            break
    assert cmd == {"endpoint": "load_objects", "body": {"object": "users"}}
    clock.advance(29)
    assert not pending.called
    await post_result(d.url, 10, {"response": '{"users": []}'})
    status, body = await pending
    assert status == 200 and body["status"] == "done" and body["response"] == {"users": []}
    assert body["finishedAt"] is not None


@pytest_twisted.ensureDeferred
async def test_wait_answers_202_with_the_current_state_when_time_is_up(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=10)
    pending = defer.ensureDeferred(queue(d, "gate", {"endpoint": "load_objects"}, query="?wait=5"))
    while not push_service(d).has_work("default", "GATE"):
        await d.request("GET", "/healthz")  # let the queue request commit
    assert not pending.called
    clock.advance(5)
    status, body = await pending
    assert status == 202 and body["status"] == "queued"
    # A command the device took but did not answer in time is 202 "sent".
    await d.put_device("door", pushId=11)
    pending = defer.ensureDeferred(queue(d, "door", {"endpoint": "x"}, query="?wait=1"))
    while (await poll(d.url, 11))[1] is None:
        pass
    clock.advance(1)
    status, body = await pending
    assert status == 202 and body["status"] == "sent" and body["attempts"] == 1


@pytest.mark.parametrize("query", ["?wait=61", "?wait=-1", "?wait=abc", "?wait=nan"])
@pytest_twisted.ensureDeferred
async def test_wait_over_60_seconds_is_400(clocked, query):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    status, body = await queue(d, "gate", {"endpoint": "x"}, query=query)
    assert status == 400 and "wait" in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_list_filters_by_status_and_pages(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    ids = [(await queue(d, "gate", {"endpoint": f"e{n}"}))[1]["id"] for n in range(5)]
    await poll(d.url, 10)
    await post_result(d.url, 10, {"response": "{}"})
    status, body = await d.request("GET", "/api/v1/devices/gate/commands?status=done")
    assert status == 200 and [c["id"] for c in body["items"]] == ids[:1] and "next" not in body
    status, body = await d.request("GET", "/api/v1/devices/gate/commands?status=queued&limit=2")
    assert [c["id"] for c in body["items"]] == ids[1:3] and body["next"] == ids[2]
    status, body = await d.request("GET", f"/api/v1/devices/gate/commands?status=queued&limit=2&after={body['next']}")
    assert [c["id"] for c in body["items"]] == ids[3:5] and "next" not in body
    status, body = await d.request("GET", "/api/v1/devices/gate/commands")
    assert [c["status"] for c in body["items"]] == ["done", "queued", "queued", "queued", "queued"]
    status, body = await d.request("GET", "/api/v1/devices/gate/commands?status=lost")
    assert status == 400
    status, body = await d.request("GET", "/api/v1/devices/gate/commands?limit=0")
    assert status == 400


@pytest_twisted.ensureDeferred
async def test_cancel_a_queued_command_204_and_409_once_sent_or_finished(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    a = (await queue(d, "gate", {"endpoint": "a"}))[1]["id"]
    b = (await queue(d, "gate", {"endpoint": "b"}))[1]["id"]
    c = (await queue(d, "gate", {"endpoint": "c"}))[1]["id"]
    await poll(d.url, 10)  # a is sent
    status, body = await d.request("DELETE", f"/api/v1/commands/{a}")
    assert status == 409 and body["error"]["code"] == "conflict"
    status, body = await d.request("DELETE", f"/api/v1/commands/{b}")
    assert status == 204 and body is None
    got = (await d.request("GET", f"/api/v1/commands/{b}"))[1]
    assert got["status"] == "cancelled" and got["finishedAt"] is not None
    assert (await d.request("DELETE", f"/api/v1/commands/{b}"))[0] == 409
    await post_result(d.url, 10, {"response": "{}"})
    assert (await d.request("DELETE", f"/api/v1/commands/{a}"))[0] == 409
    assert (await poll(d.url, 10))[1] == {"endpoint": "c"}  # b never goes out
    got = (await d.request("GET", f"/api/v1/commands/{c}"))[1]
    assert got["status"] == "sent" and got["attempts"] == 1
    assert (await d.request("DELETE", f"/api/v1/commands/{c}"))[0] == 409  # sent now: too late to cancel
    assert (await d.request("DELETE", "/api/v1/commands/12345"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_deleting_the_device_cancels_its_queued_commands(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    a = (await queue(d, "gate", {"endpoint": "a"}))[1]["id"]
    status, _ = await d.request("DELETE", "/api/v1/devices/gate")
    assert status == 204
    await settle(d)
    got = (await d.request("GET", f"/api/v1/commands/{a}"))[1]
    assert got["status"] == "cancelled" and got["error"] == "device deleted"


@pytest_twisted.ensureDeferred
async def test_another_tenant_sees_nothing(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    cmd = (await queue(d, "gate", {"endpoint": "a"}))[1]["id"]
    other = await d.new_key(tenant="acme")
    status, _ = await d.request("GET", f"/api/v1/commands/{cmd}", key=other)
    assert status == 404
    status, _ = await d.request("DELETE", f"/api/v1/commands/{cmd}", key=other)
    assert status == 404
    status, _ = await queue(d, "gate", {"endpoint": "x"}, key=other)
    assert status == 404
    status, _ = await d.request("GET", "/api/v1/devices/gate/commands", key=other)
    assert status == 404
    assert (await d.request("GET", f"/api/v1/commands/{cmd}"))[1]["status"] == "queued"


@pytest_twisted.ensureDeferred
async def test_keys_need_commands_permissions(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10, tags=["a"])
    await d.put_device("door", pushId=11, tags=["b"])
    reader = await d.new_key(role="read_only")
    creator = await d.new_key(role="read_only", permissions=["commands:create"])
    group = await d.new_key(role="group", groups=["a"])
    status, _ = await d.request("POST", "/api/v1/devices/gate/commands", {"endpoint": "x"}, key="0" * 64)
    assert status == 401
    status, body = await queue(d, "gate", {"endpoint": "x"}, key=reader)
    assert status == 403 and "commands:create" in body["error"]["message"]
    status, body = await queue(d, "gate", {"endpoint": "x"}, key=creator)
    assert status == 201
    gate_cmd = body["id"]
    door_cmd = (await queue(d, "door", {"endpoint": "y"}))[1]["id"]
    assert (await d.request("DELETE", f"/api/v1/commands/{gate_cmd}", key=creator))[0] == 403
    assert (await d.request("GET", f"/api/v1/commands/{gate_cmd}", key=reader))[0] == 200
    # A group key reads the commands of its group's devices only.
    assert (await d.request("GET", f"/api/v1/commands/{gate_cmd}", key=group))[0] == 200
    assert (await d.request("GET", f"/api/v1/commands/{door_cmd}", key=group))[0] == 404
    assert (await d.request("GET", "/api/v1/devices/door/commands", key=group))[0] == 404


@pytest_twisted.ensureDeferred
async def test_the_event_log_records_the_send_and_the_result(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=10)
    cmd = (await queue(d, "gate", {"endpoint": "load_objects", "body": {"object": "users"}}))[1]["id"]
    await poll(d.url, 10)
    await post_result(d.url, 10, {"response": '{"users":[]}'})
    await settle(d)
    conn = dbutil.connect(d.ctx.config)
    try:
        rows = conn.execute("SELECT kind, device, data FROM events ORDER BY id").fetchall()
    finally:
        conn.close()
    assert [(k, dev, json.loads(data)) for k, dev, data in rows] == [
        ("conn", "GATE", {"status": 1}),
        ("action", "GATE", {"dir": "down", "reqType": "req", "actionID": "load_objects",
                            "params": {"object": "users"}, "code": 200, "msg": "", "msgToken": str(cmd)}),
        ("action", "GATE", {"dir": "down", "reqType": "resp", "actionID": "load_objects",
                            "params": {"object": "users"}, "code": 200, "msg": "", "msgToken": str(cmd),
                            "response": {"users": []}}),
    ]

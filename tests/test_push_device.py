"""The device side over real HTTP: GET /push and POST /result exactly as Control iD firmware uses them.

The daemon is the real service tree on loopback; its time is a task.Clock
(see push_helpers.ClockReactor).
"""

from __future__ import annotations

import json
import dbutil

import pytest
import pytest_twisted
import treq
from twisted.internet import defer

from conftest import make_config, stop_daemon
from prometheus_client import REGISTRY

from iotd.registry import FLUSH_EVERY, SEEN_REFRESH
from push_helpers import (  # noqa: F401  (fixtures)
    LogLines,
    clocked,
    poll,
    post_result,
    push_config,
    push_service,
    settle,
    start_clock_daemon,
)


@pytest.fixture
def push_config():  # noqa: F811
    return {"http": {"max_body_bytes": "4096"}}


async def queue(d, identifier: str, spec: dict) -> dict:
    status, body = await d.request("POST", f"/api/v1/devices/{identifier}/commands", spec)
    assert status == 201, body
    return body


async def command(d, command_id: int) -> dict:
    status, body = await d.request("GET", f"/api/v1/commands/{command_id}")
    assert status == 200, body
    return body


def count(name: str, outcome: str) -> float:
    """A counter's value as ``/metrics`` shows it (0 before its first increment)."""
    return REGISTRY.get_sample_value(name, {"outcome": outcome}) or 0.0


@pytest_twisted.ensureDeferred
async def test_idle_poll_is_an_empty_200_and_extra_parameters_are_ignored(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=478435)
    status, body, headers = await poll(d.url, 478435, uuid="0f8fad5b-d9cb-469f-a165-70867728950e", extra="x")
    assert status == 200 and body is None
    assert not headers.hasHeader(b"content-type")


@pytest_twisted.ensureDeferred
async def test_poll_answers_the_command_with_only_the_fields_given(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=-5)  # deviceId is a signed 64-bit integer
    await queue(d, "gate", {"verb": "POST", "endpoint": "load_objects", "body": {"object": "users"},
                            "contentType": "application/json"})
    await queue(d, "gate", {"endpoint": "set_configuration.fcgi"})
    await queue(d, "gate", {"verb": "GET", "endpoint": "export_objects.fcgi", "queryString": "session=abc",
                            "contentType": "application/octet-stream", "body": "AAEC/w=="})
    status, body, headers = await poll(d.url, -5)
    assert status == 200 and headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert body == {"verb": "POST", "endpoint": "load_objects", "body": {"object": "users"},
                    "contentType": "application/json"}
    await post_result(d.url, -5, {"response": "{}"})
    assert (await poll(d.url, -5))[1] == {"endpoint": "set_configuration.fcgi"}
    await post_result(d.url, -5, {"response": "{}"})
    assert (await poll(d.url, -5))[1] == {"verb": "GET", "endpoint": "export_objects.fcgi",
                                          "contentType": "application/octet-stream", "body": "AAEC/w==",
                                          "queryString": "session=abc"}


@pytest.mark.parametrize("query", ["", "?deviceId=", "?deviceId=abc", "?deviceId=1.5", "?deviceId=%2B5",
                                   "?deviceId=9223372036854775808", "?uuid=x"])
@pytest_twisted.ensureDeferred
async def test_bad_device_id_is_400_json_on_push_and_result(clocked, query):
    d, _ = clocked
    for method, path in (("GET", "/push"), ("POST", "/result")):
        resp = await treq.request(method, d.url + path + query, data=b'{"response": "{}"}')
        body = json.loads(await resp.content())
        assert resp.code == 400 and body["error"]["code"] == "invalid_device_id", (method, query)


@pytest_twisted.ensureDeferred
async def test_two_concurrent_polls_of_one_device_never_get_two_commands(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=1)
    for n in range(5):
        await queue(d, "gate", {"endpoint": "load_objects", "body": {"n": n}})
    answers = await defer.gatherResults([defer.ensureDeferred(poll(d.url, 1)) for _ in range(20)])
    commands = [body for status, body, _ in answers if body is not None]
    assert all(status == 200 for status, _, _ in answers)
    assert commands == [{"endpoint": "load_objects", "body": {"n": 0}}]


@pytest_twisted.ensureDeferred
async def test_head_or_post_on_push_never_hands_out_a_command(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=1)
    await queue(d, "gate", {"endpoint": "load_objects"})
    for method in ("HEAD", "POST"):
        resp = await treq.request(method, d.url + "/push?deviceId=1")
        await resp.content()
        assert resp.code == 405
    assert (await poll(d.url, 1))[1] == {"endpoint": "load_objects"}


@pytest_twisted.ensureDeferred
async def test_unknown_device_is_auto_registered_with_its_address(clocked):
    d, clock = clocked
    status, body, _ = await poll(d.url, 9001, uuid="u")
    assert status == 200 and body is None
    status, dev = await d.request("GET", "/api/v1/devices/9001")
    assert status == 200
    assert dev["pushId"] == 9001 and dev["host"] == "127.0.0.1" and dev["online"] is True
    assert dev["lastAddress"] == "127.0.0.1" and dev["lastSeen"] is not None
    # Later polls never change host; the operator's host stays.
    dev.pop("identifier")
    dev.update(host="192.0.2.7")
    for key in ("online", "lastSeen", "lastAddress"):
        dev.pop(key)
    await d.put_device("9001", **dev)
    clock.advance(1)
    await poll(d.url, 9001)
    status, dev = await d.request("GET", "/api/v1/devices/9001")
    assert dev["host"] == "192.0.2.7" and dev["lastAddress"] == "127.0.0.1"
    await settle(d)
    conn = dbutil.connect(d.ctx.config)
    try:
        conns = conn.execute("SELECT device, data FROM events WHERE kind = 'conn'").fetchall()
    finally:
        conn.close()
    assert conns == [("9001", '{"status":1}')]


@pytest_twisted.ensureDeferred
async def test_concurrent_first_polls_register_the_device_once(clocked):
    d, _ = clocked
    answers = await defer.gatherResults([defer.ensureDeferred(poll(d.url, 77)) for _ in range(10)])
    assert [a[0] for a in answers] == [200] * 10
    assert [dev.identifier for dev in d.ctx.registry.devices("default")] == ["77"]


@pytest.mark.parametrize("push_config", [{"push": {"auto_register": "false"}}])
@pytest_twisted.ensureDeferred
async def test_unknown_device_without_auto_register_gets_empty_200_and_is_counted(clocked):
    d, _ = clocked
    before = count("iotd_push_polls_total", "unknown")
    with LogLines() as logs:
        status, body, _ = await poll(d.url, 4242)
        await poll(d.url, 4242)
    assert status == 200 and body is None
    assert d.ctx.registry.by_push_id(4242) is None
    assert count("iotd_push_polls_total", "unknown") == before + 2
    # logged once, not per poll (the whole line: a port number in another line may contain "4242")
    assert logs.lines.count("poll from unknown deviceId 4242 at 127.0.0.1 ignored") == 1
    status, _ = await post_result(d.url, 4242, {"response": "{}"})
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_result_with_json_encoded_string_is_stored_as_sent_and_parsed(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    cmd = await queue(d, "gate", {"endpoint": "load_objects", "body": {"object": "users"}})
    await poll(d.url, 3)
    firmware = '{"users":[{"id":1,"registration":"Test","name":"Walter White"}]}'
    status, raw = await post_result(d.url, 3, {"response": firmware}, uuid="u-1", endpoint="load_objects")
    assert status == 200 and raw == b""
    got = await command(d, cmd["id"])
    assert got["status"] == "done" and got["attempts"] == 1 and got["error"] is None
    assert got["response"] == {"users": [{"id": 1, "registration": "Test", "name": "Walter White"}]}
    assert got["responseRaw"] == firmware
    assert got["sentAt"] and got["finishedAt"]


@pytest_twisted.ensureDeferred
async def test_result_as_in_the_seed_example_with_an_object_response(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    cmd = await queue(d, "gate", {"endpoint": "load_objects", "body": {"object": "users"}})
    await poll(d.url, 3)
    seed = {"response": {"users": [{"id": 1, "registration": "Test", "name": "Walter White", "password":
                                    "Heisenberg", "salt": "", "expires": 0, "user_type_id": 0,
                                    "begin_time": 0, "end_time": 0}]}}
    assert (await post_result(d.url, 3, seed))[0] == 200
    assert (await command(d, cmd["id"]))["response"] == seed["response"]


@pytest_twisted.ensureDeferred
async def test_result_with_error_fails_the_command(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    cmd = await queue(d, "gate", {"endpoint": "destroy_objects"})
    await poll(d.url, 3)
    assert await post_result(d.url, 3, {"error": "object not found"}) == (200, b"")
    got = await command(d, cmd["id"])
    assert got["status"] == "failed" and got["error"] == "object not found" and got["response"] is None


@pytest_twisted.ensureDeferred
async def test_result_that_is_not_json_answers_200_and_fails_the_command(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    cmd = await queue(d, "gate", {"endpoint": "load_objects"})
    await poll(d.url, 3)
    before = count("iotd_push_results_total", "malformed")
    assert await post_result(d.url, 3, raw=b"users=1&x") == (200, b"")
    got = await command(d, cmd["id"])
    assert got["status"] == "failed" and got["error"].startswith("malformed result: ")
    assert count("iotd_push_results_total", "malformed") == before + 1


@pytest_twisted.ensureDeferred
async def test_result_nobody_waits_for_is_an_orphan_answered_200_and_not_stored(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    cmd = await queue(d, "gate", {"endpoint": "load_objects"})  # queued, not sent
    before = count("iotd_push_results_total", "orphan")
    assert await post_result(d.url, 3, {"response": "{}"}) == (200, b"")
    assert (await command(d, cmd["id"]))["status"] == "queued"
    assert count("iotd_push_results_total", "orphan") == before + 1


@pytest_twisted.ensureDeferred
async def test_result_naming_another_endpoint_is_logged_and_still_completes(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    cmd = await queue(d, "gate", {"endpoint": "load_objects"})
    await poll(d.url, 3)
    with LogLines() as logs:
        await post_result(d.url, 3, {"response": "{}"}, endpoint="remove_users")
    assert any("remove_users" in line and "load_objects" in line for line in logs.lines)
    assert (await command(d, cmd["id"]))["status"] == "done"


@pytest_twisted.ensureDeferred
async def test_only_a_result_over_max_body_bytes_gets_413(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    cmd = await queue(d, "gate", {"endpoint": "load_objects"})
    await poll(d.url, 3)
    big = json.dumps({"response": "x" * 5000}).encode()
    status, body = await post_result(d.url, 3, raw=big)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert (await command(d, cmd["id"]))["status"] == "sent"
    fits = json.dumps({"response": json.dumps({"v": "x" * 3900})}).encode()
    assert len(fits) < 4096
    assert await post_result(d.url, 3, raw=fits) == (200, b"")
    assert (await command(d, cmd["id"]))["response"] == {"v": "x" * 3900}


@pytest.mark.parametrize("push_config", [{"push": {"allowed_sources": "10.0.0.0/8, 192.168.0.0/16"}}])
@pytest_twisted.ensureDeferred
async def test_source_outside_allowed_sources_gets_403_empty(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    await queue(d, "gate", {"endpoint": "load_objects"})
    before = count("iotd_push_polls_total", "forbidden")
    status, body, _ = await poll(d.url, 3)
    assert (status, body) == (403, None)
    assert await post_result(d.url, 3, {"response": "{}"}) == (403, b"")
    assert count("iotd_push_polls_total", "forbidden") == before + 1
    assert d.ctx.registry.get("default", "gate").lastSeen is None  # nothing recorded
    assert [c.status for c in await push_service(d).unfinished_for("default", "GATE")] == ["queued"]


@pytest.mark.parametrize("push_config", [{"push": {"allowed_sources": "127.0.0.0/8"}}])
@pytest_twisted.ensureDeferred
async def test_source_inside_allowed_sources_is_served(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    await queue(d, "gate", {"endpoint": "load_objects"})
    status, body, _ = await poll(d.url, 3)
    assert status == 200 and body == {"endpoint": "load_objects"}


@pytest_twisted.ensureDeferred
async def test_polls_and_results_update_last_seen_and_reach_the_store_at_the_flush(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=3)
    await queue(d, "gate", {"endpoint": "load_objects"})
    await poll(d.url, 3)
    clock.advance(2)
    await post_result(d.url, 3, {"response": "{}"})
    dev = d.ctx.registry.get("default", "gate")
    assert dev.lastSeen == int(clock.seconds() * 1_000_000) and dev.lastAddress == "127.0.0.1"
    clock.advance(FLUSH_EVERY)  # the registry's periodic flush
    await d.ctx.store.write(lambda conn: None)  # one writer, FIFO: the flush is committed
    conn = dbutil.connect(d.ctx.config)
    try:
        doc = json.loads(conn.execute("SELECT doc FROM devices WHERE identifier = 'GATE'").fetchone()[0])
    finally:
        conn.close()
    assert doc["lastSeen"] == dev.lastSeen and doc["lastAddress"] == "127.0.0.1" and doc["online"] is True


def _stored_doc(d, ident: str) -> dict:
    conn = dbutil.connect(d.ctx.config)
    try:
        return json.loads(conn.execute(f"SELECT doc FROM devices WHERE identifier = '{ident}'").fetchone()[0])
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_device_polling_every_second_is_written_once_a_minute_and_at_stop(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=3)
    await poll(d.url, 3)
    first = d.ctx.registry.get("default", "gate").lastSeen
    clock.advance(FLUSH_EVERY)
    await d.ctx.store.write(lambda conn: None)  # one writer, FIFO: the flush is committed
    assert _stored_doc(d, "GATE")["lastSeen"] == first
    for _ in range(int(SEEN_REFRESH) - 10):  # polls for 50 s more: memory follows, the store does not
        clock.advance(1)
        await poll(d.url, 3)
    await d.ctx.store.write(lambda conn: None)
    status, body = await d.request("GET", "/api/v1/devices/gate")
    assert status == 200 and body["lastSeen"] != _stored_doc(d, "GATE")["lastSeen"]
    assert _stored_doc(d, "GATE")["lastSeen"] == first
    clock.advance(10)  # a minute after the stored one: the next flush writes it
    await poll(d.url, 3)
    clock.advance(FLUSH_EVERY)
    await d.ctx.store.write(lambda conn: None)
    latest = d.ctx.registry.get("default", "gate").lastSeen
    assert _stored_doc(d, "GATE")["lastSeen"] == latest != first
    clock.advance(1)
    await poll(d.url, 3)  # moved on a second: written at stop, not before
    await d.ctx.registry.stop()
    assert _stored_doc(d, "GATE")["lastSeen"] == d.ctx.registry.get("default", "gate").lastSeen > latest


@pytest_twisted.ensureDeferred
async def test_device_goes_offline_after_offline_after_without_a_poll(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=3)
    await poll(d.url, 3)
    assert (await d.request("GET", "/api/v1/devices/gate"))[1]["online"] is True
    clock.advance(d.ctx.config.push.offline_after)
    await settle(d)
    assert (await d.request("GET", "/api/v1/devices/gate"))[1]["online"] is False
    conn = dbutil.connect(d.ctx.config)
    try:
        conns = [json.loads(r[0]) for r in conn.execute("SELECT data FROM events WHERE kind = 'conn' ORDER BY id")]
    finally:
        conn.close()
    assert conns == [{"status": 1}, {"status": 2}]


@pytest_twisted.ensureDeferred
async def test_push_listen_serves_the_device_side_alone(tmp_path):
    from daemon_process import free_port

    port = free_port()
    d, _ = await start_clock_daemon(tmp_path, {"push": {"listen": f"tcp:{port}:interface=127.0.0.1"}})
    try:
        await d.put_device("gate", pushId=3)
        await queue(d, "gate", {"endpoint": "load_objects"})  # operator REST stays on [http] listen
        devices_url = f"http://127.0.0.1:{port}"
        status, body, _ = await poll(devices_url, 3)
        assert status == 200 and body == {"endpoint": "load_objects"}
        assert await post_result(devices_url, 3, {"response": "{}"}) == (200, b"")
        # The devices' endpoint has no REST API, and the main one has no /push.
        resp = await treq.get(devices_url + "/api/v1/devices", headers=d.headers())
        assert resp.code == 404 and json.loads(await resp.content())["error"]["code"] == "not_found"
        resp = await treq.get(d.url + "/push?deviceId=3")
        assert resp.code == 404
        await resp.content()
    finally:
        await stop_daemon(d)


@pytest_twisted.ensureDeferred
async def test_device_side_also_works_through_plain_klein_routing(clocked):
    """A site built without the fast path (Klein routing only) serves the same protocol."""
    from klein.resource import KleinResource
    from twisted.internet import reactor
    from twisted.web import server

    from iotd.web.app import make_app
    from iotd.web.push_device import device_routes

    d, _ = clocked
    routes = device_routes(push_service(d))
    port = reactor.listenTCP(0, server.Site(KleinResource(make_app(d.ctx, [routes]))),
                             interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        await d.put_device("gate", pushId=3)
        assert (await poll(url, 3))[:2] == (200, None)
        cmd = await queue(d, "gate", {"endpoint": "load_objects"})
        assert (await poll(url, 3))[1] == {"endpoint": "load_objects"}
        assert await post_result(url, 3, {"response": "{}"}) == (200, b"")
        assert (await command(d, cmd["id"]))["status"] == "done"
        resp = await treq.get(url + "/push?deviceId=x")
        assert resp.code == 400 and json.loads(await resp.content())["error"]["code"] == "invalid_device_id"
    finally:
        await port.stopListening()


@pytest.mark.parametrize("push_config", [{"push": {"enabled": "false"}}])
@pytest_twisted.ensureDeferred
async def test_push_disabled_serves_no_push(clocked):
    d, _ = clocked
    assert "push" not in d.top.namedServices
    resp = await treq.get(d.url + "/push?deviceId=3")
    assert resp.code == 404
    await resp.content()


def test_make_config_accepts_push_settings(tmp_path):
    cfg = make_config(tmp_path, {"push": {"command_timeout": "5", "max_attempts": "2"}})
    assert cfg.push.command_timeout == 5.0 and cfg.push.max_attempts == 2

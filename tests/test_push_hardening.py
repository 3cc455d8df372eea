"""Push against hostile pollers and firmware: bounded auto-registration, results that cannot poison.

The daemon is the real service tree on loopback (real HTTP, real SQLite); its time is a task.Clock
(see push_helpers.ClockReactor), so "per minute" is moved by hand.
"""

from __future__ import annotations

import json
import dbutil

import pytest
import pytest_twisted
from twisted.internet import defer

from prometheus_client import REGISTRY

from push_helpers import LogLines, clocked, poll, post_result, push_config, settle  # noqa: F401


def unknown_polls() -> float:
    return REGISTRY.get_sample_value("iotd_push_polls_total", {"outcome": "unknown"}) or 0.0


def refusal_lines(logs: LogLines) -> list[str]:
    return [line for line in logs.lines if line.startswith("auto-registration refused for ")]


def registered(d) -> list[str]:
    return sorted(dev.identifier for dev in d.ctx.registry.devices("default"))


# -- auto-registration: rate and cap --------------------------------------------------


@pytest.mark.parametrize("push_config", [{"push": {"auto_register_per_minute": "3"}}])
@pytest_twisted.ensureDeferred
async def test_auto_registration_is_limited_per_minute_and_refusals_are_logged_once_a_minute(clocked):
    d, clock = clocked
    before = unknown_polls()
    with LogLines() as logs:
        for device_id in range(1, 11):  # ten made-up deviceIds in the same second
            assert (await poll(d.url, device_id))[:2] == (200, None)
        assert registered(d) == ["1", "2", "3"]
        assert unknown_polls() == before + 7
        assert len(refusal_lines(logs)) == 1  # one line, not one per poll
        assert "auto_register_per_minute (3)" in refusal_lines(logs)[0]

        clock.advance(30)
        assert (await poll(d.url, 11))[:2] == (200, None)
        assert registered(d) == ["1", "2", "3"]  # still the same minute
        assert len(refusal_lines(logs)) == 1

        clock.advance(30)  # 60 s after the first three: the minute is not over yet
        assert (await poll(d.url, 11))[:2] == (200, None)
        assert registered(d) == ["1", "2", "3"]
        lines = refusal_lines(logs)
        assert len(lines) == 2  # a minute after the first line, the next one, with the count since
        assert lines[1].startswith("auto-registration refused for 8 poll(s) since the last such line")
        assert "deviceId 11" in lines[1]

        clock.advance(1)  # the first three left the window
        for device_id in (11, 12, 13, 14):
            assert (await poll(d.url, device_id))[:2] == (200, None)
    assert registered(d) == ["1", "11", "12", "13", "2", "3"]
    assert unknown_polls() == before + 10
    assert len(refusal_lines(logs)) == 2  # deviceId 14 was refused 1 s after the last line: no new one
    # A registered device is served as before.
    status, dev = await d.request("GET", "/api/v1/devices/12")
    assert status == 200 and dev["pushId"] == 12


@pytest.mark.parametrize("push_config", [{"push": {"max_devices": "3"}}])
@pytest_twisted.ensureDeferred
async def test_auto_registration_stops_at_max_devices_of_the_tenant(clocked):
    d, clock = clocked
    await d.put_device("gate", pushId=100)  # devices created over REST count too
    before = unknown_polls()
    with LogLines() as logs:
        for device_id in range(1, 6):
            assert (await poll(d.url, device_id))[:2] == (200, None)
    assert registered(d) == ["1", "2", "GATE"]
    assert d.ctx.registry.count("default") == 3
    assert unknown_polls() == before + 3
    lines = refusal_lines(logs)
    assert len(lines) == 1 and "[push] max_devices is 3" in lines[0]
    assert (await d.request("GET", "/api/v1/devices/4"))[0] == 404
    # The known devices are still served, and a freed slot is taken by the next poll.
    assert (await poll(d.url, 100))[:2] == (200, None)
    assert (await d.request("DELETE", "/api/v1/devices/2"))[0] == 204
    clock.advance(1)
    await poll(d.url, 4)
    assert registered(d) == ["1", "4", "GATE"]


@pytest.mark.parametrize("push_config", [{"push": {"max_devices": "5"}}])
@pytest_twisted.ensureDeferred
async def test_concurrent_first_polls_never_register_more_than_max_devices(clocked):
    d, _ = clocked
    answers = await defer.gatherResults([defer.ensureDeferred(poll(d.url, n)) for n in range(1000, 1040)])
    assert [a[:2] for a in answers] == [(200, None)] * 40
    assert d.ctx.registry.count("default") == 5


@pytest_twisted.ensureDeferred
async def test_a_flood_of_made_up_device_ids_registers_at_most_600_a_minute_by_default(clocked):
    d, _ = clocked
    assert d.ctx.config.push.auto_register_per_minute == 600
    before = unknown_polls()
    for start in range(0, 700, 50):
        answers = await defer.gatherResults(
            [defer.ensureDeferred(poll(d.url, n)) for n in range(start, start + 50)])
        assert all(a[:2] == (200, None) for a in answers)
    assert d.ctx.registry.count("default") == 600
    assert unknown_polls() == before + 100


# -- results whose response is not safe JSON -----------------------------------------


def strict_loads(text: str | bytes):
    """JSON as a strict client parses it: no NaN/Infinity, valid UTF-8 only."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text, parse_constant=refuse)


async def queue_and_send(d, device: str, push_id: int) -> int:
    status, cmd = await d.request("POST", f"/api/v1/devices/{device}/commands", {"endpoint": "load_objects"})
    assert status == 201, cmd
    assert (await poll(d.url, push_id))[1] == {"endpoint": "load_objects"}
    return cmd["id"]


async def command_raw(d, command_id: int) -> dict:
    """GET /api/v1/commands/{id}, parsed as a strict client would."""
    import treq

    resp = await treq.get(f"{d.url}/api/v1/commands/{command_id}", headers=d.headers())
    raw = await resp.content()
    assert resp.code == 200, raw
    return strict_loads(raw)


def resp_events(d, command_id: int) -> list[dict]:
    conn = dbutil.connect(d.ctx.config)
    try:
        rows = conn.execute("SELECT data FROM events WHERE kind = 'action'").fetchall()
    finally:
        conn.close()
    out = [strict_loads(r[0]) for r in rows]
    return [e for e in out if e.get("reqType") == "resp" and e.get("msgToken") == str(command_id)]


POISON = [
    # (what the firmware sends, status, response as shown, responseRaw, error)
    (rb'{"response": "{\"v\": NaN}"}', "done", '{"v": NaN}', '{"v": NaN}', None),
    (rb'{"response": "{\"v\": 1e400}"}', "done", '{"v": 1e400}', '{"v": 1e400}', None),
    (rb'{"response": "{\"v\": \"\\ud800\"}"}', "done", '{"v": "\\ud800"}', '{"v": "\\ud800"}', None),
    (rb'{"response": "caf\ud800e"}', "done", "caf\ufffde", "caf\ufffde", None),
    (rb'{"response": {"v": Infinity}}', "done", '{"v":Infinity}', '{"v":Infinity}', None),
    (rb'{"response": {"v": 1e400}}', "done", '{"v":Infinity}', '{"v":Infinity}', None),
    (rb'{"response": {"\udc00": 1}}', "done", '{"\ufffd":1}', '{"\ufffd":1}', None),
    (rb'{"error": "broken \udbff"}', "failed", None, None, "broken \ufffd"),
    (rb'{"error": {"code": NaN}}', "failed", None, None, '{"code":NaN}'),
]


@pytest.mark.parametrize("body, status, shown, raw, error", POISON)
@pytest_twisted.ensureDeferred
async def test_result_that_is_not_safe_json_cannot_poison_the_command_or_its_event(clocked, body, status,
                                                                                     shown, raw, error):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    await d.put_device("door", pushId=4)
    cid = await queue_and_send(d, "gate", 3)
    assert await post_result(d.url, 3, raw=body) == (200, b"")
    got = await command_raw(d, cid)
    assert (got["status"], got["response"], got.get("responseRaw"), got["error"]) == (status, shown, raw, error)
    await settle(d)
    [event] = resp_events(d, cid)
    assert event["code"] == (200 if status == "done" else 500)
    assert event["response"] == shown
    # Nothing else is harmed: the device list, and the next command of another device.
    assert (await d.request("GET", "/api/v1/devices"))[0] == 200
    other = await queue_and_send(d, "door", 4)
    assert await post_result(d.url, 4, {"response": '{"ok": true}'}) == (200, b"")
    assert (await command_raw(d, other))["response"] == {"ok": True}


@pytest_twisted.ensureDeferred
async def test_result_body_that_is_not_utf8_fails_the_command_readably(clocked):
    d, _ = clocked
    await d.put_device("gate", pushId=3)
    cid = await queue_and_send(d, "gate", 3)
    assert await post_result(d.url, 3, raw=b'{"response": "\xff\xfe"}') == (200, b"")
    got = await command_raw(d, cid)
    assert got["status"] == "failed" and got["error"].startswith("malformed result: not JSON")

"""MQTT devices through a real Mosquitto: what they publish reaches the sockets, commands reach them.

Each test runs its own Mosquitto on a free port (tests/mosquitto.py) and real
paho clients as devices; iotd is the in-process daemon tree pointed at that
broker.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import pytest_twisted

from mosquitto import Device, Mosquitto
from ws_helpers import Client, eventually, in_thread, sleep, until, ws_url

SUBSCRIBE = "/api/v1/system/common/websocket/connect"


@pytest.fixture
def broker(tmp_path):
    with Mosquitto(tmp_path) as b:
        yield b


@pytest.fixture
def daemon_config(broker):
    return {"mqtt": {"broker": broker.endpoint, "client_id": "iotd-test"},
            "push": {"command_timeout": "60"}}


async def connected(daemon) -> None:
    await eventually(lambda: daemon.top.getServiceNamed("mqtt").state == "ok", timeout=15)


async def device(broker, name: str, **kwargs) -> Device:
    return await in_thread(Device, broker.port, name, **kwargs)


@contextlib.asynccontextmanager
async def registered(daemon, broker, name: str, fields: dict | None = None, **kwargs):
    """The device registered (with ``fields``), iotd connected, and a paho client as that device."""
    await daemon.put_device(name, **(fields or {}))
    await connected(daemon)
    dev = await device(broker, name, **kwargs)
    try:
        yield dev
    finally:
        await in_thread(dev.close)


async def publish(dev: Device, topic: str, payload, qos: int = 1) -> None:
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    await in_thread(dev.publish, topic, data, qos)


async def history(daemon, identifier: str, part: str, **query) -> list[dict]:
    qs = "&".join(f"{k}={v}" for k, v in {"limit": 1000, **query}.items())
    status, body = await daemon.request("GET", f"/api/v1/devices/{identifier}/{part}?{qs}")
    assert status == 200, body
    return body["items"]


async def metric(daemon, outcome: str) -> float:
    import treq

    resp = await treq.get(daemon.url + "/metrics")
    text = (await resp.content()).decode()
    for line in text.splitlines():
        if line.startswith(f'iotd_mqtt_messages_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest_twisted.ensureDeferred
async def test_a_published_reading_reaches_the_readings_socket_and_the_subscription(daemon, broker):
    await daemon.put_device("sensor-1", productID="P1", deviceName="sensor-1")
    await connected(daemon)
    readings = await Client.open(ws_url(daemon, "/api/v1/devices/sensor-1/readings/socket", auth=daemon.admin_key))
    sub = await Client.open(ws_url(daemon, SUBSCRIBE, token=daemon.admin_key))
    dev = await device(broker, "sensor-1")
    try:
        assert (await sub.recv_json())["code"] == 200
        reply = await sub.request({"type": "up.sub", "body": {"code": "devicePropertyReport",
                                                              "params": {"productID": "P1",
                                                                         "deviceName": "sensor-1"}}})
        assert reply["code"] == 200
        await publish(dev, "iotd/default/sensor-1/readings", {"data": {"temperature": 21.5}})
        [event] = await readings.events(1)
        assert event["event"] == "reading_added"
        assert event["body"]["device_id"] == "SENSOR-1" and event["body"]["data"] == {"temperature": 21.5}
        frame = await sub.recv_json()
        assert frame["path"] == "devicePropertyReport"
        assert frame["body"]["identifier"] == "temperature" and frame["body"]["param"] == 21.5
        stored = await history(daemon, "sensor-1", "readings")
        assert [r["data"] for r in stored] == [{"temperature": 21.5}]
    finally:
        await readings.close()
        await sub.close()
        await in_thread(dev.close)


@pytest_twisted.ensureDeferred
async def test_raw_bytes_become_a_binary_packet_and_text_a_utf8_one(daemon, broker):
    async with registered(daemon, broker, "meter-7") as dev:
        await publish(dev, "iotd/default/meter-7/packets", b"\x00\xff\x10binary")
        await publish(dev, "iotd/default/meter-7/packets", "hello, 世界")
        await publish(dev, "iotd/default/meter-7/packets", {"payload": "abc", "meta": {"rssi": -70}})
        packets = await until(lambda: history(daemon, "meter-7", "packets"), lambda got: len(got) >= 3)
        packets.sort(key=lambda p: p["id"])
        assert [(p["payload_encoding"], p["payload"], p["interface_id"]) for p in packets] == [
            ("binary", "00ff1062696e617279", "mqtt"),
            ("utf8", "hello, 世界", "mqtt"),
            ("utf8", "abc", "mqtt"),
        ]
        assert packets[2]["meta"] == {"rssi": -70}


@pytest_twisted.ensureDeferred
async def test_malformed_messages_are_dropped_counted_and_the_next_good_one_is_stored(daemon, broker):
    await daemon.put_device("sensor-2")
    await connected(daemon)
    before = await metric(daemon, "malformed")
    dev = await device(broker, "sensor-2")
    readings = await Client.open(ws_url(daemon, "/api/v1/devices/sensor-2/readings/socket", auth=daemon.admin_key))
    try:
        await publish(dev, "iotd/default/sensor-2/readings", b"{not json")
        await publish(dev, "iotd/default/sensor-2/readings", {"no_data": 1})
        await publish(dev, "iotd/default/sensor-2/readings", {"data": {"ok": True}})
        [event] = await readings.events(1)
        assert event["body"]["data"] == {"ok": True}
        assert [r["data"] for r in await history(daemon, "sensor-2", "readings")] == [{"ok": True}]
        assert await metric(daemon, "malformed") == before + 2
        await readings.silent(0.2)
    finally:
        await readings.close()
        await in_thread(dev.close)


@pytest_twisted.ensureDeferred
async def test_500_qos1_messages_are_stored_once_each(daemon, broker):
    async with registered(daemon, broker, "burst") as dev:
        def send_all():
            infos = [dev.publish("iotd/default/burst/readings", json.dumps({"data": {"n": n}}), 1, wait=False)
                     for n in range(500)]
            for info in infos:
                info.wait_for_publish(30)
            return all(info.is_published() for info in infos)

        assert await in_thread(send_all)
        got = await until(lambda: history(daemon, "burst", "readings"), lambda got: len(got) >= 500)
        assert sorted(r["data"]["n"] for r in got) == list(range(500))


@pytest_twisted.ensureDeferred
async def test_a_device_id_in_the_payload_is_stored_once(daemon, broker):
    await daemon.put_device("dedupe")
    await connected(daemon)
    dev = await device(broker, "dedupe")
    readings = await Client.open(ws_url(daemon, "/api/v1/devices/dedupe/readings/socket", auth=daemon.admin_key))
    try:
        for _ in range(3):
            await publish(dev, "iotd/default/dedupe/readings", {"id": "r-1", "data": {"v": 1}})
        await publish(dev, "iotd/default/dedupe/readings", {"id": "r-2", "data": {"v": 2}})
        events = await readings.events(2)
        assert [e["body"]["data"] for e in events] == [{"v": 1}, {"v": 2}]
        await readings.silent(0.2)
    finally:
        await readings.close()
        await in_thread(dev.close)


@pytest_twisted.ensureDeferred
async def test_a_command_to_an_mqtt_device_arrives_on_its_topic_and_wait_returns_the_result(daemon, broker):
    await daemon.put_device("lock-3", transport="mqtt")
    await connected(daemon)
    dev = await device(broker, "lock-3", subscribe="iotd/default/LOCK-3/commands")

    def answer():
        [(topic, payload)] = dev.wait_received(1, 20)
        command = json.loads(payload)
        dev.publish("iotd/default/lock-3/commands/result",
                    json.dumps({"id": command["id"], "response": {"opened": True}}))
        return topic, command

    try:
        answered = in_thread(answer)
        status, cmd = await daemon.request("POST", "/api/v1/devices/lock-3/commands?wait=20",
                                           {"verb": "POST", "endpoint": "execute_actions",
                                            "body": {"actions": [{"action": "door"}]}})
        topic, sent = await answered
        assert topic == "iotd/default/LOCK-3/commands"
        assert sent == {"id": cmd["id"], "verb": "POST", "endpoint": "execute_actions",
                        "body": {"actions": [{"action": "door"}]}}
        assert status == 200, cmd
        assert cmd["status"] == "done" and cmd["response"] == {"opened": True} and cmd["attempts"] == 1
        events = await history(daemon, "lock-3", "events", order="asc")
        assert [e["kind"] for e in events] == ["action", "action"]  # sent, then finished: as with /push
    finally:
        await in_thread(dev.close)


@pytest_twisted.ensureDeferred
async def test_a_result_naming_another_command_does_not_finish_the_one_in_flight(daemon, broker):
    async with registered(daemon, broker, "lock-4", fields={"transport": "mqtt"},
                          subscribe="iotd/default/LOCK-4/commands") as dev:
        status, cmd = await daemon.request("POST", "/api/v1/devices/lock-4/commands", {"endpoint": "reboot"})
        assert status == 201
        await in_thread(dev.wait_received, 1, 20)
        await publish(dev, "iotd/default/lock-4/commands/result", {"id": cmd["id"] + 1000, "response": "x"})
        await publish(dev, "iotd/default/lock-4/commands/result", {"id": cmd["id"], "error": "busy"})

        async def now():
            return (await daemon.request("GET", f"/api/v1/commands/{cmd['id']}"))[1]

        now = await until(now, lambda c: c["status"] != "sent")
        assert now["status"] == "failed" and now["error"] == "busy"


@pytest_twisted.ensureDeferred
async def test_commands_queued_while_the_broker_is_down_go_out_once_it_is_back(daemon, broker):
    await daemon.put_device("lock-5", transport="mqtt")
    await connected(daemon)
    broker.stop()
    svc = daemon.top.getServiceNamed("mqtt")
    await eventually(lambda: svc.state != "ok", timeout=15)
    status, cmd = await daemon.request("POST", "/api/v1/devices/lock-5/commands", {"endpoint": "ping"})
    assert status == 201 and cmd["status"] == "queued"
    broker.start()
    dev = await device(broker, "lock-5", subscribe="iotd/default/LOCK-5/commands")
    try:
        await connected(daemon)
        [(_, payload)] = await in_thread(dev.wait_received, 1, 40)
        assert json.loads(payload) == {"id": cmd["id"], "endpoint": "ping"}
    finally:
        await in_thread(dev.close)


@pytest_twisted.ensureDeferred
async def test_status_and_the_will_become_conn_events(daemon, broker):
    await daemon.put_device("gw-9", productID="P9", deviceName="gw-9")
    await connected(daemon)
    sub = await Client.open(ws_url(daemon, SUBSCRIBE, token=daemon.admin_key))
    try:
        assert (await sub.recv_json())["code"] == 200
        reply = await sub.request({"type": "up.sub", "body": {"code": "deviceConn",
                                                              "params": {"productID": "P9", "deviceName": "gw-9"}}})
        assert reply["code"] == 200
        dev = await device(broker, "gw-9", will=("iotd/default/gw-9/status", b"offline"))
        await publish(dev, "iotd/default/gw-9/status", "online")
        online = await sub.recv_json()
        assert online["path"] == "deviceConn" and online["body"]["status"] == 1
        _, body = await daemon.request("GET", "/api/v1/devices/gw-9")
        assert body["online"] is True
        await publish(dev, "iotd/default/gw-9/status", "online")  # no change: no event
        await in_thread(dev.kill)  # gone without DISCONNECT: the broker publishes the will
        offline = await sub.recv_json(timeout=60)
        assert offline["path"] == "deviceConn" and offline["body"]["status"] == 2
        _, body = await daemon.request("GET", "/api/v1/devices/gw-9")
        assert body["online"] is False
    finally:
        await sub.close()


@pytest_twisted.ensureDeferred
async def test_unknown_devices_are_dropped_and_counted(daemon, broker):
    await connected(daemon)
    before = await metric(daemon, "unknown_device")
    dev = await device(broker, "stranger")
    try:
        await publish(dev, "iotd/default/stranger/readings", {"data": {"x": 1}})
        await publish(dev, "iotd/default/stranger/readings", {"data": {"x": 2}})
        counted = await until(lambda: metric(daemon, "unknown_device"), lambda n: n >= before + 2)
        assert counted == before + 2
        status, _ = await daemon.request("GET", "/api/v1/devices/stranger")
        assert status == 404
    finally:
        await in_thread(dev.close)


@pytest_twisted.ensureDeferred
async def test_healthz_reports_the_broker(daemon, broker):
    await connected(daemon)
    status, body = await daemon.request("GET", "/healthz")
    assert status == 200 and body["mqtt"] == "ok" and body["status"] == "ok"
    broker.stop()
    svc = daemon.top.getServiceNamed("mqtt")
    await eventually(lambda: svc.state != "ok", timeout=15)
    status, body = await daemon.request("GET", "/healthz")
    assert status == 200 and body["mqtt"] in ("down", "connecting") and body["status"] == "degraded"


@pytest.fixture
def quick_commands(daemon_config):
    daemon_config["push"] = {"command_timeout": "1", "max_attempts": "2"}
    return daemon_config


@pytest_twisted.ensureDeferred
async def test_an_unanswered_command_is_resent_after_command_timeout_then_fails(quick_commands, daemon, broker):
    async with registered(daemon, broker, "mute-1", fields={"transport": "mqtt"},
                          subscribe="iotd/default/MUTE-1/commands") as dev:
        status, cmd = await daemon.request("POST", "/api/v1/devices/mute-1/commands?wait=10", {"endpoint": "x"})
        assert status == 200 and cmd["status"] == "failed", cmd
        assert cmd["error"] == "no result after 2 attempts" and cmd["attempts"] == 2
        got = await in_thread(dev.wait_received, 2, 5)
        assert [json.loads(p)["id"] for _, p in got] == [cmd["id"], cmd["id"]]


@pytest_twisted.ensureDeferred
async def test_reading_stops_while_the_store_is_slow_and_nothing_is_lost(daemon, broker, monkeypatch):
    import threading

    from iotd.mqtt import ingest

    monkeypatch.setattr(ingest, "HIGH_COUNT", 10)
    await daemon.put_device("slow-1")
    await connected(daemon)
    svc = daemon.top.getServiceNamed("mqtt")
    dev = await device(broker, "slow-1")
    gate = threading.Event()
    blocked = daemon.ctx.store.write(lambda conn: gate.wait(30))  # the writer thread is busy
    try:
        infos = await in_thread(lambda: [dev.publish("iotd/default/slow-1/readings",
                                                     json.dumps({"data": {"n": n}}), 1, wait=False)
                                         for n in range(60)])
        await eventually(lambda: svc.connection._paused, timeout=10)
        await sleep(0.3)
        assert len(svc.ingest._waiting) <= 12  # bounded: the rest waits in the broker
        gate.set()
        await blocked
        await in_thread(lambda: [i.wait_for_publish(20) for i in infos])
        got = await until(lambda: history(daemon, "slow-1", "readings"), lambda got: len(got) >= 60)
        assert sorted(r["data"]["n"] for r in got) == list(range(60))
        assert not svc.connection._paused
    finally:
        gate.set()
        await in_thread(dev.close)


def test_with_several_nodes_the_filters_are_shared_subscriptions():
    from iotd.mqtt.topics import Topics

    assert Topics("iotd", shared=True).filters()[0] == "$share/iotd/iotd/+/+/packets"
    assert Topics("site/a").route("site/a/default/D1/commands/result") == ("default", "D1", "commands/result")
    assert Topics("site/a").route("site/a/default/D1/commands") is None  # iotd's own publish
    assert Topics("iotd").route("other/default/D1/readings") is None


@pytest.fixture
def auto_register(daemon_config):
    daemon_config["mqtt"]["auto_register"] = "true"
    return daemon_config


@pytest_twisted.ensureDeferred
async def test_auto_register_adds_an_unknown_device_as_an_mqtt_device(auto_register, daemon, broker):
    await connected(daemon)
    dev = await device(broker, "newcomer")
    try:
        await publish(dev, "iotd/default/newcomer/readings", {"data": {"first": True}})
        got = await until(lambda: daemon.request("GET", "/api/v1/devices/newcomer"), lambda r: r[0] == 200)
        assert got[0] == 200 and got[1]["transport"] == "mqtt"
        stored = await until(lambda: history(daemon, "newcomer", "readings"), bool)
        assert [r["data"] for r in stored] == [{"first": True}]
    finally:
        await in_thread(dev.close)


@pytest_twisted.ensureDeferred
async def test_a_device_id_is_remembered_for_a_day_then_pruned(daemon, broker):
    from iotd.timefmt import micros_of

    svc = daemon.top.getServiceNamed("mqtt")
    async with registered(daemon, broker, "aging") as dev:
        await publish(dev, "iotd/default/aging/readings", {"id": "p-1", "data": {"v": 1}})
        await until(lambda: history(daemon, "aging", "readings"), bool)
        two_days_ago = micros_of(daemon.ctx.reactor.seconds() - 2 * 86400)
        await daemon.ctx.store.write(lambda conn: conn.execute(
            "UPDATE mqtt_seen SET seen_us = ? WHERE key = ?", (two_days_ago, "i/default/AGING/p-1")).rowcount)
        await svc.prune()
        await publish(dev, "iotd/default/aging/readings", {"id": "p-1", "data": {"v": 2}})
        got = await until(lambda: history(daemon, "aging", "readings"), lambda got: len(got) >= 2)
        assert sorted(r["data"]["v"] for r in got) == [1, 2]


def test_reconnect_waits_back_off_from_1_s_doubling_to_30_s_with_jitter():
    from twisted.internet import reactor as real_reactor
    from twisted.internet.task import Clock

    from iotd.mqtt.broker import parse
    from iotd.mqtt.connection import Connection

    conn = Connection(real_reactor, parse("tcp:host=127.0.0.1:port=1"), "iotd-backoff", [], 1, 30,
                      lambda message, generation: None)
    clock = conn._reactor = Clock()
    conn._stopping = False
    waits = []
    for _ in range(8):
        conn._down("the broker is away")
        waits.append(conn._retry.getTime() - clock.seconds())
        conn._retry.cancel()
    for wait, full in zip(waits, [1, 2, 4, 8, 16, 30, 30, 30]):
        assert 0.75 * full <= wait <= full, waits
    assert conn.state == "down"

"""MQTT through the real ``twistd iotd``: kill -9 loses nothing, the broker restarting, the README's ACL.

A private Mosquitto per test (tests/mosquitto.py), real paho devices.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import pytest_twisted

from cluster_nodes import wait_for
from conftest import make_config, repo_root, start_daemon, stop_daemon
from daemon_process import DaemonProcess
from mosquitto import Device, Mosquitto
from push_helpers import LogLines
from ws_helpers import eventually, in_thread, until


def mqtt_ini(broker: Mosquitto, client_id: str = "iotd-k9") -> str:
    return f"[mqtt]\nbroker = {broker.endpoint}\nclient_id = {client_id}\n"


def stored_readings(d: DaemonProcess, identifier: str) -> list[int]:
    """Every reading's ``n`` of the device (all pages, duplicates kept)."""
    out: list[int] = []
    path = f"/api/v1/devices/{identifier}/readings?limit=1000"
    while True:
        status, body = d.request("GET", path, key=d.admin_key)
        assert status == 200, body
        out.extend(item["data"]["n"] for item in body["items"])
        if not body.get("next"):
            return out
        path = f"/api/v1/devices/{identifier}/readings?limit=1000&cursor={body['next']}"


def test_kill_9_while_a_device_publishes_1500_qos1_messages_loses_none(tmp_path):
    with Mosquitto(tmp_path) as broker:
        d = DaemonProcess(tmp_path, mqtt_ini(broker)).start()
        try:
            assert d.request("PUT", "/api/v1/devices/K9", {}, key=d.admin_key)[0] == 201
            wait_for(lambda: d.request("GET", "/healthz")[1].get("mqtt") == "ok", 20, "iotd connected")
            dev = Device(broker.port, "K9")
            infos = []

            def publish_all():
                for n in range(1500):
                    infos.append(dev.publish("iotd/default/K9/readings", json.dumps({"data": {"n": n}}), 1,
                                             wait=False))
                    if n % 50 == 49:
                        time.sleep(0.01)  # a device's pace, not a flood

            sender = threading.Thread(target=publish_all)
            sender.start()
            wait_for(lambda: len(stored_readings(d, "K9")) >= 200, 30, "some readings stored")
            d.stop(signal.SIGKILL)
            sender.join(60)
            for info in infos:
                info.wait_for_publish(30)
            assert all(info.is_published() for info in infos), "the broker took every message"
            d.start()
            wait_for(lambda: len(set(stored_readings(d, "K9"))) >= 1500, 90, "every reading stored")
            got = stored_readings(d, "K9")
            assert set(got) == set(range(1500))
            assert len(got) - 1500 <= 15, f"{len(got) - 1500} duplicates"
            dev.close()
        finally:
            d.stop()


def test_broker_away_makes_healthz_degraded_and_iotd_reconnects_and_ingests_again(tmp_path):
    broker = Mosquitto(tmp_path).start()
    d = DaemonProcess(tmp_path, mqtt_ini(broker, "iotd-away")).start()
    try:
        assert d.request("PUT", "/api/v1/devices/AWAY-1", {}, key=d.admin_key)[0] == 201
        wait_for(lambda: d.request("GET", "/healthz")[1].get("mqtt") == "ok", 20, "iotd connected")
        assert d.request("GET", "/healthz")[1]["status"] == "ok"
        broker.stop()
        status, body = wait_for(lambda: (lambda r: r if r[1].get("mqtt") != "ok" else None)(
            d.request("GET", "/healthz")), 20, "mqtt down")
        assert status == 200 and body["status"] == "degraded" and body["mqtt"] in ("down", "connecting")
        assert d.request("GET", "/api/v1/devices/AWAY-1", key=d.admin_key)[0] == 200  # the rest serves on
        time.sleep(3)  # away for a while: iotd's retries back off
        broker = Mosquitto(tmp_path, port=broker.port).start()
        started = time.monotonic()
        wait_for(lambda: d.request("GET", "/healthz")[1].get("mqtt") == "ok", 40, "iotd reconnected")
        assert time.monotonic() - started < 40
        dev = Device(broker.port, "AWAY-1")
        dev.publish("iotd/default/AWAY-1/readings", json.dumps({"data": {"n": 7}}))
        wait_for(lambda: stored_readings(d, "AWAY-1") == [7], 20, "the reading stored")
        dev.close()
        assert "mqtt: connected to" in d.log()
    finally:
        d.stop()
        broker.stop()


def _readme_acl() -> str:
    with open(os.path.join(repo_root(), "etc", "mqtt", "acl")) as f:
        return f.read()


def _readme_conf() -> str:
    with open(os.path.join(repo_root(), "etc", "mqtt", "mosquitto.conf")) as f:
        return f.read()


@pytest.fixture
def guarded(tmp_path):
    """The README's Mosquitto config: a password file and the ACL of etc/mqtt/acl."""
    users = {"iotd": "iotd-secret", "GATE-01": "gate-secret", "GATE-02": "other-secret"}
    with Mosquitto(tmp_path, users=users, acl=_readme_acl(), conf=_readme_conf()) as broker:
        yield broker


@pytest_twisted.ensureDeferred
async def test_the_readme_acl_lets_iotd_in_with_its_password_file_and_keeps_devices_to_their_topics(
        tmp_path, guarded):
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("iotd-secret\n")
    os.chmod(password_file, 0o600)
    daemon = await start_daemon(make_config(tmp_path, {"mqtt": {
        "broker": guarded.endpoint, "username": "iotd", "password_file": str(password_file),
        "client_id": "iotd-acl"}}))
    try:
        await daemon.put_device("GATE-01", transport="mqtt")
        await daemon.put_device("GATE-02")
        await eventually(lambda: daemon.top.getServiceNamed("mqtt").state == "ok", timeout=15)
        gate = await in_thread(Device, guarded.port, "gate-01-client", username="GATE-01", password="gate-secret",
                               subscribe="iotd/default/GATE-01/commands")
        await in_thread(gate.publish, "iotd/default/GATE-01/readings", json.dumps({"data": {"own": 1}}))
        # the ACL refuses this one (the broker acknowledges and drops it, as MQTT 3.1.1 does)
        await in_thread(gate.publish, "iotd/default/GATE-02/readings", json.dumps({"data": {"spoof": 1}}))
        await in_thread(gate.publish, "iotd/default/GATE-01/readings", json.dumps({"data": {"own": 2}}))

        async def readings(identifier):
            _, body = await daemon.request("GET", f"/api/v1/devices/{identifier}/readings?limit=10")
            return sorted(r["data"].get("own", -1) for r in body["items"])

        assert await until(lambda: readings("GATE-01"), lambda got: got == [1, 2]) == [1, 2]
        assert await readings("GATE-02") == []
        status, cmd = await daemon.request("POST", "/api/v1/devices/GATE-01/commands", {"endpoint": "open"})
        assert status == 201
        [(topic, payload)] = await in_thread(gate.wait_received, 1, 20)  # iotd may write commands
        assert topic == "iotd/default/GATE-01/commands" and json.loads(payload)["id"] == cmd["id"]
        await in_thread(gate.close)
    finally:
        await stop_daemon(daemon)


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_keeps_iotd_down_and_says_so(tmp_path, guarded):
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("not-it\n")
    os.chmod(password_file, 0o600)
    with LogLines() as log:
        daemon = await start_daemon(make_config(tmp_path, {"mqtt": {
            "broker": guarded.endpoint, "username": "iotd", "password_file": str(password_file)}}))
        try:
            await eventually(lambda: any("mqtt: the broker refused the connection: Not authorized" in line
                                         for line in log.lines), timeout=15)
            status, body = await daemon.request("GET", "/healthz")
            assert status == 200 and body["mqtt"] != "ok" and body["status"] == "degraded"
            assert not any("not-it" in line for line in log.lines)  # the password is never logged
        finally:
            await stop_daemon(daemon)


@pytest_twisted.ensureDeferred
async def test_the_readme_device_example_reports_and_answers_a_command(tmp_path, broker_for_example):
    import subprocess
    import sys

    daemon = await start_daemon(make_config(tmp_path, {"mqtt": {"broker": broker_for_example.endpoint,
                                                                "client_id": "iotd-example"}}))
    example = None
    try:
        # The device is known and iotd subscribed before the example publishes its first reading
        # (a reading for an unknown device, or before iotd subscribed, is not kept).
        await daemon.put_device("GATE-01", transport="mqtt")
        await eventually(lambda: daemon.top.getServiceNamed("mqtt").state == "ok", timeout=15)
        example = subprocess.Popen([sys.executable, os.path.join(repo_root(), "examples", "mqtt_device.py"),
                                    "--port", str(broker_for_example.port), "--device", "GATE-01"])
        await eventually(lambda: daemon.ctx.registry.get("default", "GATE-01").online, timeout=20)
        status, cmd = await daemon.request("POST", "/api/v1/devices/GATE-01/commands?wait=20",
                                           {"endpoint": "open_door"})
        assert status == 200 and cmd["response"] == {"endpoint": "open_door", "done": True}, cmd
        _, body = await daemon.request("GET", "/api/v1/devices/GATE-01/readings?limit=5")
        assert body["items"] and body["items"][0]["data"] == {"temperature": 21.5, "door": "closed"}
        example.kill()  # gone without a DISCONNECT: its will says offline
        await eventually(lambda: not daemon.ctx.registry.get("default", "GATE-01").online, timeout=60)
    finally:
        if example is not None:
            example.kill()
            example.wait()
        await stop_daemon(daemon)


@pytest.fixture
def broker_for_example(tmp_path):
    with Mosquitto(tmp_path) as broker:
        yield broker


def test_the_readme_shows_the_tested_files_as_they_are():
    with open(os.path.join(repo_root(), "README.md")) as f:
        readme = f.read()
    for path in ("etc/mqtt/acl", "etc/mqtt/mosquitto.conf", "etc/mqtt/iotd-mqtt.ini", "examples/mqtt_device.py"):
        with open(os.path.join(repo_root(), path)) as f:
            assert f.read().strip() in readme, f"README's copy of {path} differs"

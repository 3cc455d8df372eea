"""Push across two real ``twistd iotd`` nodes on one PostgreSQL and one Redis.

A command queued on one node is handed out by the other's idle poll at once
(a bus message, not the one-second refresh); one command in flight per device
cluster-wide; ``?wait=`` on one node answers when the result reaches the
other; one ``conn`` event per transition; one leader.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.request

import psycopg
import pytest

from cluster_nodes import Nodes, wait_for

pytestmark = pytest.mark.postgresql_only


def poll(node, device_id: int) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"{node.url}/push?deviceId={device_id}", timeout=10) as resp:
        return resp.status, resp.read()


def post_result(node, device_id: int, body: dict) -> int:
    req = urllib.request.Request(f"{node.url}/result?deviceId={device_id}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def leader_of(node) -> float | None:
    status, text = node.request_text("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith("iotd_leader "):
            return float(line.split()[1])
    return None


def test_a_command_queued_on_a_is_handed_out_by_b_at_once_and_only_once(tmp_path):
    with Nodes(tmp_path) as nodes:
        key = nodes.admin_key
        a, b = nodes["a"], nodes["b"]
        waits = []
        for n in range(5):
            assert a.request("PUT", f"/api/v1/devices/door{n}", {"pushId": 100 + n}, key=key)[0] == 201
            assert poll(b, 100 + n) == (200, b"")  # idle: b knows of no work
        for n in range(5):
            status, cmd = a.request("POST", f"/api/v1/devices/door{n}/commands", {"endpoint": "open"}, key=key)
            assert status == 201
            queued = time.monotonic()
            body = wait_for(lambda n=n: poll(b, 100 + n)[1], 1.0, "b hands out a's command")
            waits.append(time.monotonic() - queued)
            assert json.loads(body)["endpoint"] == "open"
        # Every one well inside the second b's refresh would take: the bus told b.
        assert max(waits) < 0.25, waits

        # 30 concurrent polls split across both nodes while door0's command is in flight: nothing.
        with concurrent.futures.ThreadPoolExecutor(max_workers=30) as pool:
            answers = list(pool.map(lambda i: poll((a, b)[i % 2], 100), range(30)))
        assert answers == [(200, b"")] * 30

        # ?wait= on b answers when the result is posted to a.
        assert post_result(a, 100, {"response": '{"ok": 1}'}) == 200  # door0's "open" is done
        status, waited = [None], [None]

        def queue_and_wait():
            status[0], waited[0] = b.request("POST", "/api/v1/devices/door1/commands?wait=20",
                                             {"endpoint": "ping"}, key=key)

        assert post_result(a, 101, {"response": '{"ok": 1}'}) == 200  # door1's "open" is done
        t = threading.Thread(target=queue_and_wait)
        t.start()
        body = wait_for(lambda: poll(a, 101)[1], 2.0, "a hands out b's waited command")
        assert json.loads(body)["endpoint"] == "ping"
        time.sleep(0.2)
        assert t.is_alive()  # still waiting on b
        posted = time.monotonic()
        assert post_result(a, 101, {"response": '{"pong": true}'}) == 200
        t.join(10)
        assert status[0] == 200 and waited[0]["status"] == "done" and waited[0]["response"] == {"pong": True}
        assert time.monotonic() - posted < 1.0


def test_one_conn_event_per_transition_for_a_device_polling_both_nodes(tmp_path):
    with Nodes(tmp_path, extra="[push]\noffline_after = 3\n") as nodes:
        key = nodes.admin_key
        a, b = nodes["a"], nodes["b"]
        assert a.request("PUT", "/api/v1/devices/roam", {"pushId": 55}, key=key)[0] == 201
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:  # both nodes at the same instant
            list(pool.map(lambda i: poll((a, b)[i % 2], 55), range(8)))
        for i in range(12):  # then alternately, for longer than offline_after
            poll((a, b)[i % 2], 55)
            time.sleep(0.3)
        for node in (a, b):
            wait_for(lambda node=node: node.request("GET", "/api/v1/devices/ROAM", key=key)[1]["online"], 2.0,
                     "online on both nodes")

        def conn_events() -> list[int]:
            with psycopg.connect(nodes.store_url) as conn:
                return [json.loads(r[0])["status"] for r in conn.execute(
                    "SELECT data FROM events WHERE kind = 'conn' AND device = 'ROAM' ORDER BY id")]

        assert conn_events() == [1]  # one online, though both nodes saw its first polls
        wait_for(lambda: conn_events() == [1, 2], 3 + 5, "one offline event after it stops polling")
        for node in (a, b):
            wait_for(lambda node=node: node.request("GET", "/api/v1/devices/ROAM", key=key)[1]["online"] is False,
                     2.0, "offline on both nodes")
        time.sleep(1.5)
        assert conn_events() == [1, 2]


def test_one_leader_and_leadership_moves_when_it_dies(tmp_path):
    with Nodes(tmp_path) as nodes:
        wait_for(lambda: leader_of(nodes["a"]) == 1.0, 5, "a (started first) leads")
        assert leader_of(nodes["b"]) == 0.0
        nodes.kill("a")
        killed = time.monotonic()
        wait_for(lambda: leader_of(nodes["b"]) == 1.0, 10, "b takes over")
        assert time.monotonic() - killed < 10

"""Two real ``twistd iotd`` nodes on one PostgreSQL and one Redis: events, keys, registry, health.

Each test has its own database (tests/dbutil.py) and Redis database number;
the Redis restart test runs a redis-server of its own.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import pytest

from cluster_nodes import Nodes, PrivateRedis, Socket, wait_for
from daemon_process import ROOT, TWISTD, DaemonProcess

pytestmark = pytest.mark.postgresql_only

EPOCH = "1970-01-01T00:00:00Z"


def ingest(node: DaemonProcess, key: str, device: str, count: int, tag: str) -> list[dict]:
    """``count`` packets one after the other; the acknowledged bodies."""
    acked = []
    for n in range(count):
        status, body = node.request("POST", f"/api/v1/devices/{device}/packets",
                                    {"payload": {"w": tag, "n": n}}, key=key)
        assert status == 201, body
        acked.append(body)
    return acked


def ingest_concurrently(nodes: Nodes, key: str, per_writer: int, writers_per_node: int = 4) -> list[dict]:
    jobs = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=writers_per_node * 2) as pool:
        for name in ("a", "b"):
            for w in range(writers_per_node):
                jobs.append(pool.submit(ingest, nodes[name], key, f"dev-{name}{w}", per_writer, f"{name}{w}"))
        return [body for job in jobs for body in job.result()]


def test_packets_ingested_on_both_nodes_reach_sockets_on_both_in_one_order_without_holes(tmp_path):
    with Nodes(tmp_path) as nodes:
        key = nodes.admin_key
        for name in ("a", "b"):
            for w in range(4):
                assert nodes[name].request("PUT", f"/api/v1/devices/dev-{name}{w}", {}, key=key)[0] == 201
        sockets = {name: Socket(nodes[name], "/api/v1/packets/socket", key) for name in ("a", "b")}
        try:
            # Both sockets are live (they get only live events: no `after`) once a probe reached them.
            status, probe = nodes["a"].request("POST", "/api/v1/devices/dev-a0/packets", {"payload": "probe"},
                                               key=key)
            assert status == 201
            for s in sockets.values():
                wait_for(lambda s=s: any(b["id"] == probe["id"] for b in s.bodies()), 20, "the probe on a socket")
            acked = ingest_concurrently(nodes, key, per_writer=75)  # 300 on each node, 4 writers each
            assert len(acked) == 600
            after_probe = {name: (lambda s=s: [b for b in s.bodies() if b["id"] > probe["id"]])
                           for name, s in sockets.items()}
            for name in sockets:
                wait_for(lambda name=name: len(after_probe[name]()) >= 600, 20, "600 events on a socket")
            time.sleep(0.3)  # nothing more (no duplicate) arrives
            got = {name: after_probe[name]() for name in sockets}
        finally:
            for s in sockets.values():
                s.close()
        ids_a = [b["id"] for b in got["a"]]
        ids_b = [b["id"] for b in got["b"]]
        assert len(ids_a) == 600 and ids_a == ids_b  # all of them, once, in the same order
        assert ids_a == list(range(ids_a[0], ids_a[0] + 600))  # strictly increasing, no holes
        assert sorted(b["id"] for b in acked) == ids_a  # exactly the acknowledged ones
        assert {b["id"]: b for b in acked} == {b["id"]: b for b in got["a"]}  # the same bodies
        # A replay from the middle on either node returns exactly the rest.
        middle = got["a"][299]
        for name in ("a", "b"):
            replay = Socket(nodes[name], "/api/v1/packets/socket", key, after=middle["inserted_at"])
            try:
                wait_for(lambda: len(replay.bodies()) >= 300, 15, "the replay")
                time.sleep(0.3)
                assert [b["id"] for b in replay.bodies()] == ids_a[300:]
            finally:
                replay.close()


def test_redis_restarted_while_events_flow_no_socket_misses_or_repeats_one(tmp_path):
    with PrivateRedis(tmp_path) as redis, Nodes(tmp_path, redis_url=redis.url) as nodes:
        key = nodes.admin_key
        for name in ("a", "b"):
            assert nodes[name].request("PUT", f"/api/v1/devices/r-{name}", {}, key=key)[0] == 201
        sockets = {name: Socket(nodes[name], "/api/v1/packets/socket", key) for name in ("a", "b")}
        acked: list[dict] = []
        try:
            time.sleep(0.3)
            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                flows = [pool.submit(ingest, nodes[n], key, f"r-{n}", 150, n) for n in ("a", "b")]
                time.sleep(0.5)
                redis.stop()
                time.sleep(0.5)
                degraded = nodes["a"].request("GET", "/healthz")
                redis.start()
                for flow in flows:
                    acked.extend(flow.result())
            assert degraded[0] == 200 and degraded[1]["status"] == "degraded" and degraded[1]["bus"] != "ok"
            nodes.wait_all_up(timeout=15)
            for s in sockets.values():
                wait_for(lambda s=s: len(s.bodies()) >= 300, 20, "300 events on a socket")
            time.sleep(1.5)  # a tail check would bring a repeat, if there were one
            got = {name: [b["id"] for b in s.bodies()] for name, s in sockets.items()}
        finally:
            for s in sockets.values():
                s.close()
        expected = sorted(b["id"] for b in acked)
        assert got["a"] == expected and got["b"] == expected


def test_a_key_made_on_a_works_on_b_at_once_and_revoked_on_a_closes_its_socket_on_b(tmp_path):
    with Nodes(tmp_path) as nodes:
        admin = nodes.admin_key
        assert nodes["a"].request("PUT", "/api/v1/devices/k1", {}, key=admin)[0] == 201
        status, made = nodes["a"].request("POST", "/api/v1/api-keys", {"name": "ro", "role": "read_only"},
                                          key=admin)
        assert status == 201
        made_at = time.monotonic()
        wait_for(lambda: nodes["b"].request("GET", "/api/v1/devices/K1", key=made["key"])[0] == 200,
                 1.0, "the new key works on b")
        assert time.monotonic() - made_at < 1.0
        sock = Socket(nodes["b"], "/api/v1/devices/k1/packets/socket", made["key"])
        try:
            time.sleep(0.2)
            assert nodes["a"].request("DELETE", f"/api/v1/api-keys/{made['id']}", key=admin)[0] == 204
            revoked_at = time.monotonic()
            wait_for(lambda: sock.closed is not None, 1.5, "b closes the revoked key's socket")
            assert sock.closed == 4401 and time.monotonic() - revoked_at < 1.5
            assert nodes["b"].request("GET", "/api/v1/devices/K1", key=made["key"])[0] == 401
        finally:
            sock.close()


def test_registry_changes_on_one_node_apply_on_the_other(tmp_path):
    with Nodes(tmp_path) as nodes:
        key = nodes.admin_key
        assert nodes["a"].request("PUT", "/api/v1/devices/g1", {"tags": ["north"]}, key=key)[0] == 201
        wait_for(lambda: nodes["b"].request("GET", "/api/v1/devices/G1", key=key)[0] == 200, 1.0, "b knows g1")
        assert nodes["b"].request("PUT", "/api/v1/devices/g1", {"tags": ["south"]}, key=key)[0] == 200
        wait_for(lambda: nodes["a"].request("GET", "/api/v1/devices/G1", key=key)[1]["tags"] == ["south"],
                 1.0, "a sees b's change")
        # A tag socket on a follows the change (membership is checked per event).
        assert nodes["a"].request("PUT", "/api/v1/streams/s1", {"devices": ["g1"]}, key=key)[0] in (200, 201)
        wait_for(lambda: nodes["b"].request("GET", "/api/v1/streams/s1", key=key)[0] == 200, 1.0, "b knows s1")
        assert nodes["b"].request("DELETE", "/api/v1/devices/g1", key=key)[0] == 204
        wait_for(lambda: nodes["a"].request("GET", "/api/v1/devices/G1", key=key)[0] == 404, 1.0,
                 "a forgets the deleted device")


def test_healthz_names_the_node_the_store_and_the_bus(tmp_path):
    with Nodes(tmp_path) as nodes:
        for name in ("a", "b"):
            status, body = nodes[name].request("GET", "/healthz")
            assert status == 200
            assert body == {"status": "ok", "version": body["version"], "node": name, "store": "ok", "bus": "ok"}
        status, text = nodes["a"].request_text("GET", "/metrics")
        assert "iotd_bus_up 1.0" in text and "iotd_leader" in text


def test_a_node_without_a_bus_refuses_to_share_the_store_with_a_live_node(tmp_path):
    with Nodes(tmp_path, names=("a",)) as nodes:
        lone = tmp_path / "lone"
        lone.mkdir()
        d = DaemonProcess(lone, f"[store]\nurl = {nodes.store_url}\n[cluster]\nnode = lone\n")
        out = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "iotd", "-c", d.ini], cwd=str(lone),
                             env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        lines = (out.stdout + out.stderr).strip().splitlines()
        assert lines == ["iotd: config error: [cluster] bus: another node (a) uses this store; set a bus"]
        assert sys.executable  # (the same interpreter ran both)


def test_a_registry_change_whose_message_was_lost_arrives_by_the_revision_check(tmp_path):
    import json

    import psycopg

    with Nodes(tmp_path) as nodes:
        key = nodes.admin_key
        assert nodes["a"].request("PUT", "/api/v1/devices/lost1", {"tags": ["old"]}, key=key)[0] == 201
        wait_for(lambda: nodes["b"].request("GET", "/api/v1/devices/LOST1", key=key)[0] == 200, 1.0, "b has it")
        # Another node's write whose bus message never came: the row and the revision only.
        with psycopg.connect(nodes.store_url, autocommit=True) as conn:
            doc = json.loads(conn.execute("SELECT doc FROM devices WHERE identifier = 'LOST1'").fetchone()[0])
            doc["tags"] = ["new"]
            with conn.transaction():
                conn.execute("UPDATE devices SET doc = %s WHERE identifier = 'LOST1'", (json.dumps(doc),))
                conn.execute("UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) "
                             "WHERE name = 'registry_revision'")
        for name in ("a", "b"):
            wait_for(lambda name=name: nodes[name].request("GET", "/api/v1/devices/LOST1", key=key)[1]["tags"]
                     == ["new"], 3.5, f"{name} reloads after two revision checks")

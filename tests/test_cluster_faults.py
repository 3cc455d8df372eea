"""Faults across two real ``twistd iotd`` nodes: one node killed with SIGKILL during ingest.

(Redis restarted: tests/test_cluster_events.py; PostgreSQL stopped: tests/test_pg_outage.py.)
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from cluster_nodes import Nodes, Socket, wait_for

pytestmark = pytest.mark.postgresql_only

EPOCH = "1970-01-01T00:00:00Z"
TIMEOUT = 2.0


def writer(node, key: str, device: str, acked: list, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        try:
            status, body = node.request("POST", f"/api/v1/devices/{device}/readings", {"data": {"n": n}}, key=key)
        except OSError:
            return  # the node is gone
        if status == 201:
            acked.append(body)
        n += 1


def stored_ids(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM events WHERE kind = 'reading' ORDER BY id")]


def test_kill_9_of_one_node_during_ingest_on_both_loses_nothing_acknowledged_and_the_other_takes_over(tmp_path):
    extra = f"[push]\ncommand_timeout = {TIMEOUT}\nmax_attempts = 1\n"
    with Nodes(tmp_path, extra=extra) as nodes:
        key = nodes.admin_key
        a, b = nodes["a"], nodes["b"]
        for name in ("a", "b"):
            assert nodes[name].request("PUT", f"/api/v1/devices/k-{name}", {}, key=key)[0] == 201
        # A command handed out by a and never answered.
        assert a.request("PUT", "/api/v1/devices/door", {"pushId": 777}, key=key)[0] == 201
        status, cmd = a.request("POST", "/api/v1/devices/door/commands", {"endpoint": "open"}, key=key)
        assert status == 201
        status, _ = a.request("GET", "/push?deviceId=777")
        assert status == 200
        assert a.request("GET", f"/api/v1/commands/{cmd['id']}", key=key)[1]["status"] == "sent"

        sock = Socket(b, "/api/v1/readings/socket", key)
        # live (no `after`) once a probe reading reached it: the probe is stored like the others
        status, probe = b.request("POST", "/api/v1/devices/k-b/readings", {"data": {"probe": 1}}, key=key)
        assert status == 201
        wait_for(lambda: any(e["id"] == probe["id"] for e in sock.bodies()), 20, "the probe on b's socket")
        acked: dict[str, list] = {"a": [], "b": []}
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(nodes[n], key, f"k-{n}", acked[n], stop), daemon=True)
                   for n in ("a", "b") for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acked["a"]) > 50 and len(acked["b"]) > 50, 20, "both nodes ingesting")
        nodes.kill("a")
        killed_at = time.monotonic()
        # b answers at once.
        status, _ = b.request("GET", "/api/v1/devices/K-B", key=key)
        assert status == 200 and time.monotonic() - killed_at < 1.0
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(15)
        try:
            # Every reading acknowledged by either node is stored and replayable from b.
            everything = stored_ids(nodes.store_url)
            acked_ids = sorted(body["id"] for bodies in acked.values() for body in bodies)
            assert set(acked_ids) <= set(everything)
            replay = Socket(b, "/api/v1/readings/socket", key, after=EPOCH)
            try:
                wait_for(lambda: len(replay.bodies()) >= len(everything), 20, "the replay on b")
                assert [e["id"] for e in replay.bodies()] == everything
            finally:
                replay.close()
            # b's live socket got every stored reading exactly once, in order.
            wait_for(lambda: len(sock.bodies()) >= len(everything), 10, "b's live socket")
            time.sleep(0.3)
            assert [e["id"] for e in sock.bodies()] == everything
        finally:
            sock.close()
        # The command a handed out and never saw answered fails on b's sweep (leadership moved).
        deadline = killed_at + 10 + TIMEOUT
        final = wait_for(lambda: (lambda c: c if c["status"] != "sent" else None)(
            b.request("GET", f"/api/v1/commands/{cmd['id']}", key=key)[1]), deadline - time.monotonic() + 0.5,
            "b fails the unanswered command")
        assert final["status"] == "failed"

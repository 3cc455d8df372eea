"""PostgreSQL stopped for 10 s under a real ``twistd iotd`` that is ingesting: 503 JSON meanwhile,
recovery without a restart, nothing acknowledged lost, a queued push command still handed out.

The server is a private one (:mod:`pgserver`): stopping it disturbs no other test.  Readings are
posted over real HTTP from a thread, one after another, for the whole run; every 201 is an
acknowledgement whose event id must be in the database at the end.  What happens while the server
is down is checked from answers that were both sent and received while it was down, so the
assertion does not depend on how a request racing the stop or the start came out.

The same run with two nodes (``a``, ``b``: one private server, a Redis bus) adds a live socket on
each node that must end with every stored reading once, in id order.  A store-level test covers a
server that accepts connections but never answers (a hung host), which refusal alone does not.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.error

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from cluster_nodes import Nodes, Socket
from daemon_process import DaemonProcess
from iotd.store import Store, StoreUnavailable
from pgserver import wait_until
from ws_helpers import sleep

pytestmark = pytest.mark.postgresql_only

OUTAGE = 10.0  # seconds the server stays stopped
RECOVERY = 30.0  # seconds the daemon may take to answer /healthz 200 again
PUSH_ID = 4242


class Ingester(threading.Thread):
    """POST one reading after another to ``daemon`` until stopped; every answer is kept.

    Each answer is ``(n, sent_at, received_at, status, body)`` (times from ``time.monotonic``);
    a request that raised (a timeout, a reset) is kept with status ``None`` and the error.
    """

    def __init__(self, daemon: DaemonProcess, device: str, key: str):
        super().__init__(name="ingest", daemon=True)
        self.d = daemon
        self.key = key
        self.device = device
        self.answers: list[tuple] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            sent = time.monotonic()
            try:
                status, body = self.d.request("POST", f"/api/v1/devices/{self.device}/readings",
                                              {"data": {"n": n}}, key=self.key)
            except (OSError, ValueError, urllib.error.URLError) as e:  # a hang ends as a timeout here
                status, body = None, repr(e)
            self.answers.append((n, sent, time.monotonic(), status, body))
            self.halt.wait(0.02)

    def acked(self) -> dict[int, int]:
        """``{n: event id}`` of every reading answered 201."""
        return {a[0]: a[4]["id"] for a in self.answers if a[3] == 201}

    def count(self, status: int | None, since: float = 0.0) -> int:
        return sum(1 for a in self.answers if a[3] == status and a[1] >= since)


def unavailable(status: int, body) -> bool:
    """A 503 in the API's error shape."""
    return (status == 503 and isinstance(body, dict) and isinstance(body.get("error"), dict)
            and body["error"].get("code") == "unavailable" and isinstance(body["error"].get("message"), str))


def stored_readings(url: str, device: str) -> dict[int, int]:
    """``{event id: n}`` of every reading of ``device`` in the database at ``url``."""
    import json

    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, data FROM events WHERE kind = 'reading' AND device = %s",
                            (device,)).fetchall()
    return {row[0]: json.loads(row[1])["data"]["n"] for row in rows}


def ride_out_outage(pg_server, url: str, nodes: list[DaemonProcess], key: str) -> None:
    """Device ``D1`` (push id :data:`PUSH_ID`) with a command queued on the last node; one ingest loop
    per node; the server stopped for :data:`OUTAGE` s and started again; then every check of the
    module docstring on every node."""
    first, last = nodes[0], nodes[-1]
    assert first.request("PUT", "/api/v1/devices/d1", {"pushId": PUSH_ID}, key=key)[0] == 201
    for d in nodes:  # a registry change reaches the other nodes within 1 s
        wait_until(lambda: d.request("GET", "/api/v1/devices/D1", key=key)[0] == 200, 10, what="D1 known")
    status, queued = last.request("POST", "/api/v1/devices/D1/commands", {"endpoint": "before_outage.fcgi"},
                                  key=key)
    assert status == 201, queued
    pids = [d.proc.pid for d in nodes]
    loops = [Ingester(d, "D1", key) for d in nodes]
    for loop in loops:
        loop.start()
    try:
        for loop in loops:
            wait_until(lambda: len(loop.acked()) >= 10, 30, what="readings acknowledged before the outage")

        pg_server.stop()
        down = time.monotonic()
        for loop in loops:
            wait_until(lambda: loop.count(503, since=down) >= 5, 15, what="ingest answered 503 while down")
        for d in nodes:  # what needs the store while it is down: the health, a read, a write, a hand-out
            status, body = d.request("GET", "/healthz")
            assert status == 503 and body["store"] == "unreachable" and body["status"] == "unavailable", body
            status, body = d.request("GET", f"/api/v1/commands/{queued['id']}", key=key)
            assert unavailable(status, body), (status, body)
            status, body = d.request("POST", "/api/v1/devices/D1/commands", {"endpoint": "x.fcgi"}, key=key)
            assert unavailable(status, body), (status, body)
        # the node the command was queued on knows it has work: the hand-out needs the store
        # (another node may still answer the idle poll from memory: it learns of the command within
        # a second through the store, the backstop, which was gone)
        status, body = last.request("GET", f"/push?deviceId={PUSH_ID}")
        assert unavailable(status, body), (status, body)
        time.sleep(max(0.0, down + OUTAGE - time.monotonic()))
        up = time.monotonic()

        pg_server.start()
        for d in nodes:
            wait_until(lambda: d.request("GET", "/healthz")[0] == 200, RECOVERY, what="/healthz 200 after")
        assert [d.proc.poll() for d in nodes] == [None] * len(nodes)
        assert [d.proc.pid for d in nodes] == pids  # the same processes: no restart
        for d in nodes:
            status, body = d.request("POST", "/api/v1/devices/D1/readings", {"data": {"n": 0}}, key=key)
            assert status == 201, body
        back = time.monotonic()
        for loop in loops:
            wait_until(lambda: loop.count(201, since=back) >= 5, 30, what="the ingest loop acknowledged again")
    finally:
        for loop in loops:
            loop.halt.set()
        for loop in loops:
            loop.join(30)
    assert not any(loop.is_alive() for loop in loops)

    stored = stored_readings(url, "D1")
    for loop in loops:
        # while the server was down: only 503s in the error shape, and there were many
        during = [a for a in loop.answers if a[1] >= down and a[2] <= up]
        assert len(during) >= 20, during
        assert all(unavailable(a[3], a[4]) for a in during), [a for a in during if not unavailable(a[3], a[4])]
        # around the stop and the start: a 201 or a 503 JSON, never a 500, a hang or a reset
        assert [a for a in loop.answers if a[3] != 201 and not unavailable(a[3], a[4])] == []
        # every acknowledged reading is stored, under the id its answer gave
        acked = loop.acked()
        assert len(acked) >= 15
        assert {event_id: n for n, event_id in acked.items()}.items() <= stored.items()

    # the command queued before the outage (on the last node) is handed out after it by the first
    status, body = wait_until(lambda: _polled(first), 10, what="a poll answered with a command")
    assert status == 200 and body == {"endpoint": "before_outage.fcgi"}, (status, body)
    for d in nodes:
        log = d.log()
        for sign in ("Unhandled", "store writer thread died", "store health check failed"):
            assert sign not in log, sign
        assert not re.search(r"\[iotd\.web[^\]]*#critical\]", log)  # no request failed inside (a 500)
        assert "PostgreSQL is unreachable" in log and "PostgreSQL is reachable again" in log


def _polled(node: DaemonProcess):
    """``(status, body)`` of ``GET /push`` unless it was an idle (empty 200) answer."""
    status, body = node.request("GET", f"/push?deviceId={PUSH_ID}")
    return None if (status, body) == (200, None) else (status, body)


def test_postgresql_stopped_for_10_s_answers_503_then_recovers_without_restart(tmp_path, pg_server):
    url = pg_server.create_database("iotd")
    with DaemonProcess(tmp_path, extra=f"[store]\nurl = {url}\n") as d:
        ride_out_outage(pg_server, url, [d], d.admin_key)


def test_two_nodes_ride_out_postgresql_stopped_for_10_s(tmp_path, pg_server):
    """Nodes ``a`` and ``b`` on the one private server and a Redis bus: both answer 503 meanwhile,
    both recover without restart, a command queued on ``b`` is handed out by ``a``; a socket on each
    node that followed the readings live has every acknowledged reading once, in id order."""
    url = pg_server.create_database("iotd")
    with Nodes(tmp_path, ("a", "b"), store_url=url) as nodes:
        key = nodes.admin_key
        sockets = {}
        try:
            ride = [nodes["a"], nodes["b"]]
            assert ride[0].request("PUT", "/api/v1/devices/d0", {}, key=key)[0] == 201
            sockets = {name: Socket(nodes[name], "/api/v1/readings/socket", key) for name in ("a", "b")}
            # both sockets live (live only: no `after`) once a probe reading reached them
            status, probe = ride[0].request("POST", "/api/v1/devices/d0/readings", {"data": {"probe": 1}}, key=key)
            assert status == 201
            for name, sock in sockets.items():
                wait_until(lambda sock=sock: any(b["id"] == probe["id"] for b in sock.bodies()), 20,
                           what=f"the probe on the socket of {name}")
            ride_out_outage(pg_server, url, ride, key)
            stored = sorted(stored_readings(url, "D1"))
            for name, sock in sockets.items():
                wait_until(lambda: len([b for b in sock.bodies() if b["device_id"] == "D1"]) >= len(stored), 30,
                           what=f"every stored reading on the socket of {name}")
                time.sleep(0.3)  # nothing more (no duplicate) arrives
                ids = [b["id"] for b in sock.bodies() if b["device_id"] == "D1"]
                assert ids == stored, name
        finally:
            for sock in sockets.values():
                sock.close()


class SilentServer(threading.Thread):
    """Listens on ``port`` and accepts every connection, then never says a word (a hung server:
    a client's connect waits for its timeout).  ``accepted`` counts the connections tried."""

    def __init__(self, port: int):
        super().__init__(name="silent", daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.accepted: list[socket.socket] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        """Stop listening (``shutdown`` wakes the blocked ``accept``: the port is free when it returns)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.join(10)
        for conn in self.accepted:
            conn.close()


@pytest_twisted.ensureDeferred
async def test_a_hung_server_costs_a_connect_attempt_per_reader_not_one_per_read(pg_server):
    """Reads while the server accepts but never answers fail (503) without each one waiting out a
    connect timeout: once a reader could not connect, reads fail at once until a health check
    reaches the server; after it is back, reads and writes work again on the same store."""
    store = Store(pg_server.create_database("hung"), reactor, pool_size=4)
    await store.start()
    try:
        assert await store.read(_one) == 1
        pg_server.stop()
        silent = SilentServer(pg_server.port)
        silent.start()
        try:
            reads = [store.read(_one) for _ in range(40)]
            outcomes = await defer.DeferredList(reads, consumeErrors=True)
            assert all(not ok and failure.check(StoreUnavailable) for ok, failure in outcomes)
            assert store.health == "unreachable"
            status, body = await _write_refused(store)
            assert status == "refused", body
            # the readers (3) tried, the rest failed without trying; a health check may add one
            assert 1 <= len(silent.accepted) <= 3 + 1, len(silent.accepted)
        finally:
            silent.close()
        pg_server.start()
        deadline = time.monotonic() + RECOVERY
        while store.health != "ok":
            assert time.monotonic() < deadline, "the store did not find the server again"
            await sleep(0.1)
        assert await store.read(_one) == 1
        assert await store.write(_one) == 1
    finally:
        await store.stop()


def _one(conn) -> int:
    return conn.execute("SELECT 1").fetchone()[0]


async def _write_refused(store) -> tuple[str, str]:
    try:
        await store.write(_one)
    except StoreUnavailable as e:
        return "refused", str(e)
    return "written", ""

"""PostgreSQL stopped for 10 s under a real ``twistd iotd`` that is ingesting: 503 JSON meanwhile,
recovery without a restart, nothing acknowledged lost, a queued push command still handed out.

The server is a private one (:mod:`pgserver`): stopping it disturbs no other test.  Readings are
posted over real HTTP from a thread, one after another, for the whole run; every 201 is an
acknowledgement whose event id must be in the database at the end.  What happens while the server
is down is checked from answers that were both sent and received while it was down, so the
assertion does not depend on how a request racing the stop or the start came out.
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

    def __init__(self, daemon: DaemonProcess, device: str):
        super().__init__(name="ingest", daemon=True)
        self.d = daemon
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
                                              {"data": {"n": n}}, key=self.d.admin_key)
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


def test_postgresql_stopped_for_10_s_answers_503_then_recovers_without_restart(tmp_path, pg_server):
    url = pg_server.create_database("iotd")
    d = DaemonProcess(tmp_path, extra=f"[store]\nurl = {url}\n")
    with d:
        key = d.admin_key
        assert d.request("PUT", "/api/v1/devices/d1", {"pushId": PUSH_ID}, key=key)[0] == 201
        status, queued = d.request("POST", "/api/v1/devices/D1/commands", {"endpoint": "before_outage.fcgi"},
                                   key=key)
        assert status == 201, queued
        pid = d.proc.pid
        ingest = Ingester(d, "D1")
        ingest.start()
        try:
            wait_until(lambda: len(ingest.acked()) >= 20, 30, what="20 readings acknowledged before the outage")

            pg_server.stop()
            down = time.monotonic()
            wait_until(lambda: ingest.count(503, since=down) >= 5, 15, what="ingest answered 503 while down")
            # what needs the store while it is down: a write, a read, a hand-out, the health
            status, body = d.request("GET", "/healthz")
            assert status == 503 and body["store"] == "unreachable" and body["status"] != "ok", body
            status, body = d.request("GET", f"/api/v1/commands/{queued['id']}", key=key)
            assert unavailable(status, body), (status, body)
            status, body = d.request("POST", "/api/v1/devices/D1/commands", {"endpoint": "x.fcgi"}, key=key)
            assert unavailable(status, body), (status, body)
            status, body = d.request("GET", f"/push?deviceId={PUSH_ID}")
            assert unavailable(status, body), (status, body)
            time.sleep(max(0.0, down + OUTAGE - time.monotonic()))
            up = time.monotonic()
            during = [a for a in ingest.answers if a[1] >= down and a[2] <= up]

            pg_server.start()
            wait_until(lambda: d.request("GET", "/healthz")[0] == 200, RECOVERY, what="/healthz 200 after the outage")
            assert d.proc.poll() is None and d.proc.pid == pid  # the same process: no restart
            status, body = d.request("POST", "/api/v1/devices/D1/readings", {"data": {"n": 0}}, key=key)
            assert status == 201, body
            back = time.monotonic()
            wait_until(lambda: ingest.count(201, since=back) >= 5, 30, what="the ingest loop acknowledged again")
        finally:
            ingest.halt.set()
            ingest.join(30)
        assert not ingest.is_alive()

        # while the server was down: only 503s in the error shape, and there were many
        assert len(during) >= 20, during
        assert all(unavailable(a[3], a[4]) for a in during), [a for a in during if not unavailable(a[3], a[4])]
        # around the stop and the start: an answer is a 201 or a 503 JSON, never a 500, a hang or a reset
        odd = [a for a in ingest.answers if a[3] != 201 and not unavailable(a[3], a[4])]
        assert odd == []

        # every acknowledged reading is stored, under the id its answer gave
        acked = ingest.acked()
        stored = stored_readings(url, "D1")
        assert {event_id: n for n, event_id in acked.items()}.items() <= stored.items()
        assert len(acked) >= 30

        # the command queued before the outage is handed out after it
        status, body = d.request("GET", f"/push?deviceId={PUSH_ID}")
        assert status == 200 and body == {"endpoint": "before_outage.fcgi"}, (status, body)
        log = d.log()
        for sign in ("Unhandled", "store writer thread died", "store health check failed"):
            assert sign not in log, sign
        assert not re.search(r"\[iotd\.web[^\]]*#critical\]", log)  # no request failed inside (a 500)
        assert "PostgreSQL is unreachable" in log and "PostgreSQL is reachable again" in log


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
        self.sock.close()
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

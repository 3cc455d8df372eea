"""Store health (disk full, database file removed), the bounded write queue, private files.

A full disk is simulated with ``PRAGMA max_page_count`` on the writer's
connection (``Store.maintain``): SQLite then fails a write that needs a new
page with SQLITE_FULL, exactly as on a full disk.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, threads
from twisted.logger import formatEvent, globalLogPublisher

import dbutil
from daemon_process import DaemonProcess
from iotd.store import StoreUnavailable
from iotd.store import engine as dbmod
from iotd.store import events as evsql
from iotd.store import sqlite as sqlitemod
from ws_helpers import Client, sleep, ws_url


async def health(daemon) -> tuple[int, dict]:
    resp = await treq.get(daemon.url + "/healthz")
    return resp.code, await resp.json()


async def until_health(daemon, code: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = await health(daemon)
        if status == code:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz still {status} {body}")
        await sleep(0.1)


async def replayed_readings(daemon, device: str) -> list[dict]:
    """Every reading of ``device`` as a replay from the beginning sends it."""
    client = await Client.open(ws_url(daemon, f"/api/v1/devices/{device}/readings/socket",
                                      auth=daemon.admin_key, after="1970-01-01T00:00:00Z"))
    try:
        got: list[dict] = []
        while True:
            try:
                frame = await client.recv_json(timeout=1.0)
            except TimeoutError:
                return got
            got.extend(e["body"] for e in frame)
    finally:
        await client.close()


def no_room_to_grow(conn):
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def room_again(conn):
    conn.execute("PRAGMA max_page_count = 1073741823")


@pytest.mark.sqlite_only
@pytest_twisted.ensureDeferred
async def test_disk_full_makes_healthz_503_full_refuses_writes_and_recovers_when_space_is_freed(daemon):
    await daemon.put_device("d1")
    status, body = await health(daemon)
    assert status == 200 and body["status"] == "ok" and body["store"] == "ok"
    status, before = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"n": 1}})
    assert status == 201

    await daemon.ctx.store.maintain(no_room_to_grow)
    status, body = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"big": "x" * 300_000}})
    assert status == 503 and body["error"]["code"] == "unavailable"
    # Known at once from the write error, not only at the next periodic check.
    status, body = await health(daemon)
    assert status == 503 and body["store"] == "full" and body["status"] == "unavailable"
    for _ in range(3):  # every write is refused meanwhile, small ones too
        status, _ = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"n": 2}})
        assert status == 503
    status, devices = await daemon.request("GET", "/api/v1/devices")
    assert status == 200 and [d["identifier"] for d in devices["items"]] == ["D1"]  # reads go on

    await daemon.ctx.store.maintain(room_again)  # space freed
    body = await until_health(daemon, 200)
    assert body["store"] == "ok"
    status, after = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"n": 3}})
    assert status == 201
    # Nothing acknowledged is lost, nothing refused was stored.
    assert await replayed_readings(daemon, "d1") == [before, after]


@pytest.mark.sqlite_only
@pytest_twisted.ensureDeferred
async def test_a_file_system_without_free_space_is_reported_full_by_the_periodic_check(daemon, monkeypatch):
    monkeypatch.setattr(sqlitemod, "_free_bytes", lambda directory: 0)  # what statvfs says of a full disk
    body = await until_health(daemon, 503, timeout=3 * dbmod.HEALTH_EVERY + 5)
    assert body["store"] == "full"
    status, _ = await daemon.request("PUT", "/api/v1/devices/x", {})
    assert status == 503
    monkeypatch.setattr(sqlitemod, "_free_bytes", lambda directory: 10 * sqlitemod.FULL_BELOW_BYTES)
    assert (await until_health(daemon, 200))["store"] == "ok"
    status, _ = await daemon.request("PUT", "/api/v1/devices/x", {})
    assert status == 201


@pytest.mark.sqlite_only
@pytest_twisted.ensureDeferred
async def test_database_file_removed_under_the_daemon_refuses_writes_and_healthz_says_missing(daemon):
    await daemon.put_device("d1")
    path = daemon.ctx.config.database_path
    for name in (path, path + "-wal", path + "-shm"):
        os.remove(name)
    # Not one write made after the removal is acknowledged: it would be gone at restart.
    for n in range(5):
        status, body = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"n": n}})
        assert status == 503, body
        assert body["error"]["code"] == "unavailable"
    status, body = await daemon.request("PUT", "/api/v1/devices/d2", {})
    assert status == 503
    body = await until_health(daemon, 503)
    assert body["store"] == "missing"
    await sleep(2.5 * dbmod.HEALTH_EVERY)  # it stays missing: the open file is gone for good
    assert (await health(daemon))[1]["store"] == "missing"
    status, devices = await daemon.request("GET", "/api/v1/devices")
    assert status == 200 and [d["identifier"] for d in devices["items"]] == ["D1"]


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.sqlite_only
def test_store_files_and_admin_key_are_mode_0600(tmp_path):
    d = DaemonProcess(tmp_path).start()
    data = tmp_path / "data"
    try:
        status, _ = d.request("PUT", "/api/v1/devices/m1", {}, key=d.admin_key)
        assert status == 201
        for name in ("iotd.sqlite3", "iotd.sqlite3-wal", "iotd.sqlite3-shm", "admin.key"):
            assert _mode(str(data / name)) == 0o600, name
    finally:
        assert d.stop() == 0
    # A store left 0644 by an older iotd is made private at the next start.
    for name in ("iotd.sqlite3", "iotd.sqlite3-wal", "iotd.sqlite3-shm"):
        if (data / name).exists():
            os.chmod(data / name, 0o644)
    d2 = DaemonProcess(tmp_path, port=d.port).start()
    try:
        status, _ = d2.request("PUT", "/api/v1/devices/m2", {}, key=d2.admin_key)
        assert status == 201
        for name in ("iotd.sqlite3", "iotd.sqlite3-wal", "iotd.sqlite3-shm"):
            assert _mode(str(data / name)) == 0o600, name
    finally:
        assert d2.stop() == 0


# -- the bounded write queue ------------------------------------------------------


class _Gate:
    """A write that holds the writer thread until released (so the queue fills behind it)."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn):
        self.started.set()
        self.release.wait(30)


@pytest_twisted.async_yield_fixture
async def small_store(tmp_path):
    s = dbutil.new_store(tmp_path / "q.sqlite3", reactor, max_queued_writes=10, max_queued_bytes=1000)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def store_log():
    lines: list[str] = []

    def observe(event):
        if str(event.get("log_namespace", "")).startswith("iotd.store"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_write_queue_over_its_entry_bound_refuses_at_once_and_logs_once(small_store, store_log):
    gate = _Gate()
    held = small_store.write(gate)
    await threads.deferToThread(gate.started.wait, 10)
    queued = [small_store.write(evsql.insert, [("t", "reading", "D", {"i": i})]) for i in range(10)]
    refused = [small_store.write(evsql.insert, [("t", "reading", "D", {"i": 99})]) for _ in range(5)]
    for d in refused:  # failed already: nothing waits for the writer
        assert d.called
        with pytest.raises(StoreUnavailable, match="queue is full"):
            await d
    assert sum("write queue full" in line for line in store_log) == 1  # once per episode
    gate.release.set()
    await held
    rows = await defer.gatherResults(queued)
    assert [r[0][5]["i"] for r in rows] == list(range(10))  # every accepted write committed
    await small_store.write(evsql.insert, [("t", "reading", "D", {"i": 10})])  # the episode is over
    assert sum("accepts writes again" in line for line in store_log) == 1
    stored = await small_store.read(evsql.read, "t", ["reading"], 0, 100)
    assert [r[5]["i"] for r in stored] == list(range(11))


@pytest_twisted.ensureDeferred
async def test_write_queue_is_bounded_in_declared_bytes(small_store):
    gate = _Gate()
    held = small_store.write(gate)
    await threads.deferToThread(gate.started.wait, 10)
    first = small_store.write(evsql.insert, [("t", "packet", "D", {"n": 1})], size=600)
    with pytest.raises(StoreUnavailable):
        await small_store.write(evsql.insert, [("t", "packet", "D", {"n": 2})], size=600)
    small = small_store.write(evsql.insert, [("t", "packet", "D", {"n": 3})], size=300)
    gate.release.set()
    await held
    await defer.gatherResults([first, small])
    # Once drained, a write bigger than the whole bound is still taken when it is alone.
    await small_store.write(evsql.insert, [("t", "packet", "D", {"n": 4})], size=5000)
    stored = await small_store.read(evsql.read, "t", ["packet"], 0, 100)
    assert [r[5]["n"] for r in stored] == [1, 3, 4]

"""What an operator relies on: the access log, CORS, 503 while starting, hourly prune,
backups of a running daemon, the open-files limit."""

from __future__ import annotations

import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task

from conftest import make_config
from daemon_process import DaemonProcess
from iotd.service import PRUNE_EVERY, CoreService
from iotd.tap import makeService

ADMIN = os.path.join(os.path.dirname(sys.executable), "iotd-admin")


# -- the access log ----------------------------------------------------------------


def chunked_post(port: int, path: str, key: str, total: int) -> bytes:
    """A chunked POST of ``total`` bytes, reading the answer while sending; the answer's head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                      "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"400\r\n" + b"7" * 0x400 + b"\r\n"
        sock.settimeout(0.05)
        received = b""
        for _ in range(total // 0x400):
            try:
                sock.sendall(chunk)
            except OSError:
                break
            try:
                received += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if b"\r\n\r\n" in received:
                break
        return received.split(b"\r\n\r\n", 1)[0]


def test_access_log_redacts_keys_in_any_case_and_in_the_referer_and_logs_413(tmp_path):
    d = DaemonProcess(tmp_path, extra="max_body_bytes = 2048\n").start()
    try:
        key = d.admin_key
        for name in ("Auth", "TOKEN", "ithings-token", "Ithings-Token", "auth"):
            d.request("GET", f"/api/v1/devices?limit=5&{name}={key}")
        referers = [f"http://console.example/page?auth={key}&tab=2",
                    f"http://console.example/p?x=1&Token={key}#section",
                    f"http://console.example/p#auth={key}"]
        for referer in referers:
            status, _ = d.request("GET", "/api/v1/devices", key=key, headers={"Referer": referer})
            assert status == 200
        status, _ = d.request("PUT", "/api/v1/devices/big", {}, key=key)
        assert status == 201
        status, body = d.request("POST", "/api/v1/devices/big/readings", raw=b"x" * 4096, key=key,
                                 headers={"Content-Type": "application/json"})
        assert status == 413 and body["error"]["code"] == "too_large"
        head = chunked_post(d.port, "/api/v1/devices/big/packets", key, 64 * 1024)
        assert head.startswith(b"HTTP/1.1 413")
        status, _ = d.request("POST", "/api/v1/devices/big/packets", {"payload": "ok"}, key=key)
        assert status == 201  # a device's successful send: no access-log line
        status, _ = d.request("POST", "/api/v1/devices/big/packets", {"payload_encoding": "nope"}, key=key)
        assert status == 422  # an error answer: one line
    finally:
        assert d.stop() == 0
    log = d.log()
    assert key not in log  # not in the URL, not in the Referer, not anywhere
    assert "GET /api/v1/devices?limit=5&Auth=REDACTED HTTP/1.1" in log
    assert "&TOKEN=REDACTED " in log and "&ithings-token=REDACTED " in log and "&Ithings-Token=REDACTED " in log
    assert '"http://console.example/page?auth=REDACTED&tab=2"' in log
    assert '"http://console.example/p?x=1&Token=REDACTED#"' in log
    lines_413 = [line for line in log.splitlines() if '" 413 ' in line]
    assert len(lines_413) == 2, lines_413  # one line per 413, Content-Length and chunked
    assert any('"POST /api/v1/devices/big/readings HTTP/1.1" 413' in line for line in lines_413)
    assert any('"POST /api/v1/devices/big/packets HTTP/1.1" 413' in line for line in lines_413)
    posts = [line for line in log.splitlines() if '"POST /api/v1/devices/big/packets HTTP/1.1"' in line]
    assert [line.split('HTTP/1.1" ')[1][:3] for line in posts] == ["413", "422"], posts


# -- CORS ----------------------------------------------------------------------------


def _header(resp, name: str) -> str | None:
    values = resp.headers.getRawHeaders(name.encode())
    return values[0].decode() if values else None


@pytest.mark.parametrize("daemon_config", [{"http": {"cors_origins": "https://console.example"}}])
@pytest_twisted.ensureDeferred
async def test_cors_allowed_origin_gets_the_headers_and_a_preflight_204(daemon):
    origin = "https://console.example"
    resp = await treq.get(daemon.url + "/api/v1/devices",
                          headers={"Authorization": f"Bearer {daemon.admin_key}", "Origin": origin})
    assert resp.code == 200
    assert _header(resp, "access-control-allow-origin") == origin
    assert _header(resp, "vary") == "Origin"
    await resp.content()
    preflight = await treq.request("OPTIONS", daemon.url + "/api/v1/devices/x/readings", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.code == 204
    assert _header(preflight, "access-control-allow-origin") == origin
    assert "POST" in _header(preflight, "access-control-allow-methods").split(", ")
    allowed = _header(preflight, "access-control-allow-headers").split(", ")
    assert "authorization" in allowed and "content-type" in allowed
    await preflight.content()


@pytest.mark.parametrize("daemon_config", [{"http": {"cors_origins": "https://console.example"}}])
@pytest_twisted.ensureDeferred
async def test_cors_disallowed_origin_gets_no_cors_headers(daemon):
    for method in ("GET", "OPTIONS"):
        resp = await treq.request(method, daemon.url + "/api/v1/devices", headers={
            "Authorization": f"Bearer {daemon.admin_key}", "Origin": "https://evil.example",
            "Access-Control-Request-Method": "DELETE"})
        await resp.content()
        assert resp.code != 204
        assert not [name for name, _ in resp.headers.getAllRawHeaders()
                    if name.lower().startswith(b"access-control-")], method


# -- 503 while starting --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requests_before_the_core_is_ready_get_503_json(tmp_path):
    top = makeService(make_config(tmp_path), reactor)
    core = top.getServiceNamed("core")
    opened = defer.Deferred()  # the store's start waits for this: iotd is "starting" until then
    real_start = core.store.start

    async def slow_start():
        await opened
        await real_start()

    core.store.start = slow_start
    top.startService()
    try:
        port = (await top.getServiceNamed("http-0")._waitingForPort).getHost().port
        url = f"http://127.0.0.1:{port}"
        for path in ("/healthz", "/api/v1/devices", "/push?deviceId=7"):
            resp = await treq.get(url + path)
            body = json.loads(await resp.content())
            assert resp.code == 503, path
            assert _header(resp, "content-type").startswith("application/json")
            assert body["error"]["code"] == "unavailable", body
        opened.callback(None)
        await core.started
        resp = await treq.get(url + "/healthz")
        assert resp.code == 200 and (await resp.json())["status"] == "ok"
    finally:
        if not opened.called:
            opened.callback(None)
            await core.started
        await defer.maybeDeferred(top.stopService)


# -- the hourly prune -----------------------------------------------------------------


def _insert_at(conn, stamp_us: int, n: int) -> None:
    """An event stamped in the past (its id from the store's counter, as every event's)."""
    event_id = conn.execute("UPDATE event_seq SET last_id = last_id + 1 WHERE id = 1 RETURNING last_id").fetchone()[0]
    conn.execute("INSERT INTO events (id, tenant, kind, device, inserted_us, data) VALUES (?, ?, ?, ?, ?, ?)",
                 (event_id, "default", "reading", "P1", stamp_us, json.dumps({"data": {"n": n}})))


async def _numbers(core) -> list[int]:
    return [e.data["data"]["n"] for e in await core.events.read("default", ["reading"], 0, 100)]


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_events_older_than_events_days_are_pruned_at_start_and_then_every_hour(tmp_path):
    from iotd.store import open_sync

    cfg = make_config(tmp_path, {"retention": {"events_days": "1"}})
    now_us = int(time.time() * 1_000_000)
    day_us = 86400 * 1_000_000
    conn = open_sync(cfg)  # a store that already holds a 3-day-old event
    _insert_at(conn, now_us - 3 * day_us, 1)
    conn.close()

    clock = task.Clock()
    clock.advance(now_us / 1_000_000)
    core = CoreService(cfg, reactor, clock=clock)
    core.startService()
    await core.started
    try:
        await _until(lambda: _pruned(core, 1))  # pruned right at start
        # A 2-day-old event and a fresh one; the 2-day-old one outlives the cutoff only until the next hour.
        await core.store.write(_insert_at, now_us - 2 * day_us, 2)
        await core.events.append([("default", "reading", "P1", {"data": {"n": 3}})])
        clock.advance(PRUNE_EVERY - 1)
        await task.deferLater(reactor, 0.5, lambda: None)
        assert await _numbers(core) == [2, 3]  # not pruned more often than hourly
        clock.advance(1)
        await _until(lambda: _pruned(core, 2))
        assert await _numbers(core) == [3]  # the fresh event stays
    finally:
        await defer.maybeDeferred(core.stopService)


async def _pruned(core, n: int) -> bool:
    return n not in await _numbers(core)


# -- backups while the daemon runs ------------------------------------------------------


@pytest.mark.sqlite_only
def test_backup_while_the_daemon_runs_and_writes_has_every_event_acknowledged_before_it(tmp_path):
    d = DaemonProcess(tmp_path).start()
    key = d.admin_key
    acked: list[tuple[float, int]] = []
    stop = threading.Event()
    failures: list = []

    def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            status, body = d.request("POST", "/api/v1/devices/bk/readings", {"data": {"w": w, "n": n}}, key=key)
            if status != 201:
                failures.append((status, body))
                return
            acked.append((time.monotonic(), body["id"]))
            n += 1

    try:
        assert d.request("PUT", "/api/v1/devices/bk", {}, key=key)[0] == 201
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 200 and time.monotonic() < deadline and not failures:
            time.sleep(0.01)
        started = time.monotonic()
        before = {event_id for _, event_id in list(acked)}
        copy = tmp_path / "backup.sqlite3"
        out = subprocess.run([ADMIN, "-c", d.ini, "backup", str(copy)], cwd=d.workdir,
                             capture_output=True, text=True, timeout=60)
        finished = time.monotonic()
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        assert d.stop() == 0
    assert not failures, failures[:3]
    assert out.returncode == 0, out.stderr
    assert len(before) >= 200
    assert any(started < at < finished for at, _ in acked)  # the daemon was writing during the backup
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {row[0] for row in conn.execute("SELECT id FROM events WHERE device = 'BK'")}
    finally:
        conn.close()
    assert before <= ids  # every event acknowledged before the backup began is in it
    assert len(ids) >= len(before)


# -- the open-files limit -------------------------------------------------------------------


def _lower_open_files():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))


def test_daemon_raises_its_soft_open_files_limit_to_the_hard_limit(tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 256  # else there is nothing to raise to
    d = DaemonProcess(tmp_path).start(preexec_fn=_lower_open_files)
    try:
        with open(f"/proc/{d.proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
    finally:
        assert d.stop() == 0
    got_soft, got_hard = line.split()[3:5]
    assert int(got_soft) == int(got_hard) == hard  # started at 256, raised to the hard limit

"""Websockets against the real daemon process: slow clients, revoked keys, wss."""

import json
import os
import ssl
import subprocess
import sys
import time

import pytest_twisted
import treq
from twisted.internet import defer

import dbutil
from daemon_process import DaemonProcess, free_port
from test_tls import make_ca_and_cert
from ws_helpers import Client, RawClient, in_thread, sleep, ws_url


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def metric(d, name):
    text = await (await treq.get(d.url + "/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest_twisted.ensureDeferred
async def test_never_reading_client_is_cut_while_fast_client_gets_everything(tmp_path):
    d = DaemonProcess(tmp_path, extra="[websocket]\nmax_buffer_bytes = 262144\n").start()
    try:
        key = d.admin_key
        d.request("PUT", "/api/v1/devices/busy", {}, key=key)
        path = f"/api/v1/devices/busy/readings/socket?auth={key}"
        fast = await Client.open(ws_url(d, "/api/v1/devices/busy/readings/socket", auth=key), max_queue=None)
        slow = await RawClient.open(d, path)
        assert slow.status == 101
        base = rss_kib(d.proc.pid)
        sent = []
        blob = "x" * 1000
        reading = defer.ensureDeferred(fast.events(10_000, timeout=20))  # the fast client reads all along
        for batch in range(100):  # 10,000 events of ~1 KB: far past the slow client's kernel buffers
            status, body = await in_thread(d.request, "POST", "/api/v1/devices/busy/readings",
                                           [{"data": {"b": batch, "i": i, "blob": blob}} for i in range(100)], key)
            assert status == 201
            sent.extend(e["id"] for e in body)
        got = await reading
        assert [e["body"]["id"] for e in got] == sent
        assert await metric(d, 'iotd_websocket_slow_dropped_total{kind="element"}') == 1
        data, ending = await in_thread(slow.drain_until_closed)
        assert ending in ("eof", "reset")
        assert rss_kib(d.proc.pid) - base < 64 * 1024
        await fast.close()
        slow.close()
    finally:
        assert d.stop() == 0


@pytest_twisted.ensureDeferred
async def test_key_revoked_by_cli_closes_its_sockets_with_4401_within_a_second(tmp_path):
    d = DaemonProcess(tmp_path).start()
    try:
        status, body = d.request("POST", "/api/v1/api-keys", {"name": "screen", "role": "read_only"}, key=d.admin_key)
        d.request("PUT", "/api/v1/devices/gate", {}, key=d.admin_key)
        element = await Client.open(ws_url(d, "/api/v1/readings/socket", auth=body["key"]))
        subscribe = await Client.open(ws_url(d, "/api/v1/system/common/websocket/connect", token=body["key"]))
        hello = await subscribe.recv_json()
        assert hello["code"] == 200
        started = time.monotonic()
        out = await in_thread(subprocess.run, [sys.executable, "-m", "iotd.admin", "-c", d.ini, "key", "revoke", body["id"]],
                              cwd=d.workdir, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        revoked_at = time.monotonic()  # the revocation committed before the CLI exited
        closes = await defer.gatherResults([defer.ensureDeferred(element.closed(timeout=3)),
                                            defer.ensureDeferred(subscribe.closed(timeout=3))])
        assert [code for code, _ in closes] == [4401, 4401]
        assert time.monotonic() - revoked_at <= 1.0
        assert revoked_at - started < 10
        status, _ = await in_thread(d.request, "GET", "/api/v1/devices", key=body["key"])
        assert status == 401
    finally:
        assert d.stop() == 0


@pytest_twisted.ensureDeferred
async def test_wss_on_an_ssl_endpoint(tmp_path):
    ca_pem = make_ca_and_cert(tmp_path)
    port = free_port()
    d = DaemonProcess(tmp_path, port=port)
    with open(d.ini, "w") as f:
        f.write(f"[iotd]\ndata_dir = data\n[http]\nlisten = ssl:{port}:interface=127.0.0.1"
                f":privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'} tcp:{free_port()}:interface=127.0.0.1\n"
                + dbutil.store_ini(tmp_path / "data"))
    d.port = int(open(d.ini).read().split("tcp:")[1].split(":")[0])  # health checks over the plain port
    d.start()
    try:
        key = d.admin_key
        d.request("PUT", "/api/v1/devices/tls", {}, key=key)
        context = ssl.create_default_context(cadata=ca_pem.decode())
        client = await Client.open(f"wss://localhost:{port}/api/v1/devices/tls/readings/socket?auth={key}", ssl=context)
        status, body = d.request("POST", "/api/v1/devices/tls/readings", {"data": {"secure": True}}, key=key)
        events = await client.events(1)
        assert events[0]["body"]["id"] == body["id"] and events[0]["body"]["data"] == {"secure": True}
        await client.close()
        untrusting = ssl.create_default_context()
        try:
            await Client.open(f"wss://localhost:{port}/api/v1/devices/tls/readings/socket?auth={key}", ssl=untrusting)
            refused = False
        except Exception:
            refused = True
        assert refused
    finally:
        assert d.stop() == 0

"""Event sockets in operation: slow clients, key revocation, shutdown, connection caps."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer

from conftest import make_config, start_daemon, stop_daemon
from iotd import metrics
from iotd.store import keys as keysql
from ws_helpers import Client, RawClient, eventually, handshake_error, in_thread, sleep, sockets_of, ws_url

SUBSCRIBE = "/api/v1/system/common/websocket/connect"


def slow_dropped() -> float:
    return metrics.ws_slow_dropped.labels("element")._value.get()


@pytest.mark.parametrize("daemon_config", [{"websocket": {"max_buffer_bytes": "524288"}}])
@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_is_cut_and_the_others_get_everything(daemon):
    await daemon.put_device("gate-01")
    path = f"/api/v1/devices/gate-01/packets/socket?auth={daemon.admin_key}"
    slow = await RawClient.open(daemon, path)
    assert slow.status == 101
    fast = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=daemon.admin_key),
                             max_size=None, max_queue=None)
    factory = sockets_of(daemon, "element")
    await eventually(lambda: len(factory.sockets) == 2)
    before = slow_dropped()
    sent = []
    try:
        for _ in range(200):  # up to 200 x 100 x 2 KB: far more than any socket buffer
            items = [{"payload": "ab" * 1000, "payload_encoding": "binary"} for _ in range(100)]
            status, stored = await daemon.request("POST", "/api/v1/devices/gate-01/packets", items)
            assert status == 201
            sent.extend(s["id"] for s in stored)
            if slow_dropped() > before:
                break
        assert slow_dropped() == before + 1
        await eventually(lambda: len(factory.sockets) == 1)
        # the slow client finds its connection aborted (it never read, so no close frame reaches it)
        data, ending = await in_thread(slow.drain_until_closed)
        assert ending in ("reset", "eof")
        # the reader got every event, nothing was held back for the slow one
        got = await fast.events(len(sent), timeout=10)
        assert [e["body"]["id"] for e in got] == sent
    finally:
        slow.close()
        await fast.close()


async def new_key_with_id(daemon, **body) -> tuple[str, str]:
    body = dict({"name": "ws", "role": "read_only", "groups": [], "permissions": []}, **body)
    status, created = await daemon.request("POST", "/api/v1/api-keys", body)
    assert status == 201, created
    return created["id"], created["key"]


@pytest_twisted.ensureDeferred
async def test_revoked_key_closes_its_sockets_with_4401(daemon):
    await daemon.put_device("gate-01")
    key_id, secret = await new_key_with_id(daemon)
    element = await Client.open(ws_url(daemon, "/api/v1/readings/socket", auth=secret))
    sub = await Client.open(ws_url(daemon, SUBSCRIBE, token=secret))
    assert (await sub.recv_json())["code"] == 200
    bystander = await Client.open(ws_url(daemon, "/api/v1/readings/socket", auth=daemon.admin_key))
    try:
        started = time.monotonic()
        status, _ = await daemon.request("DELETE", f"/api/v1/api-keys/{key_id}")
        assert status == 204
        assert await element.closed(timeout=1) == (4401, "key revoked")
        assert await sub.closed(timeout=1) == (4401, "key revoked")
        assert time.monotonic() - started < 1.0
        status, _ = await handshake_error(ws_url(daemon, "/api/v1/readings/socket", auth=secret))
        assert status == 401
        assert await bystander.ping() is True  # other keys' sockets stay open
    finally:
        await bystander.close()


@pytest_twisted.ensureDeferred
async def test_key_revoked_by_another_process_closes_within_a_second(daemon):
    await daemon.put_device("gate-01")
    key_id, secret = await new_key_with_id(daemon)
    client = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=secret))
    # what `iotd-admin key revoke` does: delete in the store and bump the revision
    assert await daemon.ctx.store.write(keysql.delete, key_id)
    started = time.monotonic()
    assert await client.closed(timeout=1.2) == (4401, "key revoked")
    assert time.monotonic() - started < 1.0


@pytest_twisted.ensureDeferred
async def test_stopping_the_daemon_closes_websockets_with_1001(tmp_path):
    daemon = await start_daemon(make_config(tmp_path))
    stopped = False
    try:
        await daemon.put_device("gate-01")
        element = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=daemon.admin_key))
        sub = await Client.open(ws_url(daemon, SUBSCRIBE, token=daemon.admin_key))
        await sub.recv_json()
        closing = [defer.ensureDeferred(element.closed()), defer.ensureDeferred(sub.closed())]
        started = time.monotonic()
        await stop_daemon(daemon)
        stopped = True
        assert time.monotonic() - started < 2.5
        assert await defer.gatherResults(closing) == [(1001, "going away"), (1001, "going away")]
    finally:
        if not stopped:
            await stop_daemon(daemon)


@pytest.mark.parametrize("daemon_config", [{"websocket": {"max_connections": "2"}}])
@pytest_twisted.ensureDeferred
async def test_max_connections_counts_both_kinds_and_refuses_with_503(daemon):
    await daemon.put_device("gate-01")
    first = await Client.open(ws_url(daemon, "/api/v1/packets/socket", auth=daemon.admin_key))
    second = await Client.open(ws_url(daemon, SUBSCRIBE, token=daemon.admin_key))
    status, body = await handshake_error(ws_url(daemon, "/api/v1/readings/socket", auth=daemon.admin_key))
    assert status == 503 and body["error"]["code"] == "unavailable"
    status, _ = await handshake_error(ws_url(daemon, SUBSCRIBE, token=daemon.admin_key))
    assert status == 503
    await first.close()
    await eventually(lambda: sockets_of(daemon, "element").limits.open == 1)
    third = await Client.open(ws_url(daemon, "/api/v1/readings/socket", auth=daemon.admin_key))
    await third.close()
    await second.close()


@pytest.mark.parametrize("daemon_config", [{"websocket": {"max_connections_per_address": "1"}}])
@pytest_twisted.ensureDeferred
async def test_max_connections_per_address(daemon):
    first = await Client.open(ws_url(daemon, "/api/v1/packets/socket", auth=daemon.admin_key))
    status, body = await handshake_error(ws_url(daemon, "/api/v1/packets/socket", auth=daemon.admin_key))
    assert status == 503 and "address" in body["error"]["message"]
    await first.close()


@pytest_twisted.ensureDeferred
async def test_metrics_count_open_websockets_and_delivered_events(daemon):
    await daemon.put_device("gate-01")
    client = await Client.open(ws_url(daemon, "/api/v1/packets/socket", auth=daemon.admin_key))
    status, text = await daemon.request("GET", "/metrics")
    text = text.decode() if isinstance(text, bytes) else text
    assert 'iotd_websocket_connections{kind="element"} 1.0' in text
    status, _ = await daemon.request("POST", "/api/v1/devices/gate-01/packets", {"payload": 1})
    await client.recv_json()
    status, text = await daemon.request("GET", "/metrics")
    text = text.decode() if isinstance(text, bytes) else text
    assert 'iotd_events_delivered_total{kind="packet"}' in text
    await client.close()
    await sleep(0.1)
    status, text = await daemon.request("GET", "/metrics")
    text = text.decode() if isinstance(text, bytes) else text
    assert 'iotd_websocket_connections{kind="element"} 0.0' in text


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_websockets_with_1001_and_exits_0(tmp_path):
    from daemon_process import DaemonProcess

    proc = await in_thread(DaemonProcess(tmp_path).start)
    try:
        status, _ = await in_thread(proc.request, "PUT", "/api/v1/devices/gate-01", {}, proc.admin_key)
        assert status == 201
        base = proc.url.replace("http://", "ws://")
        element = await Client.open(f"{base}/api/v1/devices/gate-01/readings/socket?auth={proc.admin_key}")
        sub = await Client.open(f"{base}{SUBSCRIBE}", headers={"token": proc.admin_key})
        await sub.recv_json()
        closing = [defer.ensureDeferred(element.closed()), defer.ensureDeferred(sub.closed())]
        assert await in_thread(proc.stop) == 0
        assert await defer.gatherResults(closing) == [(1001, "going away"), (1001, "going away")]
    finally:
        if proc.proc.poll() is None:
            await in_thread(proc.stop)

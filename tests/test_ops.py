"""/healthz and /metrics."""

import pytest_twisted
import treq


@pytest_twisted.ensureDeferred
async def test_healthz_needs_no_key(daemon):
    resp = await treq.get(daemon.url + "/healthz")
    assert resp.code == 200
    body = await resp.json()
    assert body["status"] == "ok" and body["store"] == "ok"


@pytest_twisted.ensureDeferred
async def test_metrics_count_what_happens(daemon):
    await daemon.put_device("m1")
    before = await (await treq.get(daemon.url + "/metrics")).text()
    await daemon.request("POST", "/api/v1/devices/m1/readings", [{"data": {"a": 1}}, {"data": {"a": 2}}])
    await daemon.request("GET", "/api/v1/devices", key="f" * 64)
    after = await (await treq.get(daemon.url + "/metrics")).text()

    def value(text, name):
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if name + " " in line or line.startswith(name):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    assert value(after, 'iotd_events_published_total{kind="reading"}') - value(before, 'iotd_events_published_total{kind="reading"}') == 2
    assert value(after, "iotd_auth_failures_total") - value(before, "iotd_auth_failures_total") == 1
    assert value(after, 'iotd_http_requests_total{status="401"}') - value(before, 'iotd_http_requests_total{status="401"}') == 1
    assert "iotd_links_open" in after and "iotd_websocket_connections" in after


@pytest_twisted.ensureDeferred
async def test_healthz_503_when_store_down(daemon):
    await daemon.ctx.store.stop()
    resp = await treq.get(daemon.url + "/healthz")
    assert resp.code == 503
    assert (await resp.json())["store"] == "unavailable"
    status, body = await daemon.request("PUT", "/api/v1/devices/x", {})
    assert status == 503 and body["error"]["code"] == "unavailable"
    await daemon.ctx.store.start()

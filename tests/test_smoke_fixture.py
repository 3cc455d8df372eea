import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_healthz(daemon):
    status, body = await daemon.request("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"

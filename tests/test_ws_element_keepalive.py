"""Event sockets: idle close, RFC ping, text ping, message size cap (timers on a Clock)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from ws_helpers import Client, sockets_of, ws_url


async def open_with_clock(daemon) -> tuple[Client, Clock]:
    await daemon.put_device("gate-01")
    clock = Clock()
    sockets_of(daemon, "element").clock = clock
    client = await Client.open(ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=daemon.admin_key))
    return client, clock


@pytest_twisted.ensureDeferred
async def test_idle_socket_is_closed_with_1000_after_idle_timeout(daemon):
    client, clock = await open_with_clock(daemon)
    clock.advance(59.5)
    await client.silent(0.1)
    clock.advance(1)
    assert await client.closed() == (1000, "idle")


@pytest_twisted.ensureDeferred
async def test_rfc_ping_is_answered_and_counts_as_activity(daemon):
    client, clock = await open_with_clock(daemon)
    clock.advance(50)
    assert await client.ping() is True
    clock.advance(30)  # 80 s after open, 30 s after the ping
    await client.silent(0.1)
    clock.advance(29)
    await client.silent(0.1)
    clock.advance(2)  # 61 s after the ping
    assert await client.closed() == (1000, "idle")


@pytest_twisted.ensureDeferred
async def test_text_ping_gets_pong_and_other_messages_are_ignored(daemon):
    client, clock = await open_with_clock(daemon)
    assert await client.request_text("ping") == "pong"
    clock.advance(45)
    await client.send("hello server")  # ignored, but it is activity
    await client.send(b"\x00\x01")
    await client.silent(0.15)
    clock.advance(45)  # 90 s after open, 45 s after the last message
    await client.silent(0.1)
    clock.advance(20)
    assert await client.closed() == (1000, "idle")


@pytest_twisted.ensureDeferred
async def test_client_messages_are_capped_at_64_kib(daemon):
    client, _ = await open_with_clock(daemon)
    await client.send("x" * 65536)  # at the cap: ignored
    assert await client.request_text("ping") == "pong"
    await client.send("x" * 65537)
    code, _ = await client.closed()
    assert code == 1009

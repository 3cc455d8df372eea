"""Broadcasts to many sockets (more than ``FLUSH_FANOUT``): frames are queued per socket and written
once per reactor turn (:mod:`iotd.ws.protocol`), in paced rounds of a few sockets per turn
(:mod:`iotd.ws.factory`); every socket still gets every event, in order, one per frame, and anything
else sent on a socket goes after its queued frames."""

from __future__ import annotations

import pytest_twisted

from iotd.ws import factory as factory_module
from iotd.ws.protocol import FLUSH_FANOUT
from ws_helpers import Client, in_thread, sockets_of, ws_url

SOCKETS = FLUSH_FANOUT * 2 + 3


def around_flush(factory, before=lambda: None, after=lambda: None) -> None:
    """Run ``before`` and ``after`` around each call of the factory's flush of the outboxes."""
    original = factory._flush_outboxes

    def flush():
        before()
        original()
        after()

    factory._flush_outboxes = flush


def queued(factory) -> int:
    """Sockets with frames in their outbox."""
    return sum(1 for proto in factory.sockets if proto._outbox)


async def open_many(daemon, n: int) -> list[Client]:
    url = ws_url(daemon, "/api/v1/devices/gate-01/packets/socket", auth=daemon.admin_key)
    return [await Client.open(url) for _ in range(n)]


@pytest_twisted.ensureDeferred
async def test_every_socket_gets_every_event_in_order_one_per_frame(daemon):
    await daemon.put_device("gate-01")
    clients = await open_many(daemon, SOCKETS)
    try:
        batch = [{"payload": {"n": i}} for i in range(30)]  # one group commit: one turn's broadcasts
        status, stored = await daemon.request("POST", "/api/v1/devices/gate-01/packets", batch)
        assert status == 201
        single = []
        for i in range(5):
            status, one = await daemon.request("POST", "/api/v1/devices/gate-01/packets", {"payload": {"n": 30 + i}})
            assert status == 201
            single.append(one)
        want = [e["id"] for e in stored] + [e["id"] for e in single]
        for client in clients:
            frames = await client.recv_many(len(want))
            assert all(isinstance(f, list) and len(f) == 1 for f in frames)
            assert [f[0]["body"]["id"] for f in frames] == want
            assert [f[0]["body"]["payload"]["n"] for f in frames] == list(range(35))
    finally:
        for client in clients:
            await client.close()


@pytest_twisted.ensureDeferred
async def test_a_close_frame_goes_after_the_frames_queued_before_it(daemon):
    await daemon.put_device("gate-01")
    clients = await open_many(daemon, SOCKETS)
    try:
        factory = sockets_of(daemon, "element")
        sent = []

        def close_first():
            # the broadcast queued frames; before the turn's flush, one socket is closed
            for proto in list(factory.sockets):
                if proto._outbox:
                    proto.close(4000, "closing")
                    sent.append(proto)
                    break

        around_flush(factory, before=close_first)
        status, stored = await daemon.request("POST", "/api/v1/devices/gate-01/packets", {"payload": {"n": 1}})
        assert status == 201 and len(sent) == 1
        got_close = 0
        for client in clients:
            frame = await client.recv_json()  # the event comes first on every socket, the closed one too
            assert frame[0]["body"]["id"] == stored["id"]
            try:
                await in_thread(client.conn.recv, 0.3)
            except TimeoutError:
                continue
            except Exception as e:  # ConnectionClosed: the close frame came after the event
                assert getattr(getattr(e, "rcvd", None), "code", None) == 4000
                got_close += 1
        assert got_close == 1
    finally:
        for client in clients:
            await client.close()


@pytest_twisted.ensureDeferred
async def test_a_flush_in_chunks_with_events_coming_meanwhile_loses_and_reorders_nothing(daemon, monkeypatch):
    """A flush writes FLUSH_CHUNK sockets per reactor turn (here 4 of 19: five turns); events
    committed meanwhile join the outboxes not yet written, or the next (paced) round."""
    monkeypatch.setattr(factory_module, "FLUSH_CHUNK", 4)
    await daemon.put_device("gate-01")
    clients = await open_many(daemon, SOCKETS)
    try:
        factory = sockets_of(daemon, "element")
        written = []  # per call of the flush: how many outboxes it wrote
        waiting = []

        around_flush(factory, before=lambda: waiting.append(queued(factory)),
                     after=lambda: written.append(waiting.pop() - queued(factory)))
        posts = [daemon.request("POST", "/api/v1/devices/gate-01/packets", {"payload": {"n": i}}) for i in range(20)]
        stored = [body for status, body in [await p for p in posts] if status == 201]
        assert len(stored) == 20
        want = sorted(e["id"] for e in stored)  # published in commit order
        for client in clients:
            frames = await client.recv_many(len(want))
            assert [f[0]["body"]["id"] for f in frames] == want
        assert len(written) >= 5 and max(written) == 4  # chunked: never more than 4 per turn
        assert sum(written) >= SOCKETS
    finally:
        for client in clients:
            await client.close()

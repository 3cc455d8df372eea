"""Event sockets: replay with ``after`` (order, batching, limit, the live seam) and preloads."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import defer

from iotd.timefmt import parse_iso
from ws_helpers import Client, RawClient, eventually, in_thread, sleep, sockets_of, ws_url


async def packets(daemon, device: str, count: int, **extra) -> list[dict]:
    items = [dict({"payload": {"n": n}}, **extra) for n in range(count)]
    status, stored = await daemon.request("POST", f"/api/v1/devices/{device}/packets", items)
    assert status == 201, stored
    return stored


async def reading(daemon, device: str, **body) -> dict:
    body.setdefault("data", {"temperature": 21.5})
    status, stored = await daemon.request("POST", f"/api/v1/devices/{device}/readings", body)
    assert status == 201, stored
    return stored


def socket_url(daemon, part="packets", device="gate-01", **query) -> str:
    return ws_url(daemon, f"/api/v1/devices/{device}/{part}/socket", auth=daemon.admin_key, **query)


@pytest_twisted.ensureDeferred
async def test_replay_sends_strictly_later_events_earliest_first_then_live(daemon):
    await daemon.put_device("gate-01")
    await daemon.put_device("gate-02")
    stored = await packets(daemon, "gate-01", 5)
    await packets(daemon, "gate-02", 2)
    client = await Client.open(socket_url(daemon, after=stored[1]["inserted_at"]))
    try:
        replay = await client.recv_json()
        assert [e["body"] for e in replay] == stored[2:]  # one batch, strictly after, in order
        assert all(e["event"] == "packet_added" for e in replay)
        # the replay has handed over to live (events ingested before that are part of the replay)
        await eventually(lambda: all(s._live for s in sockets_of(daemon, "element").sockets))
        live = await packets(daemon, "gate-01", 2)
        assert await client.frames(2) == [[{"event": "packet_added", "body": b}] for b in live]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_after_with_an_offset_and_after_in_the_future(daemon):
    await daemon.put_device("gate-01")
    stored = await packets(daemon, "gate-01", 3)
    micros = parse_iso(stored[0]["inserted_at"])
    local = (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=micros)).astimezone(
        timezone(timedelta(hours=2)))
    client = await Client.open(socket_url(daemon, after=local.isoformat()))
    assert [e["body"]["id"] for e in await client.recv_json()] == [s["id"] for s in stored[1:]]
    await client.close()

    client = await Client.open(socket_url(daemon, after="2999-01-01T00:00:00Z"))
    await client.silent(0.2)
    live = await packets(daemon, "gate-01", 1)
    assert (await client.recv_json())[0]["body"] == live[0]
    await client.close()


@pytest_twisted.ensureDeferred
async def test_replay_batches_up_to_100_events_a_frame(daemon):
    await daemon.put_device("gate-01")
    first = await packets(daemon, "gate-01", 1)
    stored = await packets(daemon, "gate-01", 250)
    client = await Client.open(socket_url(daemon, after=first[0]["inserted_at"]))
    try:
        frames = await client.frames(3)
        assert [len(f) for f in frames] == [100, 100, 50]
        assert [e["body"]["id"] for f in frames for e in f] == [s["id"] for s in stored]
        await client.silent(0.1)
    finally:
        await client.close()


@pytest.mark.parametrize("daemon_config", [{"websocket": {"replay_limit": "150"}}])
@pytest_twisted.ensureDeferred
async def test_replay_past_the_limit_closes_with_4000_and_resumes(daemon):
    await daemon.put_device("gate-01")
    start = await packets(daemon, "gate-01", 1)
    stored = await packets(daemon, "gate-01", 200)
    client = await Client.open(socket_url(daemon, after=start[0]["inserted_at"]))
    got = await client.events(150)
    assert [e["body"]["id"] for e in got] == [s["id"] for s in stored[:150]]
    assert await client.closed() == (4000, "replay limit")
    # the client resumes with after = the last inserted_at it got, and loses nothing
    client = await Client.open(socket_url(daemon, after=got[-1]["body"]["inserted_at"]))
    rest = await client.events(50)
    assert [e["body"]["id"] for e in rest] == [s["id"] for s in stored[150:]]
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_slows_its_replay_and_is_not_cut(daemon):
    await daemon.put_device("gate-01")
    start = await packets(daemon, "gate-01", 1)
    stored = []
    for _ in range(10):  # 1,000 events of about 8 KB: more than the kernel's socket buffers
        stored += await packets(daemon, "gate-01", 100, payload="ab" * 4000, payload_encoding="binary")
    after = start[0]["inserted_at"].replace(":", "%3A")
    raw = await RawClient.open(daemon, f"/api/v1/devices/gate-01/packets/socket?auth={daemon.admin_key}&after={after}")
    try:
        assert raw.status == 101
        await sleep(0.5)
        (sock,) = sockets_of(daemon, "element").sockets
        assert sock._follower is not None  # still replaying: it waits for the client
        assert sock._follower.last_id < stored[-1]["id"]
        assert sock.state == sock.STATE_OPEN and not sock._cut
        events = await in_thread(raw.read_events, len(stored))
        assert [e["body"]["id"] for e in events] == [s["id"] for s in stored]
    finally:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_events_a_replay_read_before_the_bus_published_them_arrive_once(daemon):
    """A reader thread can see a commit before the reactor publishes it.  The socket must not go
    live (and get those events a second time from the bus) before the bus has caught up."""
    from iotd.store import events as evsql

    await daemon.put_device("gate-01")
    start = await packets(daemon, "gate-01", 1)
    data = {"interface_id": None, "transceived_at": start[0]["transceived_at"], "payload_encoding": "json",
            "payload": {"late": True}, "packet_type": "up", "meta": {}}
    # committed, not yet published: what a replay's read sees when it beats the publication
    rows = [await daemon.ctx.store.write(evsql.insert, [("default", "packet", "GATE-01", dict(data))])
            for _ in range(3)]
    client = await Client.open(socket_url(daemon, after=start[0]["inserted_at"]))
    try:
        replayed = await client.events(3)
        assert [e["body"]["id"] for e in replayed] == [r[0][0] for r in rows]
        for r in rows:  # the publication arrives late
            daemon.ctx.events.committed(r)
        later = await packets(daemon, "gate-01", 1)
        live = await client.events(1)
        assert [e["body"]["id"] for e in live] == [later[0]["id"]]  # not the three again
        await client.silent(0.3)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_no_gap_and_no_duplicate_while_ingest_runs_during_the_replay(daemon):
    await daemon.put_device("gate-01")
    await daemon.put_device("gate-02")
    start = await packets(daemon, "gate-01", 1)
    await packets(daemon, "gate-01", 300)  # a replay of several pages
    stop = [False]

    async def pump(device: str) -> None:
        while not stop[0]:
            status, _ = await daemon.request("POST", f"/api/v1/devices/{device}/packets", {"payload": "x"})
            assert status == 201

    pumps = [defer.Deferred.fromCoroutine(pump(d)) for d in ("gate-01", "gate-01", "gate-02")]
    await sleep(0.1)
    client = await Client.open(socket_url(daemon, after=start[0]["inserted_at"]))
    try:
        received = await client.events(320)
        await sleep(0.3)  # ingest keeps going after the seam
        stop[0] = True
        await defer.gatherResults(pumps)
        after_id = await daemon.ctx.events.id_at(parse_iso(start[0]["inserted_at"]))
        expected = [e.id for e in await daemon.ctx.events.read("default", ["packet"], after_id, 100000, ["GATE-01"])]
        assert len(expected) > 330
        received += await client.events(len(expected) - len(received))
        ids = [e["body"]["id"] for e in received]
        assert ids == expected  # exactly the stored sequence: no gap, no duplicate
        await client.silent(0.2)
    finally:
        stop[0] = True
        await client.close()


# -- preloads ---------------------------------------------------------------------

DEVICE = {"name": "Main gate", "tags": ["building-a"], "fields": {"serial": "X1"},
          "interfaces": [{"id": "lan", "type": "tcp"}]}


@pytest_twisted.ensureDeferred
async def test_packet_preloads_embed_the_device(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    plain = await Client.open(socket_url(daemon))
    device_only = await Client.open(socket_url(daemon, preload="device"))
    full = await Client.open(socket_url(daemon, preload="device.fields,device.interfaces"))
    try:
        stored = (await packets(daemon, "gate-01", 1, interface="lan"))[0]
        assert (await plain.recv_json())[0]["body"] == stored
        body = (await device_only.recv_json())[0]["body"]
        assert body["device"] == {"id": "GATE-01", "name": "Main gate", "slug": "gate-01", "tags": ["building-a"]}
        assert {k: v for k, v in body.items() if k != "device"} == stored
        body = (await full.recv_json())[0]["body"]
        assert body["device"] == {"id": "GATE-01", "name": "Main gate", "slug": "gate-01", "tags": ["building-a"],
                                  "fields": {"serial": "X1"}, "interfaces": [{"id": "lan", "type": "tcp"}]}
    finally:
        for client in (plain, device_only, full):
            await client.close()


@pytest_twisted.ensureDeferred
async def test_reading_preloads_embed_packet_and_interface_live_and_in_replay(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    pkt = (await packets(daemon, "gate-01", 1, interface="lan"))[0]
    first = await reading(daemon, "gate-01", packet_id=pkt["id"])
    url = socket_url(daemon, part="readings", preload="packet.interface,device")
    live = await Client.open(url)
    replay = await Client.open(socket_url(daemon, part="readings", preload="packet.interface,device",
                                          after=pkt["inserted_at"]))
    try:
        body = (await replay.recv_json())[0]["body"]
        assert body["id"] == first["id"]
        assert body["packet"] == dict(pkt, interface={"id": "lan", "type": "tcp"})
        assert body["device"]["id"] == "GATE-01" and "fields" not in body["device"]

        second = await reading(daemon, "gate-01", packet_id=pkt["id"])
        no_packet = await reading(daemon, "gate-01")
        sockets_of(daemon, "element").packets.cache.clear()  # not cached any more: read from the store
        third = await reading(daemon, "gate-01", packet_id=pkt["id"], data={"t": 3})
        for client in (live, replay):
            bodies = [f[0]["body"] for f in await client.frames(3)]
            assert [b["id"] for b in bodies] == [second["id"], no_packet["id"], third["id"]]
            assert bodies[0]["packet"]["id"] == pkt["id"] and bodies[0]["packet"]["interface"]["id"] == "lan"
            assert bodies[1]["packet"] is None
            assert bodies[2]["packet"]["id"] == pkt["id"] and bodies[2]["data"] == {"t": 3}
    finally:
        await live.close()
        await replay.close()


@pytest_twisted.ensureDeferred
async def test_packet_preload_of_a_packet_pruned_meanwhile_is_null(daemon):
    await daemon.put_device("gate-01", **DEVICE)
    (pkt,) = await packets(daemon, "gate-01", 1)
    stored = await reading(daemon, "gate-01", packet_id=pkt["id"])
    # retention prunes the packet but not the reading; nothing is cached any more
    assert await daemon.ctx.events.prune(parse_iso(stored["inserted_at"])) == 1
    sockets_of(daemon, "element").packets.cache.clear()
    client = await Client.open(socket_url(daemon, part="readings", preload="packet", after=pkt["inserted_at"]))
    try:
        body = (await client.recv_json())[0]["body"]
        assert body["id"] == stored["id"] and body["packet"] is None and "device" not in body
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_replay_from_before_what_retention_kept_sends_the_rest_and_is_counted(daemon):
    from iotd import metrics

    await daemon.put_device("gate-01")
    stored = await packets(daemon, "gate-01", 6)
    assert await daemon.ctx.events.prune(parse_iso(stored[3]["inserted_at"])) == 3
    counted = metrics.replays_pruned.labels("packet")._value.get()
    client = await Client.open(socket_url(daemon, after=stored[0]["inserted_at"]))
    try:
        assert [e["body"] for e in await client.recv_json()] == stored[3:]  # what remains, as ELEMENT does
    finally:
        await client.close()
    assert metrics.replays_pruned.labels("packet")._value.get() == counted + 1
    client = await Client.open(socket_url(daemon, after=stored[2]["inserted_at"]))  # nothing missed
    try:
        assert [e["body"] for e in await client.recv_json()] == stored[3:]
    finally:
        await client.close()
    assert metrics.replays_pruned.labels("packet")._value.get() == counted + 1

"""The event sequencer (iotd.cluster.sequencer) on a real store: order, holes, duplicates, the tail.

Another node's commits are made here by writing events straight into the
store (as that node's writer would) and handing their rows to the sequencer
as bus messages, in whatever order or loss a test wants.  The grace timer
runs on a task.Clock; store reads are real.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

import dbutil
from iotd.cluster import sequencer as seqmod
from iotd.cluster.channel import Channel
from iotd.cluster.sequencer import Sequencer
from iotd.events import EventLog
from iotd.store import events as evsql


class FakeChannel(Channel):
    """The channel of a node whose messages the test delivers by hand; what it sends is kept."""

    def __init__(self) -> None:
        super().__init__("here")
        self.sent: list[tuple[str, str]] = []

    def send(self, topic: str, text: str) -> None:
        self.sent.append((topic, text))


@pytest_twisted.async_yield_fixture
async def env(tmp_path):
    """``(store, log, clock, channel, seq, got)``: a sequencer on a real store; ``got`` the ids delivered."""
    store = dbutil.new_store(tmp_path / "seq.sqlite3", reactor)
    await store.start()
    try:
        log = EventLog(store)
        await log.start()
        clock = Clock()
        channel = FakeChannel()
        seq = Sequencer(log, channel, clock)
        log.sequencer = seq
        got: list[int] = []
        log.bus.subscribe(lambda e: got.append(e.id))
        yield store, log, clock, channel, seq, got
    finally:
        await store.stop()


async def other_node_commits(store, count: int, tenant: str = "default") -> list[evsql.Row]:
    return await store.write(evsql.insert, [(tenant, "packet", "X", {"n": n}) for n in range(count)])


async def settle(seq) -> None:
    for _ in range(100):
        if not seq._filling:
            return
        await deferLater(0.01)


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_lost_message_is_read_from_the_store_and_a_late_copy_is_not_delivered_again(env):
    store, log, clock, channel, seq, got = env
    rows = await other_node_commits(store, 5)
    ids = [r[0] for r in rows]
    seq.remote("b", {"e": [list(r) for r in rows[2:]]})  # the message with the first two was lost
    assert got == []  # nothing skips ahead of the hole
    clock.advance(seqmod.HOLE_GRACE)
    await settle(seq)
    assert got == ids and seq.filled == 2
    seq.remote("b", {"e": [list(r) for r in rows[:2]]})  # the lost one arrives late after all
    seq.remote("b", {"e": [list(r) for r in rows]})  # and everything twice
    assert got == ids


@pytest_twisted.ensureDeferred
async def test_a_message_arriving_within_the_grace_needs_no_store_read(env):
    store, log, clock, channel, seq, got = env
    rows = await other_node_commits(store, 3)
    seq.remote("b", {"e": [list(rows[2])]})
    seq.remote("b", {"e": [list(r) for r in rows[:2]]})
    assert got == [r[0] for r in rows] and seq.filled == 0


@pytest_twisted.ensureDeferred
async def test_own_commits_wait_for_another_nodes_earlier_event_and_are_sent_on_the_bus(env):
    store, log, clock, channel, seq, got = env
    theirs = await other_node_commits(store, 1)
    mine = await log.append([("default", "packet", "Y", {"n": 1})])  # committed after theirs
    assert got == []  # its predecessor has not come yet
    assert channel.sent and channel.sent[-1][0] == "events"
    seq.remote("b", {"e": [list(theirs[0])]})
    assert got == [theirs[0][0], mine[0].id]


@pytest_twisted.ensureDeferred
async def test_the_last_events_of_a_burst_come_from_the_tail_check_when_their_message_is_lost(env):
    store, log, clock, channel, seq, got = env
    rows = await other_node_commits(store, 4)  # no message at all
    await seq.check_tail()
    await settle(seq)
    assert got == [r[0] for r in rows]


@pytest_twisted.ensureDeferred
async def test_a_batch_too_large_for_a_message_is_announced_by_its_last_id(env):
    store, log, clock, channel, seq, got = env
    big = "x" * (seqmod.MAX_MESSAGE_BYTES + 10)
    mine = await log.append([("default", "packet", "Y", {"blob": big})])
    assert got == [mine[0].id]
    topic, text = channel.sent[-1]
    assert len(text) < 200 and '"upto"' in text  # only the id went on the bus
    rows = await other_node_commits(store, 2)
    seq.remote("b", {"upto": rows[-1][0]})  # another node's large batch
    await settle(seq)
    assert got == [mine[0].id] + [r[0] for r in rows]


@pytest_twisted.ensureDeferred
async def test_waiting_events_are_bounded_in_bytes_and_still_all_delivered(monkeypatch, env):
    monkeypatch.setattr(seqmod, "MAX_PENDING_BYTES", 4096)
    store, log, clock, channel, seq, got = env
    rows = await other_node_commits(store, 60)
    seq.remote("b", {"e": [list(r) for r in rows[1:]]})  # 59 events wait for the first
    assert seq._pending_bytes <= 4096  # dropped past the bound: the store has them
    clock.advance(seqmod.HOLE_GRACE)
    await settle(seq)
    assert got == [r[0] for r in rows]


@pytest_twisted.ensureDeferred
async def test_a_malformed_message_is_dropped(env):
    store, log, clock, channel, seq, got = env
    channel.received("events", "not json")
    channel.received("events", '{"n": "b", "m": {"e": [["x"]]}}')
    channel.received("events", '{"n": "b", "m": {"e": 5}}')
    rows = await other_node_commits(store, 1)
    channel.received("events", channel.encode({"e": [list(rows[0])]}).replace('"here"', '"b"'))
    assert got == [rows[0][0]]

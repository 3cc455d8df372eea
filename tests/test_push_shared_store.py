"""Two command services, each with its own Store object, on ONE database -- and no bus.

Like two iotd processes on one database: each has its own writer, readers,
registry, event log and memory.  The store is the authority for commands, so
concurrent polls through both never hand out two commands for one device, a
result posted to either completes the command the other handed out, work
queued through one reaches the other's idle polls within the refresh
interval, and a timed-out last attempt fails once.

Time is a task.Clock (shared by both, as wall time is by two processes); the
database is a real SQLite file or a real PostgreSQL database (the backend fixture).  :func:`open_store` is the one place that
says which backend.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer

from iotd.config import PushSection
from iotd.events import EventLog
from iotd.push import CommandService
from iotd.push.work import REFRESH_EVERY
from iotd.registry import Registry
from iotd.store import Store
import dbutil
from push_helpers import ClockReactor, new_clock

TIMEOUT, ATTEMPTS, OFFLINE = 60.0, 3, 600.0
DEVICES = 25


def open_store(database: str, reactor) -> Store:
    """A new Store object on the shared database (one per simulated process), on the test's backend."""
    return dbutil.new_store(database, reactor)


@pytest.fixture
def database(tmp_path) -> str:
    return str(tmp_path / "shared.sqlite3")


class Node:
    """One 'process': its own store object, registry, event log and command service."""

    def __init__(self, name: str, database: str, clock):
        self.name = name
        self.database = database
        self.clock = clock
        self.published: list = []

    async def start(self, **push) -> "Node":
        cfg = PushSection(**{"command_timeout": TIMEOUT, "max_attempts": ATTEMPTS, "offline_after": OFFLINE,
                             **push})
        self.store = open_store(self.database, ClockReactor(self.clock))
        await self.store.start()
        self.registry = Registry(self.store, self.clock)
        await self.registry.start()
        self.events = EventLog(self.store)
        self.events.bus.subscribe(self.published.append)
        self.svc = CommandService(self.store, self.registry, self.events, self.clock, cfg)
        self.svc.startService()
        await self.svc.load()
        return self

    async def stop(self) -> None:
        await self.svc.stopService()
        await self.registry.stop()
        await self.store.stop()

    def device(self, ident: str):
        return self.registry.get("t", ident)

    async def query(self, sql: str, *params):
        return await self.store.read(lambda conn: conn.execute(sql, params).fetchall())


@pytest_twisted.async_yield_fixture
async def nodes(database):
    """``await nodes(**push)`` -> (a, b): two started nodes on the one database, 25 devices known to both."""
    started: list[Node] = []
    clock = new_clock()

    async def make(**push):
        a = await Node("a", database, clock).start(**push)
        started.append(a)
        for n in range(DEVICES):
            await a.registry.put("t", f"D{n}", {"pushId": 100 + n})
        b = await Node("b", database, clock).start(**push)  # its registry loads the devices
        started.append(b)
        return a, b

    yield make
    for node in reversed(started):
        await node.stop()


async def action_events(node: Node, req_type: str) -> list[dict]:
    rows = await node.query("SELECT data FROM events WHERE kind = 'action' ORDER BY id")
    return [d for d in (json.loads(r[0]) for r in rows) if d["reqType"] == req_type]


async def statuses(node: Node, ids) -> list[tuple[str, int]]:
    return [((c := await node.svc.get(i)).status, c.attempts) for i in ids]


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_polls_through_two_services_hand_out_one_command_per_device(nodes):
    a, b = await nodes()
    first, second = {}, {}
    for n in range(DEVICES):
        node = a if n % 2 else b  # queued through either
        first[n] = (await node.svc.create("t", f"D{n}", {"endpoint": "load_objects", "body": {"n": n}})).id
        second[n] = (await node.svc.create("t", f"D{n}", {"endpoint": "reboot"})).id
    await a.svc.refresher.refresh()
    await b.svc.refresher.refresh()  # (both know every device has work: the polls go to the store)

    # 50 polls at once: each device polls both services before any answer.
    polls = []
    for n in range(DEVICES):
        polls.append((n, a, a.svc.hand_out(a.device(f"D{n}"))))
        polls.append((n, b, b.svc.hand_out(b.device(f"D{n}"))))
    got = await defer.gatherResults([d for _, _, d in polls])
    handed: dict[int, list] = {n: [] for n in range(DEVICES)}
    for (n, node, _), cmd in zip(polls, got):
        if cmd is not None:
            handed[n].append((node, cmd))
    for n in range(DEVICES):
        assert [cmd.id for _, cmd in handed[n]] == [first[n]], n  # exactly one, the oldest
    assert await statuses(a, first.values()) == [("sent", 1)] * DEVICES
    assert await statuses(b, second.values()) == [("queued", 0)] * DEVICES
    sends = await action_events(a, "req")
    assert sorted(int(e["msgToken"]) for e in sends) == sorted(first.values())  # one send event each

    # Each device posts its result to the OTHER service than the one that handed the command out.
    for n in range(DEVICES):
        giver = handed[n][0][0]
        other = b if giver is a else a
        done = await other.svc.complete(other.device(f"D{n}"), json.dumps({"response": json.dumps({"n": n})}).encode())
        assert done is not None and done.id == first[n] and done.status == "done"
    for node in (a, b):
        for n in range(DEVICES):
            cmd = await node.svc.get(first[n])
            assert (cmd.status, cmd.response) == ("done", {"n": n})
    assert len(await action_events(b, "resp")) == DEVICES

    # The next command of each device goes out exactly once too, through either service.
    polls = [(n, node.svc.hand_out(node.device(f"D{n}"))) for n in range(DEVICES) for node in (b, a)]
    got = await defer.gatherResults([d for _, d in polls])
    for n in range(DEVICES):
        assert [c.id for (m, _), c in zip(polls, got) if m == n and c is not None] == [second[n]]


@pytest_twisted.ensureDeferred
async def test_a_result_posted_to_either_service_completes_the_command(nodes):
    a, b = await nodes()
    cmd = await a.svc.create("t", "D0", {"endpoint": "load_objects"})
    sent = await a.svc.hand_out(a.device("D0"))
    assert sent.id == cmd.id
    # b never saw this command in memory; its result goes to the store all the same.
    done = await b.svc.complete(b.device("D0"), b'{"error": "object not found"}')
    assert (done.id, done.status, done.error) == (cmd.id, "failed", "object not found")
    assert (await a.svc.get(cmd.id)).status == "failed"
    # A duplicate of that result, to a, is an orphan and changes nothing.
    assert await a.svc.complete(a.device("D0"), b'{"response": "{}"}') is None
    got = await a.svc.get(cmd.id)
    assert (got.status, got.error, got.response_raw) == ("failed", "object not found", None)
    # a's memory learnt nothing wrong: its next poll of D0 is idle and answered from memory.
    assert a.svc.hand_out_then(a.device("D0"), lambda *args: None) is False


@pytest_twisted.ensureDeferred
async def test_a_command_queued_through_one_reaches_the_others_idle_polls_within_the_refresh(nodes):
    a, b = await nodes()
    dev = b.device("D3")
    assert await b.svc.hand_out(dev) is None
    reads = []
    real_read = b.store.read
    b.store.read = lambda *args: reads.append(args) or real_read(*args)
    try:
        cmd = await a.svc.create("t", "D3", {"endpoint": "load_objects", "body": {"object": "users"}})
        # Until b's refresh, its idle polls stay memory lookups (no store access) and answer empty.
        assert b.svc.hand_out_then(dev, lambda *args: None) is False
        a.clock.advance(REFRESH_EVERY / 2)
        assert b.svc.hand_out_then(dev, lambda *args: None) is False
        assert reads == []
        a.clock.advance(REFRESH_EVERY / 2)  # b's refresh reads which devices have work
        await b.svc.settle()
    finally:
        b.store.read = real_read
    assert b.svc.has_work("t", "D3")
    got = await b.svc.hand_out(dev)
    assert got.id == cmd.id and got.body == {"object": "users"}
    assert (await a.svc.get(cmd.id)).status == "sent"


@pytest_twisted.ensureDeferred
async def test_wait_on_one_service_returns_when_the_other_completes(nodes):
    a, b = await nodes()
    cmd = await b.svc.create("t", "D1", {"endpoint": "load_objects"})
    waited = b.svc.wait(cmd, 30)
    await a.svc.refresher.refresh()
    assert (await a.svc.hand_out(a.device("D1"))).id == cmd.id
    await a.svc.complete(a.device("D1"), b'{"response": "{\\"ok\\": true}"}')
    assert not waited.called
    a.clock.advance(REFRESH_EVERY)  # b's refresh sees the command is no longer unfinished
    await b.svc.settle()
    got = await waited
    assert got.status == "done" and got.shown_response == {"ok": True}


@pytest_twisted.ensureDeferred
async def test_a_timed_out_last_attempt_fails_once_although_both_services_sweep(nodes):
    a, b = await nodes(max_attempts=1)
    cmd = await a.svc.create("t", "D2", {"endpoint": "reboot"})
    nxt = await a.svc.create("t", "D2", {"endpoint": "load_objects"})
    assert (await a.svc.hand_out(a.device("D2"))).id == cmd.id
    a.clock.advance(TIMEOUT)  # a's deadline and b's backstop: both sweeps find it due
    await a.svc.settle()
    await b.svc.settle()
    got = await b.svc.get(cmd.id)
    assert (got.status, got.error) == ("failed", "no result after 1 attempts")
    resp = await action_events(a, "resp")
    assert [(e["msgToken"], e["code"]) for e in resp] == [(str(cmd.id), 500)]  # one event, not two
    assert (await b.svc.hand_out(b.device("D2"))).id == nxt.id


@pytest_twisted.ensureDeferred
async def test_the_refresh_reads_only_commands_queued_lately_yet_finds_work_queued_by_the_other(nodes):
    from iotd.push import work as workmod
    from iotd.store import commands as cmdsql

    a, b = await nodes()
    for n in range(DEVICES):
        await a.svc.create("t", f"D{n}", {"endpoint": "load_objects"})
    await b.svc.refresher.refresh()
    assert all(b.svc.has_work("t", f"D{n}") for n in range(DEVICES))
    read: list[int] = []
    real = cmdsql.unfinished_since

    def counting(conn, after_id):
        rows, top = real(conn, after_id)
        read.append(len(rows))
        return rows, top

    cmdsql.unfinished_since = counting
    try:
        a.clock.advance(workmod.LAG + 1)
        await b.svc.refresher.refresh()  # the mark now trails behind every command above
        await b.svc.refresher.refresh()
        assert read[-1] == 0  # 25 unfinished commands, none read again
        b.svc.work.devices.clear()  # (as if b had never heard of them: old work stays b's to know)
        await a.svc.create("t", "D0", {"endpoint": "reboot"})  # new work, no bus between them
        await b.svc.refresher.refresh()
        assert read[-1] == 1 and b.svc.has_work("t", "D0")
    finally:
        cmdsql.unfinished_since = real

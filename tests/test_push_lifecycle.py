"""The command lifecycle (iotd.push) on a task.Clock with a real store (each backend).

queued -> sent -> done / failed / cancelled; one command in flight per device;
resend after command_timeout; give up after max_attempts (found by the sweep
even if the device never polls again); online/offline conn events; a restart
keeps queued and sent commands.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer

from iotd import errors
from iotd.push import CommandService, parse_result
from iotd.config import PushSection
from iotd.events import EventLog
from iotd.registry import Registry
import dbutil
from push_helpers import ClockReactor, new_clock

TIMEOUT, ATTEMPTS, OFFLINE = 60.0, 3, 90.0


class World:
    """A store, registry, event log and command service sharing one Clock."""

    def __init__(self, path, clock=None):
        self.path = path
        self.clock = clock or new_clock()
        self.events_seen: list = []
        self.stopped = False

    async def start(self, **push) -> "World":
        cfg = PushSection(**{"command_timeout": TIMEOUT, "max_attempts": ATTEMPTS, "offline_after": OFFLINE,
                             **push})
        self.store = dbutil.new_store(self.path, ClockReactor(self.clock))
        await self.store.start()
        self.registry = Registry(self.store, self.clock)
        await self.registry.start()
        self.events = EventLog(self.store)
        self.events.bus.subscribe(self.events_seen.append)
        self.svc = CommandService(self.store, self.registry, self.events, self.clock, cfg)
        self.registry.add_delete_listener(self.svc.device_deleted)
        self.svc.startService()
        await self.svc.load()
        return self

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.svc.stopService()
        await self.registry.stop()
        await self.store.stop()

    async def device(self, ident: str, push_id: int, tenant: str = "t"):
        device, _ = await self.registry.put(tenant, ident, {"pushId": push_id})
        return device

    async def queue(self, device, endpoint: str = "load_objects", **spec):
        return await self.svc.create(device.tenant, device.identifier, {"endpoint": endpoint, **spec})

    async def poll(self, device):
        """What /push would answer: the command (after its send committed) or None."""
        self.svc.seen(device, "192.0.2.1")
        return await self.svc.hand_out(device)

    async def result(self, device, body) -> bool:
        cmd = await self.svc.complete(device, json.dumps(body).encode() if not isinstance(body, bytes) else body)
        return cmd is not None

    def row(self, command_id: int) -> dict:
        conn = dbutil.connect(self.store)
        try:
            cur = conn.execute("SELECT * FROM commands WHERE id = ?", (command_id,))
            row = cur.fetchone()
            return dict(zip([c[0] for c in cur.description], row)) if row is not None else None
        finally:
            conn.close()

    def kinds(self, kind: str) -> list[dict]:
        return [e.data for e in self.events_seen if e.kind == kind]

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.svc.settle()


@pytest_twisted.async_yield_fixture
async def make(tmp_path):
    """``await make(clock=None, **push)``: a started World on the test's one SQLite file."""
    made: list[World] = []

    async def factory(clock=None, **push) -> World:
        w = await World(str(tmp_path / "q.sqlite3"), clock).start(**push)
        made.append(w)
        return w

    yield factory
    for w in made:
        await w.stop()


@pytest_twisted.async_yield_fixture
async def world(make):
    yield await make()


@pytest_twisted.ensureDeferred
async def test_commands_go_out_oldest_first_one_at_a_time(world):
    dev = await world.device("D1", 1)
    first = await world.queue(dev, "load_objects", body={"object": "users"})
    second = await world.queue(dev, "set_configuration.fcgi")
    got = await world.poll(dev)
    assert got.id == first.id and got.status == "sent" and got.attempts == 1
    # The device polls again without a result: nothing (the first is in flight), not the second.
    assert await world.poll(dev) is None
    assert world.row(second.id)["status"] == "queued"
    assert await world.result(dev, {"response": "{}"})
    assert world.row(first.id)["status"] == "done"
    assert (await world.poll(dev)).id == second.id


@pytest_twisted.ensureDeferred
async def test_two_polls_in_the_same_instant_never_get_two_commands(world):
    dev = await world.device("D1", 1)
    for n in range(3):
        await world.queue(dev, body={"n": n})
    # Both polls are issued before either send is committed.
    got = await defer.gatherResults([world.svc.hand_out(dev), world.svc.hand_out(dev)])
    assert [c.id for c in got if c is not None] == [1]
    assert [world.row(i)["status"] for i in (1, 2, 3)] == ["sent", "queued", "queued"]


@pytest_twisted.ensureDeferred
async def test_sent_command_goes_out_again_after_command_timeout(world):
    dev = await world.device("D1", 1)
    cmd = await world.queue(dev, body={"object": "users"})
    await world.poll(dev)
    await world.advance(TIMEOUT - 1)
    assert await world.poll(dev) is None  # still within the timeout
    await world.advance(1)
    again = await world.poll(dev)
    assert again.id == cmd.id and again.attempts == 2
    row = world.row(cmd.id)
    assert row["status"] == "sent" and row["attempts"] == 2
    sends = [e for e in world.kinds("action") if e["reqType"] == "req"]
    assert len(sends) == 2 and all(e["msgToken"] == str(cmd.id) for e in sends)


@pytest_twisted.ensureDeferred
async def test_gives_up_after_max_attempts_even_if_the_device_never_polls_again(world):
    dev = await world.device("D1", 1)
    cmd = await world.queue(dev, "reboot")
    nxt = await world.queue(dev, "load_objects")
    for attempt in range(1, ATTEMPTS + 1):
        got = await world.poll(dev)
        assert got.id == cmd.id and got.attempts == attempt
        if attempt < ATTEMPTS:
            await world.advance(TIMEOUT)
    await world.advance(TIMEOUT - 0.5)
    assert world.row(cmd.id)["status"] == "sent"
    await world.advance(0.5)  # the sweep, no poll
    row = world.row(cmd.id)
    assert row["status"] == "failed" and row["error"] == f"no result after {ATTEMPTS} attempts"
    assert row["finished_us"] is not None
    resp = [e for e in world.kinds("action") if e["reqType"] == "resp"]
    assert resp == [{"dir": "down", "reqType": "resp", "actionID": "reboot", "params": None, "code": 500,
                     "msg": f"no result after {ATTEMPTS} attempts", "msgToken": str(cmd.id), "response": None}]
    # The next command goes out on the next poll.
    assert (await world.poll(dev)).id == nxt.id


@pytest_twisted.ensureDeferred
async def test_poll_at_the_last_deadline_fails_the_command_and_sends_the_next(make):
    w = await make(max_attempts=1)
    dev = await w.device("D1", 1)
    first = await w.queue(dev, "a")
    second = await w.queue(dev, "b")
    await w.poll(dev)
    w.clock.rightNow += TIMEOUT  # time passes; the poll comes before the sweep runs
    got = await w.poll(dev)
    assert got.id == second.id
    await w.svc.settle()
    assert w.row(first.id)["error"] == "no result after 1 attempts"


@pytest_twisted.ensureDeferred
async def test_result_completes_the_sent_command_with_the_parsed_response(world):
    dev = await world.device("D1", 1)
    cmd = await world.queue(dev, "load_objects", body={"object": "users"})
    await world.poll(dev)
    firmware = json.dumps({"users": [{"id": 1, "name": "Walter White"}]})
    assert await world.result(dev, {"response": firmware})
    row = world.row(cmd.id)
    assert row["status"] == "done" and row["response_raw"] == firmware
    assert json.loads(row["response"]) == {"users": [{"id": 1, "name": "Walter White"}]}
    resp = [e for e in world.kinds("action") if e["reqType"] == "resp"]
    assert resp == [{"dir": "down", "reqType": "resp", "actionID": "load_objects", "params": {"object": "users"},
                     "code": 200, "msg": "", "msgToken": str(cmd.id),
                     "response": {"users": [{"id": 1, "name": "Walter White"}]}}]
    req = [e for e in world.kinds("action") if e["reqType"] == "req"]
    assert req == [{"dir": "down", "reqType": "req", "actionID": "load_objects", "params": {"object": "users"},
                    "code": 200, "msg": "", "msgToken": str(cmd.id)}]


@pytest_twisted.ensureDeferred
async def test_error_result_and_malformed_result_fail_the_command(world):
    dev = await world.device("D1", 1)
    a = await world.queue(dev, "a")
    b = await world.queue(dev, "b")
    await world.poll(dev)
    assert await world.result(dev, {"error": "object not found"})
    assert (world.row(a.id)["status"], world.row(a.id)["error"]) == ("failed", "object not found")
    await world.poll(dev)
    assert await world.result(dev, b"<html>oops")
    row = world.row(b.id)
    assert row["status"] == "failed" and row["error"].startswith("malformed result: ")
    codes = [(e["msgToken"], e["code"], e["msg"][:9]) for e in world.kinds("action") if e["reqType"] == "resp"]
    assert codes == [(str(a.id), 500, "object no"), (str(b.id), 500, "malformed")]


@pytest_twisted.ensureDeferred
async def test_result_without_a_sent_command_is_an_orphan_and_stores_nothing(world):
    dev = await world.device("D1", 1)
    cmd = await world.queue(dev, "a")
    assert not await world.result(dev, {"response": "{}"})  # queued, never sent
    assert world.row(cmd.id)["status"] == "queued"
    assert world.kinds("action") == []


@pytest_twisted.ensureDeferred
async def test_cancel_only_a_queued_command(world):
    dev = await world.device("D1", 1)
    a = await world.queue(dev, "a")
    b = await world.queue(dev, "b")
    c = await world.queue(dev, "c")
    await world.poll(dev)
    with pytest.raises(errors.Conflict):
        await world.svc.cancel(a.id)
    await world.svc.cancel(b.id)
    assert world.row(b.id)["status"] == "cancelled"
    await world.result(dev, {"response": "{}"})
    assert (await world.poll(dev)).id == c.id  # b is skipped


@pytest_twisted.ensureDeferred
async def test_deleting_a_device_cancels_its_queued_commands(world):
    dev = await world.device("D1", 1)
    a = await world.queue(dev, "a")
    b = await world.queue(dev, "b")
    await world.poll(dev)
    await world.registry.delete("t", "D1")
    await world.svc.settle()
    assert world.row(b.id)["status"] == "cancelled" and world.row(b.id)["error"] == "device deleted"
    assert world.row(a.id)["status"] == "sent"  # the sweep ends it


@pytest_twisted.ensureDeferred
async def test_online_on_first_poll_offline_after_silence_online_again(world):
    a = await world.device("A", 1)
    b = await world.device("B", 2)
    await world.poll(a)
    await world.advance(30)
    await world.poll(b)
    await world.svc.settle()
    assert [(e.device, e.data) for e in world.events_seen] == [("A", {"status": 1}), ("B", {"status": 1})]
    assert a.online and b.online
    await world.advance(OFFLINE - 30 - 0.5)
    assert [e.data for e in world.events_seen if e.data == {"status": 2}] == []
    await world.poll(b)  # b keeps polling
    await world.advance(0.5)
    offline = [(e.device, e.data["status"]) for e in world.events_seen[2:]]
    assert offline == [("A", 2)] and not a.online and b.online
    await world.advance(OFFLINE)
    assert [(e.device, e.data["status"]) for e in world.events_seen[2:]] == [("A", 2), ("B", 2)]
    await world.poll(a)
    await world.svc.settle()
    assert (world.events_seen[-1].device, world.events_seen[-1].data) == ("A", {"status": 1})
    # Polls of an online device produce no conn events.
    count = len(world.events_seen)
    await world.poll(a)
    await world.svc.settle()
    assert len(world.events_seen) == count


@pytest_twisted.ensureDeferred
async def test_idle_poll_never_touches_the_store(world):
    dev = await world.device("D1", 1)
    await world.poll(dev)
    await world.svc.settle()
    calls = []
    real_read, real_write = world.store.read, world.store.write
    world.store.read = lambda *a: calls.append(a) or real_read(*a)
    world.store.write = lambda *a: calls.append(a) or real_write(*a)
    try:
        for _ in range(100):
            assert world.svc.hand_out_then(dev, lambda *a: calls.append(a)) is False  # answered from memory
            assert await world.svc.hand_out(dev) is None
    finally:
        world.store.read, world.store.write = real_read, real_write
    assert calls == []


@pytest_twisted.ensureDeferred
async def test_wait_fires_when_finished_or_when_time_is_up(world):
    dev = await world.device("D1", 1)
    a = await world.queue(dev, "a")
    b = await world.queue(dev, "b")
    waited_a = world.svc.wait(a, 30)
    waited_b = world.svc.wait(b, 30)
    await world.poll(dev)
    await world.result(dev, {"response": '{"ok": true}'})
    got = await waited_a
    assert got.status == "done" and got.shown_response == {"ok": True}
    assert not waited_b.called
    world.clock.advance(30)
    got = await waited_b
    assert got.status == "queued"


@pytest_twisted.ensureDeferred
async def test_restart_keeps_queued_and_sent_commands(make):
    world = await make()
    dev = await world.device("D1", 1)
    a = await world.queue(dev, "a")
    b = await world.queue(dev, "b", body={"x": 1})
    await world.poll(dev)
    await world.stop()
    clock = world.clock
    clock.advance(10)
    w = await make(clock)
    dev = w.registry.get("t", "D1")
    assert w.svc.has_work("t", "D1")  # rebuilt from the store: its polls go to the store
    loaded = await w.svc.unfinished_for("t", "D1")
    assert [(c.id, c.status, c.attempts) for c in loaded] == [(a.id, "sent", 1), (b.id, "queued", 0)]
    # Still in flight until its timeout, counted from the send before the restart.
    assert await w.poll(dev) is None
    clock.advance(TIMEOUT - 10)
    again = await w.poll(dev)
    assert again.id == a.id and again.attempts == 2
    await w.result(dev, {"response": "{}"})
    nxt = await w.poll(dev)
    assert nxt.id == b.id and nxt.body == {"x": 1}


@pytest_twisted.ensureDeferred
async def test_restart_sweeps_a_sent_command_on_its_last_attempt(make):
    w = await make(max_attempts=1)
    dev = await w.device("D1", 1)
    cmd = await w.queue(dev, "a")
    await w.poll(dev)
    await w.stop()
    w2 = await make(w.clock, max_attempts=1)
    w2.clock.advance(TIMEOUT)  # nobody polls
    await w2.svc.settle()
    assert w2.row(cmd.id)["error"] == "no result after 1 attempts"


@pytest_twisted.ensureDeferred
async def test_stopping_writes_every_pending_change_before_the_store_closes(make):
    w = await make()
    a, b = await w.device("A", 1), await w.device("B", 2)
    ca, cb = await w.queue(a), await w.queue(b)
    sent_a, sent_b = w.svc.hand_out(a), w.svc.hand_out(b)  # b's send waits behind a's write
    # The service tree stops push, then the core (store) right away, without waiting.
    stopping, closing = w.svc.stopService(), defer.ensureDeferred(w.store.stop())
    await stopping
    await closing
    w.stopped = True
    got = await defer.gatherResults([sent_a, sent_b])
    assert [c.id for c in got] == [ca.id, cb.id]
    assert (w.row(ca.id)["status"], w.row(cb.id)["status"]) == ("sent", "sent")


def test_parse_result_keeps_what_firmware_sends():
    assert parse_result(b'{"response": "{\\"a\\": 1}"}') == {
        "status": "done", "response_raw": '{"a": 1}', "response": {"a": 1}, "parsed": True}
    assert parse_result(b'{"response": "not json"}') == {
        "status": "done", "response_raw": "not json", "response": None, "parsed": False}
    assert parse_result(b'{"response": {"users": []}}') == {
        "status": "done", "response_raw": '{"users":[]}', "response": {"users": []}, "parsed": True}
    assert parse_result(b'{"error": "no such object"}') == {"status": "failed", "error": "no such object"}
    assert parse_result(b"")["error"].startswith("malformed result: ")
    assert parse_result(b"[1]")["error"].startswith("malformed result: ")
    assert parse_result(b"{}")["error"].startswith("malformed result: ")

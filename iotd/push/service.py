"""The command service: the facade the web layer calls for the push command queue.

The store is the authority: every queued, sent and finished command lives
only there, and every change is one checked transaction
(:mod:`iotd.push.transactions`) written with its ``action`` events through
the event log, then published -- the device gets its command, the operator
his answer, only after that commit.  A restart loses nothing, and two
processes on one database never hand out two commands for one device.

Memory keeps only what makes idle polls cheap -- which devices have
unfinished work (:mod:`iotd.push.work`) -- plus presence
(:mod:`iotd.push.presence`), ``?wait=`` waiters (:mod:`iotd.push.waiters`)
and the sweep timers (:mod:`iotd.push.sweeps`).  So an idle poll is a set
lookup that finds nothing and never touches the store; a poll of a device
with work is one transaction.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer

from iotd import errors
from iotd.logs import Logger
from iotd.push import transactions as tx
from iotd.push.command import Command
from iotd.push.pending import Pending
from iotd.push.polls import Polls
from iotd.cluster.node import single
from iotd.push.presence import Presence
from iotd.push.shared_presence import SharedPresence
from iotd.push.sweeps import Sweeps
from iotd.push.tally import Tally
from iotd.push.waiters import Waiters
from iotd.push.work import REFRESH_EVERY, Refresher, Work
from iotd.store import commands as cmdsql
from iotd.timefmt import micros_of

MAX_ID = 2**63 - 1
COUNT_EVERY = 10  # refreshes between two reads of the unfinished counts (the gauges)
TOPIC = "push"  # between nodes: {"w": [tenant, device]} work queued, {"f": id} a command finished


class CommandService(service.Service):
    """The command queue: create, hand out, complete, cancel, wait; presence and sweeps."""

    log = Logger()
    name = "push"

    def __init__(self, store: Any, registry: Any, events: Any, clock: Any, config: Any,
                 refresh_every: float = REFRESH_EVERY, cluster: Any = None):
        self._store = store
        self._registry = registry
        self._events = events
        self._clock = clock
        self.command_timeout = float(config.command_timeout)
        self.max_attempts = int(config.max_attempts)
        self.command_ttl = float(getattr(config, "command_ttl", 0.0))  # seconds; 0 = never
        self._pending = Pending()
        self.tally = Tally()
        self.work = Work()
        self.cluster = cluster if cluster is not None else single()
        offline_after = float(config.offline_after)
        self.presence: Presence | SharedPresence = (
            SharedPresence(registry, events, clock, offline_after, self._pending, store) if self.cluster.clustered
            else Presence(registry, events, clock, offline_after, self._pending))
        self.waiters = Waiters(clock, self.get)
        self.waiters.announce = self._announce_finished
        self.polls = Polls(events, clock, self.work, self.tally, self.waiters, self._pending,
                           self.command_timeout, self.max_attempts)
        self.sweeps = Sweeps(store, clock, self._pending, self.presence, self.command_timeout,
                             self.max_attempts, self.polls.give_up, self.polls.expire)
        self.polls.last_attempt_sent = self.sweeps.last_attempt_sent
        self._refreshes = 0
        self.refresher = Refresher(store, clock, self.work, self._pending, self._refreshed, refresh_every)
        # The device side, bound once (the idle poll is one call): see iotd.push.polls.
        self.hand_out_then = self.polls.hand_out_then
        self.hand_out = self.polls.hand_out
        self.complete_then = self.polls.complete_then
        self.complete = self.polls.complete
        # seen(device, address): a poll or result from ``device`` (lastSeen/lastAddress, online, conn event)
        self.seen = self.presence.seen
        self.ready = False
        self.load_failed = False
        self._ready_waiters: list[defer.Deferred] = []
        self.cluster.subscribe(TOPIC, self._message)
        self.cluster.leader.on_change(self._leadership)

    # -- life cycle -----------------------------------------------------------

    async def load(self) -> None:
        """Learn from the store which devices have work (a restart keeps queued and sent commands)."""
        try:
            rows = await self._store.read(cmdsql.unfinished)
            counts = await self._store.read(cmdsql.count_by_status)
        except Exception:
            self.load_failed = True
            self.log.failure("could not load the command queue")
            for d in self._ready_waiters:
                d.errback(errors.Unavailable("the command queue could not be loaded"))
            self._ready_waiters = []
            raise
        self.work.merge((tenant, device) for _, tenant, device, _ in rows)
        self.tally.load(counts)
        await self.presence.load()
        self.ready = True
        self.log.info("command queue loaded: {queued} queued, {sent} sent",
                      queued=self.tally.counts["queued"], sent=self.tally.counts["sent"])
        if self.running:
            await self._start_timers()  # (the first sweep: last attempts that timed out while stopped)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    def when_ready(self) -> defer.Deferred:
        if self.ready:
            return defer.succeed(None)
        if self.load_failed:
            return defer.fail(errors.Unavailable("the command queue could not be loaded"))
        d: defer.Deferred = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        if self.ready:
            self._start_timers()

    def _start_timers(self) -> defer.Deferred:
        """Start the refresh, and the sweeps if this node leads; fires when their first pass ended."""
        self.refresher.start()
        self.presence.start()
        if not self.cluster.leader.is_leader:
            return defer.succeed(None)
        return self._lead()

    def _lead(self) -> defer.Deferred:
        self.presence.lead(True)
        if self.sweeps.running:
            return defer.succeed(None)
        self.sweeps.startService()
        return self.sweeps.first_pass

    def _leadership(self, leader: bool) -> None:
        """The leader runs the sweeps (last attempts, offline); a node that takes over catches up at once."""
        if not (self.running and self.ready):
            return
        if leader:
            self._lead()
        else:
            self.presence.lead(False)
            if self.sweeps.running:
                self.sweeps.stopService()

    # -- between nodes ----------------------------------------------------------------

    def _announce_finished(self, cmd: Command) -> None:
        self.cluster.publish(TOPIC, {"f": cmd.id})

    def _message(self, node: str, message: dict[str, Any]) -> None:
        """Another node queued work for a device (``w``) or finished a command (``f``)."""
        work, finished = message.get("w"), message.get("f")
        if isinstance(work, list) and len(work) == 2 and all(isinstance(x, str) for x in work):
            self.work.add((work[0], work[1]))
        elif isinstance(finished, int) and finished in self.waiters.ids():
            self._wake_if_finished(finished)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.refresher.stop()
        self.presence.stop()
        if self.sweeps.running:
            self.sweeps.stopService()
        self.waiters.answer_all()  # ?wait= requests get the current state
        return self.settle()

    def settle(self) -> defer.Deferred:
        """Fires once every transaction and read issued so far (and any it caused) has ended."""
        return self._pending.settle()

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        return self._pending.track(d)

    def _refreshed(self, rows: list[tuple[int, str, str, str]]) -> None:
        """After each periodic refresh: every :data:`COUNT_EVERY` the gauges of unfinished
        commands (from the store: other nodes change them too), and waiters whose command
        finished on another node without the bus telling (one read of the waited ids)."""
        self._refreshes += 1
        if self._refreshes % COUNT_EVERY == 0:
            self._track(self._store.read(cmdsql.unfinished_counts).addCallbacks(
                self.tally.unfinished, lambda f: None))
        waited = sorted(self.waiters.ids())[:1000]
        if waited:
            d = self._store.read(cmdsql.finished_among, waited)
            d.addCallbacks(lambda ids: [self._wake_if_finished(cid) for cid in ids], lambda f: None)
            self._track(d)

    def _wake_if_finished(self, command_id: int) -> None:
        """Read ``command_id``; wake its waiters if it finished (here or in another process)."""
        def wake(cmd: Command | None) -> None:
            if cmd is not None and cmd.finished:
                self.waiters.finished(cmd, announce=False)

        d = self.get(command_id)
        d.addCallbacks(wake, lambda f: self.log.warn("push: reading command {id} failed: {error}",
                                                     id=command_id, error=f.getErrorMessage()))
        self._track(d)

    # -- operator side --------------------------------------------------------

    def _deadline(self, spec: dict[str, Any], now: float) -> dict[str, Any]:
        """``spec`` with ``expires_us``: its ``expiresAt``, its ``ttl``, ``[push] command_ttl``, or None."""
        spec = dict(spec)
        ttl = spec.pop("ttl", None)
        expires_us = spec.pop("expiresAt", None)
        if expires_us is None:
            ttl = ttl if ttl is not None else self.command_ttl or None
            expires_us = micros_of(now + ttl) if ttl is not None else None
        spec["expires_us"] = expires_us
        return spec

    async def create(self, tenant: str, device: str, spec: dict[str, Any]) -> Command:
        """Queue a command for ``device`` (an identifier); ``spec`` is already checked."""
        await self.when_ready()
        now = self._clock.seconds()
        d = self._events.transact(tx.create, tenant, device, self._deadline(spec, now), micros_of(now))
        d.addCallback(lambda value: self._created([value[0]])[0])
        cmd = await self._track(d)
        if self._registry.get(tenant, device) is None:  # deleted while we were writing
            self._cancel_device(tenant, device)
        return cmd

    async def create_batch(self, tenant: str, devices: list[str], spec: dict[str, Any]) -> list[Command]:
        """Queue one command per device (identifiers, checked) in one transaction (bulk)."""
        await self.when_ready()
        now = self._clock.seconds()
        d = self._events.transact(tx.create_batch, tenant, devices, self._deadline(spec, now), micros_of(now))
        d.addCallback(lambda value: self._created(value[0]))
        cmds = await self._track(d)
        for device in devices:
            if self._registry.get(tenant, device) is None:  # deleted while we were writing
                self._cancel_device(tenant, device)
        return cmds

    async def batch(self, batch: int, after: int = 0, limit: int = 100) -> dict[str, Any] | None:
        """A bulk request: ``{"tenant", "created_us", "total", "counts", "commands": [(id, device, status)]}``."""
        head = await self._store.read(cmdsql.get_batch, batch) if 0 < batch <= MAX_ID else None
        if head is None:
            return None
        counts = await self._store.read(cmdsql.batch_counts, batch)
        rows = await self._store.read(cmdsql.list_for_batch, batch, after, limit)
        return {"tenant": head[1], "created_us": head[2], "total": head[3], "counts": counts, "commands": rows}

    def _created(self, cmds: list[Command]) -> list[Command]:
        """Committed: the work set, the other nodes, the expiry timer."""
        for cmd in cmds:
            self.tally.moved(None, "queued")
            self.work.add(cmd.key)
            self.cluster.publish(TOPIC, {"w": list(cmd.key)})
        expiries = [c.expires_us for c in cmds if c.expires_us is not None]
        if expiries:
            self.sweeps.expires_at(min(expiries) / 1_000_000)
        return cmds

    def get(self, command_id: int) -> defer.Deferred:
        """The command as stored now, or None."""
        if not 0 < command_id <= MAX_ID:
            return defer.succeed(None)
        d = self._store.read(cmdsql.get, command_id)
        d.addCallback(lambda row: Command.from_row(row) if row is not None else None)
        return d

    async def list_for_device(self, tenant: str, device: str, status: str | None = None, after: int = 0,
                              limit: int = 100) -> list[Command]:
        """Up to ``limit`` commands of one device with ``id > after``, oldest first."""
        rows = await self._store.read(cmdsql.list_for_device, tenant, device, status, after, limit)
        return [Command.from_row(r) for r in rows]

    async def unfinished_for(self, tenant: str, device: str) -> list[Command]:
        """The device's queued and sent commands, oldest first (from the store)."""
        found = [c for state in ("queued", "sent")
                 for c in await self.list_for_device(tenant, device, state, 0, 100_000)]
        return sorted(found, key=lambda c: c.id)

    def has_work(self, tenant: str, device: str) -> bool:
        """Whether this node's idle polls of the device go to the store (memory only)."""
        return (tenant, device) in self.work

    async def cancel(self, command_id: int, error: str = "cancelled by operator") -> Command:
        """Cancel a queued command; Conflict once it was sent, NotFound if there is none."""
        await self.when_ready()
        d = self._events.transact(tx.cancel, command_id, micros_of(self._clock.seconds()), error)
        d.addCallback(self._cancelled)
        finished = await self._track(d)
        if finished.command is None:
            if finished.status is None:
                raise errors.NotFound(f"no command {command_id}")
            raise errors.Conflict(f"command {command_id} is {finished.status}; "
                                  "only a queued command can be cancelled")
        return finished.command

    def _cancelled(self, value: tuple[tx.Finished, list]) -> tx.Finished:
        finished = value[0]
        cmd = finished.command
        if cmd is not None:
            self.tally.moved("queued", cmd.status)
            self.work.settled(cmd.key, finished.remaining)
            self.waiters.finished(cmd)
        return finished

    def wait(self, cmd: Command, seconds: float) -> defer.Deferred:
        """Fires with the command once it finished (committed) or ``seconds`` passed."""
        return self.waiters.wait(cmd, seconds)

    def device_deleted(self, device: Any) -> None:
        """Registry delete listener: cancel the device's queued commands, forget it."""
        self.presence.forget(device)
        self._cancel_device(device.tenant, device.identifier)

    def _cancel_device(self, tenant: str, device: str) -> None:
        d = self._events.transact(tx.cancel_device, tenant, device, micros_of(self._clock.seconds()),
                                  "device deleted")
        d.addCallback(self._device_cancelled, (tenant, device))
        d.addErrback(lambda f: self.log.failure("push: cancelling the commands of {device} failed", f,
                                                device=device))
        self._track(d)

    def _device_cancelled(self, value: tuple[tuple[list[int], bool], list], key: tuple[str, str]) -> None:
        ids, remaining = value[0]
        for _ in ids:
            self.tally.moved("queued", "cancelled")
        self.work.settled(key, remaining)
        for cid in set(ids) & self.waiters.ids():
            self._wake_if_finished(cid)

    # -- device side ----------------------------------------------------------

    # seen(device, address), bound in __init__ from the presence;
    # hand_out_then(device, fn, *args) -> bool, hand_out(device) -> Deferred,
    # complete_then(device, raw, endpoint, fn, *args), complete(device, raw, endpoint) -> Deferred:
    # bound in __init__ from iotd.push.polls.Polls.

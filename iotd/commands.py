"""The push command queue: commands for devices that poll.

:class:`CommandService` keeps every unfinished command (``queued`` or
``sent``) in memory, indexed by device, and writes every transition through
to the store (:mod:`iotd.store.commands`).  So an idle poll is a dict lookup
that finds nothing; SQLite is touched only when something changes.

Life of a command::

    queued --/push--> sent --/result {"response"}--> done
                        |--/result {"error"} / not JSON--> failed
                        |--no result after max_attempts sends--> failed
    queued --operator DELETE / device deleted--> cancelled

A device runs one command at a time: ``/push`` hands out the oldest
unfinished command of the device; if that one is already ``sent`` it goes
out again only once ``command_timeout`` has passed since the last send.
Every decision is taken synchronously in the reactor thread, before any
write is issued, so two concurrent polls of one device never get two
different commands; the store sees the transitions in the same order (one
writer, FIFO).

Results from firmware are stored only as text that is valid Unicode and as
parsed values that are safe JSON (:mod:`iotd.jsonsafe`), so no result can
break the store, ``GET /api/v1/commands/{id}`` or the ``action`` event:

- a ``response`` string is kept as sent (``responseRaw``) and also parsed when
  it parses as *safe* JSON; one that parses to NaN, Infinity, an overflowing
  number or a lone surrogate counts as not parsing (shown as the raw string);
- a ``response`` value that is not a string and not safe JSON (``NaN``,
  ``1e400``, a lone surrogate in a key) likewise: it is kept only as text,
  its JSON serialization (``Infinity`` for ``1e400``);
- text that cannot be stored as UTF-8 (a lone surrogate such as ``\ud800``
  in the response or the error string) is kept with every lone surrogate
  replaced by U+FFFD, as ``bytes.decode(errors="replace")`` would;
- a body that is not JSON at all (not UTF-8 either) fails the command with
  ``malformed result: not JSON (...)`` and keeps nothing else.

Timers run on the injected reactor clock (``IReactorTime``), so tests drive
them with :class:`twisted.internet.task.Clock`:

- the *sweep* fails a command whose last attempt's ``command_timeout`` has
  passed (even if the device never polls again);
- the *offline check* emits ``conn`` status 2 for a device that has not
  polled for ``offline_after`` seconds.  Devices sit in an ordered dict by
  last activity, so the check only looks at the ones that expired.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import OrderedDict
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.python.failure import Failure

from iotd import errors, jsonsafe, metrics
from iotd.logs import Logger
from iotd.store import commands as cmdsql
from iotd.timefmt import iso, micros_of

STATES = cmdsql.STATES
FINISHED = ("done", "failed", "cancelled")
EPSILON = 1e-6  # seconds: a deadline this close to now is due (float rounding on the clock)

# metric children bound once (labels() costs a lock and a lookup per call)
_transitions = {s: metrics.commands.labels(s) for s in STATES}
_in_state = {s: metrics.commands_by_state.labels(s) for s in STATES}
_polls = {o: metrics.polls.labels(o) for o in ("idle", "busy", "command")}
_results = {o: metrics.results.labels(o) for o in ("done", "failed", "malformed", "orphan")}
_idle = _polls["idle"]


def _logged(failure: Failure) -> None:
    """Errback for a write nobody waits on: the pipeline already logged it."""


def _fire(failure: Failure | None, d: defer.Deferred) -> None:
    """An after-commit callback that fires a Deferred."""
    if failure is not None:
        d.errback(failure)
    else:
        d.callback(None)


def _fire_sent(failure: Failure | None, cmd: "Command", d: defer.Deferred) -> None:
    _fire(failure, d)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, a surrogate code point is always a lone one


def _text(value: str) -> str:
    """``value`` as text that UTF-8 can store: every lone surrogate becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", value)


def _safe(value: Any) -> bool:
    try:
        jsonsafe.check(value)
    except jsonsafe.UnsafeJSON:
        return False
    return True


class Command:
    """One command; unfinished ones live in the service's memory."""

    __slots__ = ("id", "tenant", "device", "status", "verb", "endpoint", "body", "has_body",
                 "content_type", "query_string", "attempts", "created_us", "sent_us",
                 "finished_us", "response_raw", "response", "parsed", "error", "_payload")

    def __init__(self, id: int, tenant: str, device: str, status: str, endpoint: str,
                 verb: str | None = None, body: Any = None, has_body: bool = False,
                 content_type: str | None = None, query_string: str | None = None,
                 attempts: int = 0, created_us: int = 0, sent_us: int | None = None,
                 finished_us: int | None = None, response_raw: str | None = None,
                 response: Any = None, parsed: bool = False, error: str | None = None):
        self.id = id
        self.tenant = tenant
        self.device = device
        self.status = status
        self.verb = verb
        self.endpoint = endpoint
        self.body = body
        self.has_body = has_body
        self.content_type = content_type
        self.query_string = query_string
        self.attempts = attempts
        self.created_us = created_us
        self.sent_us = sent_us
        self.finished_us = finished_us
        self.response_raw = response_raw
        self.response = response
        self.parsed = parsed
        self.error = error
        self._payload: bytes | None = None

    @classmethod
    def from_row(cls, row: cmdsql.Row) -> "Command":
        (cid, tenant, device, status, verb, endpoint, body, ctype, qs, attempts,
         created_us, sent_us, finished_us, response_raw, response, error) = row
        return cls(id=cid, tenant=tenant, device=device, status=status, endpoint=endpoint, verb=verb,
                   body=json.loads(body) if body is not None else None, has_body=body is not None,
                   content_type=ctype, query_string=qs, attempts=attempts, created_us=created_us,
                   sent_us=sent_us, finished_us=finished_us, response_raw=response_raw,
                   response=json.loads(response) if response is not None else None,
                   parsed=response is not None, error=error)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def shown_response(self) -> Any:
        """The response as the API shows it: parsed when it parsed, else as sent."""
        if self.parsed:
            return self.response
        return self.response_raw

    def spec(self) -> dict[str, Any]:
        """The fields the operator gave (and only those)."""
        out: dict[str, Any] = {}
        if self.verb is not None:
            out["verb"] = self.verb
        out["endpoint"] = self.endpoint
        if self.has_body:
            out["body"] = self.body
        if self.content_type is not None:
            out["contentType"] = self.content_type
        if self.query_string is not None:
            out["queryString"] = self.query_string
        return out

    @property
    def sent_at(self) -> float | None:
        """When it was last sent, in clock seconds."""
        return self.sent_us / 1_000_000 if self.sent_us is not None else None

    def payload(self) -> bytes:
        """The ``/push`` answer: the operator's fields, serialized once."""
        if self._payload is None:
            self._payload = _dumps(self.spec()).encode("utf-8")
        return self._payload

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "device": self.device, "status": self.status}
        out.update(self.spec())
        out["attempts"] = self.attempts
        out["createdAt"] = iso(self.created_us)
        out["sentAt"] = iso(self.sent_us) if self.sent_us is not None else None
        out["finishedAt"] = iso(self.finished_us) if self.finished_us is not None else None
        out["response"] = self.shown_response if self.status == "done" else None
        if self.response_raw is not None:
            out["responseRaw"] = self.response_raw
        out["error"] = self.error
        return out


def parse_result(raw: bytes) -> dict[str, Any]:
    """What a ``/result`` body means, as keyword arguments for the finish.

    ``{"response": ...}`` -> done; a string response is kept as sent and, when
    it parses as safe JSON, also parsed (real firmware sends a JSON-encoded
    string).  ``{"error": ...}`` -> failed.  Anything else -> failed with
    ``malformed result: ...``.  What is kept is always storable (see the
    module docstring).
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return {"status": "failed", "error": _text(f"malformed result: not JSON ({str(e)[:200]})")}
    if not isinstance(body, dict):
        return {"status": "failed", "error": "malformed result: not a JSON object"}
    if body.get("error") is not None:
        error = body["error"]
        return {"status": "failed", "error": _text(error if isinstance(error, str) else _dumps(error))}
    if "response" not in body:
        return {"status": "failed", "error": "malformed result: neither response nor error"}
    value = body["response"]
    if isinstance(value, str):
        try:
            parsed = jsonsafe.loads(value)
        except (ValueError, RecursionError):  # jsonsafe.UnsafeJSON is a ValueError too
            return {"status": "done", "response_raw": _text(value), "response": None, "parsed": False}
        return {"status": "done", "response_raw": value, "response": parsed, "parsed": True}
    if not _safe(value):
        return {"status": "done", "response_raw": _text(_dumps(value)), "response": None, "parsed": False}
    return {"status": "done", "response_raw": _dumps(value), "response": value, "parsed": True}


class CommandService(service.Service):
    """The command queue, hand-out, results, waiters and online tracking."""

    log = Logger()
    name = "push"

    def __init__(self, store: Any, registry: Any, events: Any, clock: Any, config: Any):
        self._store = store
        self._registry = registry
        self._events = events
        self._clock = clock
        self.command_timeout = float(config.command_timeout)
        self.max_attempts = int(config.max_attempts)
        self.offline_after = float(config.offline_after)
        # unfinished commands: by device (oldest first) and by id
        self._queues: dict[tuple[str, str], list[Command]] = {}
        self._by_id: dict[int, Command] = {}
        self._waiters: dict[int, list[tuple[defer.Deferred, Any]]] = {}
        # last activity (clock seconds) of online devices, oldest first
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._offline_call: Any = None
        # (deadline, command id) of commands on their last attempt
        self._sweep_heap: list[tuple[float, int]] = []
        self._sweep_call: Any = None
        self._pending: set[defer.Deferred] = set()
        self._changes: list[tuple] = []
        self._event_items: list[tuple[str, str, str, dict[str, Any]]] = []
        self._committed: list[tuple] = []  # (fn, *args) to call after the pending write
        self._inflight: list[defer.Deferred] = []  # pipeline writes in flight
        self._stopping = False
        self._counts: dict[str, int] = {s: 0 for s in STATES}
        self.ready = False
        self.load_failed = False
        self._ready_waiters: list[defer.Deferred] = []

    # -- life cycle -----------------------------------------------------------

    async def load(self) -> None:
        """Load unfinished commands from the store (a restart keeps queued and sent ones)."""
        try:
            rows = await self._store.read(cmdsql.load_unfinished)
            counts = await self._store.read(cmdsql.count_by_status)
        except Exception:
            self.load_failed = True
            self.log.failure("could not load the command queue")
            for d in self._ready_waiters:
                d.errback(errors.Unavailable("the command queue could not be loaded"))
            self._ready_waiters = []
            raise
        for row in rows:
            cmd = Command.from_row(row)
            if cmd.id in self._by_id:
                continue
            self._by_id[cmd.id] = cmd
            self._queues.setdefault((cmd.tenant, cmd.device), []).append(cmd)
            if cmd.status == "sent" and cmd.attempts >= self.max_attempts:
                self._schedule_sweep(cmd.sent_at + self.command_timeout, cmd.id)
        for queue in self._queues.values():
            queue.sort(key=lambda c: c.id)
        for state in STATES:
            self._counts[state] = counts.get(state, 0)
            _in_state[state].set(self._counts[state])
        self.ready = True
        self.log.info("command queue loaded: {queued} queued, {sent} sent",
                      queued=self._counts["queued"], sent=self._counts["sent"])
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

    def stopService(self):
        super().stopService()
        # Queue every pending change now, before the core stops the store.
        self._stopping = True
        if self._changes or self._event_items or self._committed:
            self._flush()
        for call in (self._offline_call, self._sweep_call):
            if call is not None and call.active():
                call.cancel()
        self._offline_call = self._sweep_call = None
        for cid in list(self._waiters):  # answer ?wait= requests with the current state
            cmd = self._by_id.get(cid)
            if cmd is not None:
                self._wake(cmd)
        return self.settle()

    async def settle(self) -> None:
        """Wait until every write issued so far (and any it caused) is committed."""
        while self._pending:
            await defer.DeferredList(list(self._pending), consumeErrors=True)

    # -- writes ---------------------------------------------------------------
    #
    # Transitions and their events go through one pipeline: one store write in
    # flight at a time; whatever piles up meanwhile goes in the next one (one
    # transaction, events inserted with it and published after the commit).
    # Under load that is one write per batch instead of two per transition.

    def _track(self, d: defer.Deferred, what: str, quiet: bool) -> defer.Deferred:
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            return result

        d.addBoth(done)
        if quiet:
            d.addErrback(lambda f: self.log.failure("push: {what} failed", f, what=what))
        return d

    def _write(self, fn: Callable[..., Any], *args: Any, quiet: bool = True) -> defer.Deferred:
        return self._track(self._store.write(fn, *args), fn.__name__, quiet)

    def _persist(self, change: tuple | None, event: tuple | None, then: tuple | None = None) -> None:
        """Queue a transition and/or an event for the next write.

        ``then`` is ``(fn, *args)``: ``fn(failure_or_None, *args)`` runs once the
        write committed (or failed).  A plain callback, not a Deferred: on the
        hot path thousands of these wait for a commit at once.
        """
        if change is not None:
            self._changes.append(change)
        if event is not None:
            self._event_items.append(event)
        if then is not None:
            self._committed.append(then)
        if not self._inflight or self._stopping:
            self._flush()

    def _emit(self, items: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        self._event_items.extend(items)
        if not self._inflight or self._stopping:
            self._flush()

    def _flush(self) -> None:
        changes, events, waiting = self._changes, self._event_items, self._committed
        self._changes, self._event_items, self._committed = [], [], []
        d = self._store.write(cmdsql.apply, changes, events)
        self._inflight.append(d)
        self._pending.add(d)
        d.addBoth(self._flushed, d, waiting)

    def _flushed(self, result: Any, d: defer.Deferred, waiting: list[defer.Deferred]) -> None:
        self._inflight.remove(d)  # (at most two in flight: the usual one, and one while stopping)
        self._pending.discard(d)
        failure = None
        if isinstance(result, Failure):
            self.log.failure("push: writing command changes failed", result)
            failure = result
        elif result:
            self._events.committed(result)
        for then in waiting:
            try:
                then[0](failure, *then[1:])
            except Exception:
                self.log.failure("push: after-commit callback failed")
        # (the callbacks above may have started the next write already)
        if not self._inflight and (self._changes or self._event_items or self._committed):
            self._flush()

    def _count(self, old: str | None, new: str) -> None:
        if old is not None:
            self._counts[old] -= 1
            _in_state[old].dec()
        self._counts[new] += 1
        _in_state[new].inc()

    # -- operator side --------------------------------------------------------

    async def create(self, tenant: str, device: str, spec: dict[str, Any]) -> Command:
        """Queue a command for ``device`` (an identifier); ``spec`` is already checked."""
        await self.when_ready()
        now_us = micros_of(self._clock.seconds())
        has_body = spec.get("body") is not None
        cid = await self._write(cmdsql.insert, tenant, device, spec.get("verb"), spec["endpoint"],
                                spec.get("body"), has_body, spec.get("contentType"),
                                spec.get("queryString"), now_us, quiet=False)
        cmd = Command(id=cid, tenant=tenant, device=device, status="queued", endpoint=spec["endpoint"],
                      verb=spec.get("verb"), body=spec.get("body"), has_body=has_body,
                      content_type=spec.get("contentType"), query_string=spec.get("queryString"),
                      created_us=now_us)
        _transitions["queued"].inc()
        self._count(None, "queued")
        self._by_id[cid] = cmd
        self._queues.setdefault((tenant, device), []).append(cmd)
        if self._registry.get(tenant, device) is None:  # deleted while we were writing
            self._finish(cmd, "cancelled", error="device deleted", event=False).addErrback(_logged)
        return cmd

    def unfinished(self, command_id: int) -> Command | None:
        return self._by_id.get(command_id)

    def pending_for(self, tenant: str, device: str) -> list[Command]:
        return list(self._queues.get((tenant, device), ()))

    def cancel(self, cmd: Command) -> defer.Deferred:
        """Cancel a queued command; raises Conflict once it was sent."""
        if cmd.status != "queued":
            raise errors.Conflict(f"command {cmd.id} is {cmd.status}; only a queued command can be cancelled")
        return self._finish(cmd, "cancelled", error="cancelled by operator", event=False)

    def wait(self, cmd: Command, seconds: float) -> defer.Deferred:
        """Fires with ``cmd`` once it finished (committed) or ``seconds`` passed."""
        if cmd.finished:
            return defer.succeed(cmd)
        entry: list[Any] = []

        def cancel(d):
            call = entry[1]
            if call.active():
                call.cancel()
            self._drop_waiter(cmd.id, entry)

        d: defer.Deferred = defer.Deferred(cancel)

        def expire():
            self._drop_waiter(cmd.id, entry)
            if not d.called:
                d.callback(cmd)

        entry.extend([d, self._clock.callLater(seconds, expire)])
        self._waiters.setdefault(cmd.id, []).append(entry)  # type: ignore[arg-type]
        return d

    def _drop_waiter(self, cid: int, entry: Any) -> None:
        waiters = self._waiters.get(cid)
        if waiters and entry in waiters:
            waiters.remove(entry)
            if not waiters:
                del self._waiters[cid]

    def _wake(self, cmd: Command) -> None:
        for d, call in self._waiters.pop(cmd.id, ()):
            if call.active():
                call.cancel()
            if not d.called:
                d.callback(cmd)

    def device_deleted(self, device: Any) -> None:
        """Registry delete listener: cancel the device's queued commands, forget it."""
        key = (device.tenant, device.identifier)
        self._seen.pop(key, None)
        for cmd in list(self._queues.get(key, ())):
            if cmd.status == "queued":
                self._finish(cmd, "cancelled", error="device deleted", event=False).addErrback(_logged)

    # -- device side ----------------------------------------------------------

    def seen(self, device: Any, address: str | None) -> None:
        """A poll or result from ``device``: lastSeen/lastAddress, online, conn event."""
        now = self._clock.seconds()
        self._registry.touch(device, address, micros_of(now))
        key = (device.tenant, device.identifier)
        seen = self._seen
        if key in seen:
            seen.move_to_end(key)
        seen[key] = now
        if not device.online:
            device.online = True
            self._registry.mark(device)
            self.log.info("device {device} online from {address}", device=device.identifier, address=address)
            self._emit([(device.tenant, "conn", device.identifier, {"status": 1})])
        if self._offline_call is None:
            self._schedule_offline(now)

    def hand_out(self, device: Any) -> tuple[Command, defer.Deferred] | None:
        """The command ``/push`` answers with and a Deferred for its send's commit, or None (empty).

        Synchronous: the decision is taken before anything else can run, so a
        concurrent poll of the same device sees the command already ``sent``.
        """
        d: defer.Deferred = defer.Deferred()
        cmd = self.hand_out_then(device, _fire_sent, d)
        return (cmd, d) if cmd is not None else None

    def hand_out_then(self, device: Any, fn: Callable[..., Any], *args: Any) -> Command | None:
        """As :meth:`hand_out`; ``fn(failure_or_None, cmd, *args)`` runs after the send committed."""
        queue = self._queues.get((device.tenant, device.identifier))
        if not queue:
            _idle.inc()
            return None
        now = self._clock.seconds()
        while queue:
            cmd = queue[0]
            if cmd.status == "queued":
                self._send(cmd, now, (fn, cmd) + args)
                return cmd
            if now + EPSILON < cmd.sent_at + self.command_timeout:
                break  # in flight: the device must answer (or time out) first
            if cmd.attempts < self.max_attempts:
                self.log.info("command {id} to {device}: no result after {timeout} s, sending again",
                              id=cmd.id, device=cmd.device, timeout=self.command_timeout)
                self._send(cmd, now, (fn, cmd) + args)
                return cmd
            self._fail_unanswered(cmd)
        _polls["busy" if queue else "idle"].inc()
        return None

    def _send(self, cmd: Command, now: float, then: tuple) -> None:
        old = cmd.status
        cmd.status = "sent"
        cmd.attempts += 1
        cmd.sent_us = micros_of(now)
        if old != "sent":
            self._count(old, "sent")
        _transitions["sent"].inc()
        _polls["command"].inc()
        if cmd.attempts >= self.max_attempts:
            self._schedule_sweep(now + self.command_timeout, cmd.id)
        # Committed with its event, which is published before the device gets its answer.
        self._persist(("sent", cmd.id, cmd.attempts, cmd.sent_us), (cmd.tenant, "action", cmd.device, {
            "dir": "down", "reqType": "req", "actionID": cmd.endpoint,
            "params": cmd.body if cmd.has_body else None, "code": 200, "msg": "",
            "msgToken": str(cmd.id)}), then)

    def in_flight(self, device: Any) -> Command | None:
        queue = self._queues.get((device.tenant, device.identifier))
        if queue and queue[0].status == "sent":
            return queue[0]
        return None

    def complete(self, device: Any, raw: bytes, endpoint: str | None = None) -> defer.Deferred | None:
        """``/result`` from ``device``: finish its sent command (Deferred: committed); None for an orphan."""
        d: defer.Deferred = defer.Deferred()
        return d if self.complete_then(device, raw, endpoint, _fire, d) else None

    def complete_then(self, device: Any, raw: bytes, endpoint: str | None, fn: Callable[..., Any],
                      *args: Any) -> bool:
        """As :meth:`complete`; ``fn(failure_or_None, *args)`` runs after the commit; False for an orphan."""
        cmd = self.in_flight(device)
        if cmd is None:
            _results["orphan"].inc()
            self.log.info("result from {device} with no command waiting for it (orphan)",
                          device=device.identifier)
            return False
        if endpoint is not None and endpoint != cmd.endpoint:
            self.log.warn("result from {device} names endpoint {got!r} but command {id} is {want!r}",
                          device=device.identifier, got=endpoint[:200], id=cmd.id, want=cmd.endpoint)
        outcome = parse_result(raw)
        if outcome["status"] == "done":  # (no log line: the action event records it)
            _results["done"].inc()
        elif outcome["error"].startswith("malformed result"):
            _results["malformed"].inc()
            self.log.warn("malformed result from {device} for command {id}: {error}",
                          device=device.identifier, id=cmd.id, error=outcome["error"])
        else:
            _results["failed"].inc()
            self.log.info("command {id} to {device} failed: {error}", id=cmd.id, device=cmd.device,
                          error=outcome["error"][:200])
        self._finish(cmd, then=(fn,) + args, **outcome)
        return True

    # -- finishing ------------------------------------------------------------

    def _fail_unanswered(self, cmd: Command) -> None:
        self.log.info("command {id} to {device} failed: no result after {n} attempts",
                      id=cmd.id, device=cmd.device, n=cmd.attempts)
        self._finish(cmd, "failed", error=f"no result after {cmd.attempts} attempts").addErrback(_logged)

    def _finish(self, cmd: Command, status: str, response_raw: str | None = None, response: Any = None,
                parsed: bool = False, error: str | None = None, event: bool = True,
                then: tuple | None = None) -> defer.Deferred | None:
        """End ``cmd``.  Once that is committed, ``?wait=`` waiters wake and ``then`` runs.

        Without ``then``, returns a Deferred that fires then.
        """
        key = (cmd.tenant, cmd.device)
        queue = self._queues.get(key)
        if queue is not None:
            if cmd in queue:
                queue.remove(cmd)
            if not queue:
                del self._queues[key]
        self._by_id.pop(cmd.id, None)
        old = cmd.status
        cmd.status = status
        cmd.finished_us = micros_of(self._clock.seconds())
        cmd.response_raw = response_raw
        cmd.response = response
        cmd.parsed = parsed
        cmd.error = error
        self._count(old, status)
        _transitions[status].inc()
        item = None
        if event:  # committed with the finish, published before it is acknowledged
            item = (cmd.tenant, "action", cmd.device, {
                "dir": "down", "reqType": "resp", "actionID": cmd.endpoint,
                "params": cmd.body if cmd.has_body else None,
                "code": 200 if status == "done" else 500, "msg": error or "",
                "msgToken": str(cmd.id),
                "response": cmd.shown_response if status == "done" else None})
        d = None
        if then is None:
            d = defer.Deferred()
            then = (_fire, d)
        self._persist(("finish", cmd.id, status, cmd.finished_us, response_raw,
                       response_raw if parsed else None, error), item, (self._finished, cmd, then))
        return d

    def _finished(self, failure: Failure | None, cmd: Command, then: tuple) -> None:
        self._wake(cmd)
        then[0](failure, *then[1:])

    # -- timers ---------------------------------------------------------------

    def _schedule_sweep(self, deadline: float, cid: int) -> None:
        heapq.heappush(self._sweep_heap, (deadline, cid))
        call = self._sweep_call
        if call is not None and call.active():
            if call.getTime() <= deadline:
                return
            call.cancel()
        self._sweep_call = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), self._sweep)

    def _sweep(self) -> None:
        """Fail the commands whose last attempt timed out; the device's next command can go."""
        self._sweep_call = None
        now = self._clock.seconds()
        heap = self._sweep_heap
        while heap and heap[0][0] <= now + EPSILON:
            _, cid = heapq.heappop(heap)
            cmd = self._by_id.get(cid)
            if (cmd is not None and cmd.status == "sent" and cmd.attempts >= self.max_attempts
                    and cmd.sent_at + self.command_timeout <= now + EPSILON):
                self._fail_unanswered(cmd)
        if heap:
            self._sweep_call = self._clock.callLater(max(0.0, heap[0][0] - now), self._sweep)

    def _schedule_offline(self, now: float) -> None:
        if not self._seen:
            return
        first = next(iter(self._seen.values()))
        self._offline_call = self._clock.callLater(max(0.0, first + self.offline_after - now),
                                                   self._offline_check)

    def _offline_check(self) -> None:
        self._offline_call = None
        now = self._clock.seconds()
        seen = self._seen
        gone: list[tuple[str, str, str, dict[str, Any]]] = []
        while seen:
            key, last = next(iter(seen.items()))
            if last + self.offline_after > now + EPSILON:
                break
            del seen[key]
            device = self._registry.get(key[0], key[1])
            if device is not None and device.online:
                device.online = False
                self._registry.mark(device)
                gone.append((device.tenant, "conn", device.identifier, {"status": 2}))
                self.log.info("device {device} offline: no poll for {seconds} s",
                              device=device.identifier, seconds=self.offline_after)
        if gone:
            self._emit(gone)
        self._schedule_offline(now)

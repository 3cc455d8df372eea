"""The device side of the queue: ``/push`` hand-outs and ``/result`` completions, and the sweep's give-up.

An idle poll is a set lookup (:class:`iotd.push.work.Work`) that finds
nothing: answered from memory, the store untouched.  A poll of a device with
work is one transaction (:func:`iotd.push.transactions.hand_out`) and so is
every result; the caller's ``fn(failure_or_None, command_or_None, *args)``
runs once it committed and its events are published -- a plain callback, not
a Deferred: on the hot path thousands of these wait for a commit at once.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from iotd.logs import Logger
from iotd.push import transactions as tx
from iotd.push.command import Command
from iotd.push.pending import Pending
from iotd.push.results import outcome as result_outcome
from iotd.push.tally import Tally, idle, polls, results
from iotd.push.waiters import Waiters
from iotd.push.work import Work
from iotd.timefmt import micros_of

Then = Callable[..., Any]  # fn(failure_or_None, command_or_None, *args), after the commit


def _fire(failure: Failure | None, cmd: Command | None, d: defer.Deferred) -> None:
    if failure is not None:
        d.errback(failure)
    else:
        d.callback(cmd)


class Polls:
    log = Logger()

    def __init__(self, events: Any, clock: Any, work: Work, tally: Tally, waiters: Waiters, pending: Pending,
                 timeout: float, max_attempts: int):
        self._events = events
        self._clock = clock
        self._work = work
        self._tally = tally
        self._waiters = waiters
        self._pending = pending
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.last_attempt_sent: Callable[[float], None] = lambda sent_at: None  # the sweeps' timer

    # -- GET /push ------------------------------------------------------------

    def hand_out_then(self, device: Any, fn: Then, *args: Any, uuid: str | None = None) -> bool:
        """False when the device has no work (answered from memory: empty); True: ``fn`` runs later."""
        key = (device.tenant, device.identifier)
        if key not in self._work.devices:
            idle.inc()
            return False
        d = self._events.transact(tx.hand_out, key[0], key[1], self._clock.seconds(), self.timeout,
                                  self.max_attempts, uuid)
        d.addCallbacks(self._handed_out, self._then_failed, callbackArgs=(key, fn, args, self._work.stamp),
                       errbackArgs=(fn, args))
        self._pending.track(d)
        return True

    def hand_out(self, device: Any, uuid: str | None = None) -> defer.Deferred:
        """A Deferred firing with the command handed out, or None (empty)."""
        d: defer.Deferred = defer.Deferred()
        if not self.hand_out_then(device, _fire, d, uuid=uuid):
            d.callback(None)
        return d

    def _handed_out(self, value: tuple[tx.HandOut, list], key: tuple[str, str], fn: Then, args: tuple,
                    since: int) -> None:
        result = value[0]
        for cmd in result.gave_up:
            self.gave_up(cmd)
        self._work.settled(key, result.remaining, since)
        cmd = result.command
        if cmd is None:
            polls["busy" if result.busy else "idle"].inc()
        else:
            polls["command"].inc()
            if cmd.attempts == 1:
                self._tally.moved("queued", "sent")
            else:
                self._tally.resent()
                self.log.info("command {id} to {device}: no result after {timeout} s, sending again",
                              id=cmd.id, device=cmd.device, timeout=self.timeout)
            if cmd.attempts >= self.max_attempts:
                self.last_attempt_sent(cmd.sent_at)
        self._call(fn, None, cmd, args)

    def _then_failed(self, failure: Failure, fn: Then, args: tuple) -> None:
        self._call(fn, failure, None, args)

    def _call(self, fn: Then, failure: Failure | None, cmd: Command | None, args: tuple) -> None:
        try:
            fn(failure, cmd, *args)
        except Exception:
            self.log.failure("push: after-commit callback failed")

    # -- POST /result -----------------------------------------------------------

    def complete_then(self, device: Any, raw: bytes, endpoint: str | None, fn: Then, *args: Any,
                      uuid: str | None = None, command_id: int | None = None) -> None:
        """``fn(failure_or_None, finished_command_or_None, *args)`` after the commit.

        None: an orphan (no command of the device was waiting for a result -- or, with
        ``command_id``, not that one; nothing stored).
        """
        outcome = result_outcome(raw)
        key = (device.tenant, device.identifier)
        d = self._events.transact(tx.complete, key[0], key[1], outcome, micros_of(self._clock.seconds()), uuid,
                                  command_id, size=len(raw))
        d.addCallbacks(self._completed, self._then_failed, callbackArgs=(key, endpoint, fn, args, self._work.stamp),
                       errbackArgs=(fn, args))
        self._pending.track(d)

    def complete(self, device: Any, raw: bytes, endpoint: str | None = None,
                 uuid: str | None = None, command_id: int | None = None) -> defer.Deferred:
        """A Deferred firing with the finished command, or None (orphan)."""
        d: defer.Deferred = defer.Deferred()
        self.complete_then(device, raw, endpoint, _fire, d, uuid=uuid, command_id=command_id)
        return d

    def _completed(self, value: tuple[tx.Finished, list], key: tuple[str, str], endpoint: str | None,
                   fn: Then, args: tuple, since: int) -> None:
        finished = value[0]
        self._work.settled(key, finished.remaining, since)
        cmd = finished.command
        if cmd is None:
            results["orphan"].inc()
            self.log.info("result from {device} with no command waiting for it (orphan)", device=key[1])
        else:
            if endpoint is not None and endpoint != cmd.endpoint:
                self.log.warn("result from {device} names endpoint {got!r} but command {id} is {want!r}",
                              device=key[1], got=endpoint[:200], id=cmd.id, want=cmd.endpoint)
            if cmd.status == "done":  # (no log line: the action event records it)
                results["done"].inc()
            elif cmd.error.startswith("malformed result"):
                results["malformed"].inc()
                self.log.warn("malformed result from {device} for command {id}: {error}",
                              device=key[1], id=cmd.id, error=cmd.error)
            else:
                results["failed"].inc()
                self.log.info("command {id} to {device} failed: {error}", id=cmd.id, device=cmd.device,
                              error=cmd.error[:200])
            self._tally.moved("sent", cmd.status)
            self._waiters.finished(cmd)
        self._call(fn, None, cmd, args)

    # -- the sweep: no result after the last attempt ----------------------------------

    def give_up(self, command_id: int, attempts: int, sent_us: int) -> defer.Deferred:
        """Fail ``command_id`` if it is still at that attempt (one checked transaction)."""
        d = self._events.transact(tx.give_up, command_id, attempts, sent_us, micros_of(self._clock.seconds()))
        d.addCallback(self._given_up)
        return self._pending.track(d)

    def _given_up(self, value: tuple[tx.Finished, list]) -> None:
        finished = value[0]
        if finished.command is not None:
            self.gave_up(finished.command)
            self._work.settled(finished.command.key, finished.remaining)

    def gave_up(self, cmd: Command) -> None:
        """``cmd`` ended without a result: failed after its last attempt, or expired before a send."""
        if cmd.status == "expired":
            self.log.info("command {id} to {device} expired before it was sent", id=cmd.id, device=cmd.device)
            self._tally.moved("queued", "expired")
        else:
            self.log.info("command {id} to {device} failed: no result after {n} attempts",
                          id=cmd.id, device=cmd.device, n=cmd.attempts)
            self._tally.moved("sent", "failed")
        self._waiters.finished(cmd)

    # -- the sweep: a queued command's deadline passed ----------------------------------

    def expire(self, command_id: int) -> defer.Deferred:
        """Expire ``command_id`` if it is still queued (one checked transaction)."""
        d = self._events.transact(tx.expire, command_id, micros_of(self._clock.seconds()))
        d.addCallback(self._given_up)
        return self._pending.track(d)

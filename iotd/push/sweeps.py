"""The sweeps: a small service of timers on the reactor clock (tests drive it with ``task.Clock``).

- **Last attempts.**  A command sent for the last time (``max_attempts``)
  fails with ``no result after N attempts`` once its ``command_timeout``
  has passed, even if the device never polls again.  The sweep reads the
  due ones from the store (``WHERE status = 'sent' AND attempts >= ? AND
  sent_us <= ?``) and fails each in its own checked transaction
  (:func:`iotd.push.transactions.give_up`: a result or a resend that came
  first wins).  It then sleeps until the next last attempt's deadline the
  store knows of, or the deadline of a last attempt this node sends in the
  meantime, and at most :data:`BACKSTOP` seconds (last attempts another
  process sent on the same database).
- **Expiry.**  A queued command whose deadline (``ttl``, ``expiresAt`` or
  ``[push] command_ttl``) has passed becomes ``expired``, each in its own
  checked transaction (:func:`iotd.push.transactions.expire`: a send that
  came first wins).  The same timer wakes for the next deadline the store
  knows of, or one of a command this node queues meanwhile.  (A poll never
  gets an expired command even before the sweep came by: the hand-out
  expires it itself.)
- **Offline.**  :meth:`iotd.push.presence.Presence.check` when the device
  seen longest ago reaches ``offline_after``.

(Resends need no timer: a device that polls again after ``command_timeout``
gets the command again from its poll's own transaction.)
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer

from iotd.logs import Logger
from iotd.push.pending import Pending
from iotd.push.presence import Presence
from iotd.push.transactions import EPSILON
from iotd.store import commands as cmdsql
from iotd.timefmt import micros_of

BACKSTOP = 5.0  # seconds: the longest the last-attempt sweep sleeps
BATCH = 1000  # due commands failed per sweep pass (more: the next pass follows at once)


class Deadline:
    """One ``callLater`` on ``clock`` for the earliest time asked for."""

    def __init__(self, clock: Any, fn: Callable[[], Any]):
        self._clock = clock
        self._fn = fn
        self._call: Any = None

    @property
    def pending(self) -> bool:
        return self._call is not None

    def at(self, when: float) -> None:
        call = self._call
        if call is not None:
            if call.getTime() <= when:
                return
            call.cancel()
        self._call = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._fire)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        self._fn()


class Sweeps(service.Service):
    log = Logger()

    def __init__(self, store: Any, clock: Any, pending: Pending, presence: Presence, timeout: float,
                 max_attempts: int, give_up: Callable[[int, int, int], defer.Deferred],
                 expire: Callable[[int], defer.Deferred] = lambda cid: defer.succeed(None)):
        self._store = store
        self._clock = clock
        self._pending = pending
        self._presence = presence
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._give_up = give_up  # (command id, attempts, sent_us) -> Deferred (the checked transaction)
        self._expire = expire  # (command id) -> Deferred (the checked transaction)
        self._expiry = Deadline(clock, self._sweep)
        self._offline = Deadline(clock, self._offline_check)
        self._sweeping = False
        self._hint: float | None = None  # a deadline learnt while a pass was running
        self.first_pass: defer.Deferred = defer.succeed(None)
        presence.wake = self.offline_at

    def startService(self) -> None:
        """(After the queue is loaded.)  A first pass now: last attempts that timed out while stopped."""
        super().startService()
        self.first_pass = self.sweep()

    def stopService(self) -> None:
        super().stopService()
        self._expiry.cancel()
        self._offline.cancel()

    # -- last attempts ------------------------------------------------------------

    def last_attempt_sent(self, sent_at: float) -> None:
        """This node sent a command for the last time: sweep it at its deadline."""
        self.wake_at(sent_at + self.timeout)

    def expires_at(self, when: float) -> None:
        """This node queued a command that expires at ``when``: sweep it then."""
        self.wake_at(when)

    def wake_at(self, deadline: float) -> None:
        if self._sweeping:
            self._hint = deadline if self._hint is None else min(self._hint, deadline)
        elif self.running:
            self._expiry.at(deadline)

    def sweep(self) -> defer.Deferred:
        """One pass now: fail every due last attempt; fires when their transactions ended."""
        self._expiry.cancel()
        self._sweeping = True
        return self._pending.track(defer.Deferred.fromCoroutine(self._pass()))

    def _sweep(self) -> None:
        self.sweep()

    async def _pass(self) -> None:
        now = self._clock.seconds()
        wake = now + BACKSTOP
        try:
            due, later = await self._store.read(cmdsql.due_last_attempts, self.max_attempts,
                                                micros_of(now + EPSILON - self.timeout), BATCH)
            if due:
                done = [self._give_up(cid, attempts, sent_us) for cid, attempts, sent_us in due]
                await defer.DeferredList(done, consumeErrors=True)
            if len(due) == BATCH:
                wake = now
            elif later is not None:
                wake = min(wake, later / 1_000_000 + self.timeout)
            expired, next_expiry = await self._store.read(cmdsql.due_expiries, micros_of(now + EPSILON), BATCH)
            if expired:
                await defer.DeferredList([self._expire(cid) for cid in expired], consumeErrors=True)
            if len(expired) == BATCH:
                wake = now
            elif next_expiry is not None:
                wake = min(wake, next_expiry / 1_000_000)
        except Exception:
            self.log.failure("push: the sweep of last attempts and expiries failed")
        finally:
            self._sweeping = False
        if self._hint is not None:
            wake, self._hint = min(wake, self._hint), None
        if self.running:
            self._expiry.at(wake)

    # -- offline ------------------------------------------------------------------

    def offline_at(self, when: float) -> None:
        if not self._offline.pending and self.running:
            self._offline.at(when)

    def _offline_check(self) -> None:
        self._presence.check()
        when = self._presence.next_check()
        if when is not None and self.running:
            self._offline.at(when)

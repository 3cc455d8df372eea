"""``?wait=S``: hold an operator's request until its command finished or ``S`` seconds passed.

A waiter is woken with the finished command once its finish committed --
by this node's transaction, or by the periodic refresh that sees it is no
longer unfinished (finished by another process).  When time is up it is
answered with the command as stored now.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer

from iotd.logs import Logger
from iotd.push.command import Command


class _Waiter:
    __slots__ = ("d", "call", "cmd")

    def __init__(self, d: defer.Deferred, cmd: Command):
        self.d, self.cmd, self.call = d, cmd, None


class Waiters:
    log = Logger()

    def __init__(self, clock: Any, current: Callable[[int], defer.Deferred]):
        self._clock = clock
        self._current = current  # command id -> Deferred[Command | None] (a store read)
        self._by_id: dict[int, list[_Waiter]] = {}
        # Called for each command this node finished (to wake waiters on the other nodes).
        self.announce: Callable[[Command], None] = lambda cmd: None

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_id.values())

    def ids(self) -> set[int]:
        return set(self._by_id)

    def wait(self, cmd: Command, seconds: float) -> defer.Deferred:
        """Fires with the command once it finished (committed) or ``seconds`` passed."""
        if cmd.finished:
            return defer.succeed(cmd)
        d: defer.Deferred = defer.Deferred(lambda _: self._drop(cmd.id, waiter))
        waiter = _Waiter(d, cmd)
        waiter.call = self._clock.callLater(seconds, self._expire, cmd.id, waiter)
        self._by_id.setdefault(cmd.id, []).append(waiter)
        return d

    def _drop(self, cid: int, waiter: _Waiter) -> None:
        if waiter.call is not None and waiter.call.active():
            waiter.call.cancel()
        waiting = self._by_id.get(cid)
        if waiting and waiter in waiting:
            waiting.remove(waiter)
            if not waiting:
                del self._by_id[cid]

    def _expire(self, cid: int, waiter: _Waiter) -> None:
        self._drop(cid, waiter)
        self._answer_current(waiter)

    def _answer_current(self, waiter: _Waiter) -> None:
        def answer(cmd: Any) -> None:
            if not waiter.d.called:
                waiter.d.callback(cmd if isinstance(cmd, Command) else waiter.cmd)

        self._current(waiter.cmd.id).addBoth(answer)

    def finished(self, cmd: Command, announce: bool = True) -> None:
        """``cmd`` finished (committed): wake its waiters with it (and, ``announce``: the other nodes')."""
        if announce:
            self.announce(cmd)
        for waiter in self._by_id.pop(cmd.id, ()):
            if waiter.call is not None and waiter.call.active():
                waiter.call.cancel()
            if not waiter.d.called:
                waiter.d.callback(cmd)

    def answer_all(self) -> None:
        """Stopping: answer every waiter with its command's current state."""
        waiting, self._by_id = self._by_id, {}
        for waiters in waiting.values():
            for waiter in waiters:
                if waiter.call is not None and waiter.call.active():
                    waiter.call.cancel()
                self._answer_current(waiter)

"""Writes and reads in flight, so ``settle()`` (tests, stop) can wait until all of them ended."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer


class Pending:
    """Counts Deferreds in flight without touching their results."""

    def __init__(self) -> None:
        self._count = 0
        self._waiters: list[defer.Deferred] = []

    def __len__(self) -> int:
        return self._count

    def track(self, d: defer.Deferred) -> defer.Deferred:
        """Count ``d`` until it fires.  Add it after the callbacks that must run before ``settle`` ends."""
        self._count += 1
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> Any:
        self._count -= 1
        if self._count == 0:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(None)
        return result

    def settle(self) -> defer.Deferred:
        """Fires once nothing is in flight (including what the ones in flight started)."""
        if self._count == 0:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d

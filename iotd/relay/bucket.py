"""A link's rate limit: a token bucket per direction, and the gate that slows a TCP reader.

- :class:`Bucket` holds up to one second's worth of tokens (``rate`` bytes),
  starts full and refills continuously from the injected clock.
  :meth:`Bucket.allow` (UDP) takes a datagram's bytes or refuses it whole;
  :meth:`Bucket.charge` (TCP) always takes them (nothing is dropped) and
  says how long the reader must wait before the bucket again holds
  ``reserve`` tokens.
- :class:`Gate` stands between a reading transport and everything that may
  pause it: the peer's write queue (the gate is the registered producer) and
  the bucket.  The transport reads only while neither holds it, so a fast
  sender is slowed by back-pressure (its kernel buffer fills) and userspace
  memory stays one read chunk per direction.  The reading side's chunk size
  is capped to :func:`chunk_size` so that no read can overdraw the bucket by
  much: the bytes passed by time ``t`` stay below ``rate * (1 + t)``.
"""

from __future__ import annotations

from typing import Any, Callable

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

MIN_CHUNK = 1024


def chunk_size(rate: int, largest: int) -> int:
    """The read size of a link side limited to ``rate`` bytes/s: a tenth of a second's worth."""
    return max(MIN_CHUNK, min(largest, rate // 10))


class Bucket:
    """``rate`` bytes per second, a burst of one second's worth."""

    def __init__(self, rate: int, clock: Any) -> None:
        if rate <= 0:
            raise ValueError("a bucket needs a rate > 0")
        self.rate = float(rate)
        self.clock = clock
        self.tokens = self.rate
        self._stamp = clock.seconds()

    def _refill(self) -> float:
        now = self.clock.seconds()
        tokens = self.tokens + (now - self._stamp) * self.rate
        self._stamp = now
        self.tokens = tokens if tokens < self.rate else self.rate
        return self.tokens

    def allow(self, n: int) -> bool:
        """Take ``n`` tokens if there are that many (a UDP datagram); else take none."""
        if self._refill() >= n:
            self.tokens -= n
            return True
        return False

    def charge(self, n: int, reserve: float) -> float:
        """Take ``n`` tokens (the balance may go negative); seconds until ``reserve`` are back."""
        left = self._refill() - n
        self.tokens = left
        reserve = min(reserve, self.rate)
        return 0.0 if left >= reserve else (reserve - left) / self.rate


@implementer(IPushProducer)
class Gate:
    """The producer registered in place of ``transport``: pauses it for its peer or its bucket."""

    def __init__(self, transport: Any, bucket: Bucket, chunk: int) -> None:
        self.transport = transport
        self.bucket = bucket
        self.chunk = chunk
        self._held_by_peer = False
        self._wait: Any = None
        self._done = False

    def counter(self, count: Callable[[int], None]) -> Callable[[int], None]:
        """``count`` (the link's byte counter) that also charges the bucket for each chunk."""
        def counted(n: int) -> None:
            count(n)
            self.take(n)
        return counted

    def take(self, n: int) -> None:
        wait = self.bucket.charge(n, self.chunk)
        if wait > 0 and self._wait is None and not self._done:
            self.transport.pauseProducing()
            self._wait = self.bucket.clock.callLater(wait, self._refilled)

    def _refilled(self) -> None:
        self._wait = None
        wait = self.bucket.charge(0, self.chunk)
        if wait > 0:
            self._wait = self.bucket.clock.callLater(wait, self._refilled)
        elif not self._held_by_peer and not self._done:
            self.transport.resumeProducing()

    # -- IPushProducer, for the peer's transport ---------------------------

    def pauseProducing(self) -> None:
        self._held_by_peer = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._held_by_peer = False
        if self._wait is None and not self._done:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.stop()
        self.transport.stopProducing()

    def stop(self) -> None:
        """No more reads (FIN or close): cancel the refill timer."""
        self._done = True
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        self._wait = None

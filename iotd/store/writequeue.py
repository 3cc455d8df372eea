"""The store's write queue, bounded in entries and in declared bytes.

At most ``max_writes`` writes (100,000) and ``max_bytes`` bytes (256 MiB, as
callers declare with ``write(..., size=n)``; a write that declares nothing
counts one entry and no bytes) wait for the writer thread.  Beyond either,
:meth:`WriteQueue.admit` says no (the store fails the write at once with a
503) instead of queueing without limit; one line is logged per episode.  A
write larger than the byte bound on its own is still taken when nothing else
is queued, so no write is refused forever.  Maintenance items (``size=None``)
are never counted nor refused.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from iotd.logs import Logger

MAX_QUEUED_WRITES = 100_000  # writes waiting for the writer thread
MAX_QUEUED_BYTES = 256 * 1024 * 1024  # bytes they declared (``size=``)


class WriteQueue:
    log = Logger(namespace="iotd.store")

    def __init__(self, max_writes: int = MAX_QUEUED_WRITES, max_bytes: int = MAX_QUEUED_BYTES):
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._max_writes = max_writes
        self._max_bytes = max_bytes
        self._queued = 0  # counted writes in the queue (taken off by the writer thread)
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._full = False

    def reset(self) -> None:
        self._queued = self._queued_bytes = 0

    def admit(self, size: int) -> bool:
        """Count a write in if both bounds allow it (the reactor thread); log once per episode."""
        with self._lock:
            over = self._queued >= self._max_writes or (
                self._queued > 0 and self._queued_bytes + size > self._max_bytes)
            if not over:
                self._queued += 1
                self._queued_bytes += size
            queued, queued_bytes = self._queued, self._queued_bytes
        if over and not self._full:
            self._full = True
            self.log.warn("store write queue full ({writes} writes, {bytes} bytes waiting): "
                          "writes answer 503 until it drains", writes=queued, bytes=queued_bytes)
        elif not over and self._full:
            self._full = False
            self.log.info("store write queue accepts writes again")
        return not over

    def put(self, item: tuple) -> None:
        """``(fn, args, deferred, size)``; ``size`` None for maintenance and the stop marker."""
        self._items.put(item)

    def take(self, most: int) -> list:
        """Wait for one item, then take whatever else is queued, up to ``most`` (the writer thread)."""
        batch = [self._items.get()]
        while len(batch) < most:
            try:
                batch.append(self._items.get_nowait())
            except queue.Empty:
                break
        counted = [item[3] for item in batch if item[3] is not None]
        if counted:
            with self._lock:
                self._queued -= len(counted)
                self._queued_bytes -= sum(counted)
        return batch

    def drain(self) -> list[Any]:
        """Everything still queued (the writer died: fail them all)."""
        items = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items

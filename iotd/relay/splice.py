"""Relaying a plain TCP link in the kernel: ``splice(2)`` through a pipe per direction.

Today's path (:mod:`iotd.relay.tcp_sides`) copies every chunk into Python
bytes (``recv``), through the transform when encrypted, and back out
(``send``).  For a plain link that copy is pure overhead: ``os.splice`` moves
the bytes socket -> pipe -> socket without them ever reaching userspace.

How it plugs into Twisted, so that everything except the bytes stays Twisted's:

- **Readiness from the reactor.**  Both sockets stay the reactor's
  ``tcp.Connection`` transports.  :class:`Direction` replaces the *instance*
  methods ``doRead`` of the source transport and ``doWrite`` of the
  destination; the reactor calls them on the same epoll events as before, and
  ``startReading``/``stopReading``/``startWriting`` are Twisted's own.
- **One pipe per direction**, sized :data:`PIPE_SIZE`.  A readable source is
  spliced into the pipe, the pipe straight on into the destination.  What the
  destination does not take stays in the pipe: the source stops reading and
  the destination waits for writable; once the pipe is empty the source reads
  again.  So per direction at most one pipe's worth is in flight inside iotd
  (in kernel pages, none in userspace), and a destination that stops reading
  blocks the sender exactly like today's producer/consumer pairing.
- **A paused side stops splicing.**  :meth:`Direction.pauseProducing` (also
  installed as the source transport's ``pauseProducing``) stops reading it
  and keeps it stopped, pipe drained or not, until ``resumeProducing``.
- **Half-close and close are Twisted's.**  A splice that returns 0 is EOF:
  ``doRead`` returns ``CONNECTION_DONE`` as ``tcp.Connection.doRead`` does,
  the reactor calls ``readConnectionLost``, the relay half-closes the peer
  (``loseWriteConnection``).  The destination's ``doWrite`` first drains the
  pipe and only then hands over to Twisted's own ``doWrite`` (with an empty
  write queue), which does the ``shutdown(SHUT_WR)`` / ``loseConnection``
  bookkeeping.  A failed write into the destination is reported by the
  destination's next ``doWrite`` (the reactor then drops that side, so the
  link closes with that side's reset reason).
- **Where it is not used**: encrypted links (the bytes must pass through the
  cipher), rate-limited links (the gate counts and meters reads), a websocket
  client, a platform without ``os.splice``, a failure creating the pipes
  (e.g. out of file descriptors), ``[devicelink] splice = off``, or
  ``IOTD_RELAY_SPLICE=off`` in the environment (:data:`ENABLED`; the bench
  uses it to measure both paths on the real daemon).  The link then relays exactly as before.

Costs: four file descriptors per relaying link (two pipes), pipe pages in
the kernel (at most ``2 x PIPE_SIZE`` per link while a destination is slow; pipe pages
count toward the user's ``pipe-user-pages-soft``, past which pipes stay at the default size).
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any, Callable

from twisted.internet import main, tcp

ENABLED = os.environ.get("IOTD_RELAY_SPLICE", "auto").strip().lower() not in ("off", "0", "no", "false")
# Bytes one direction's pipe holds, largest first: 1 MiB (the default pipe-max-size) took a
# loopback link from ~11 (64 KiB, the kernel's default) to ~16 Gbit/s and 0.6 to 0.27 CPU s/GB
# (bench/relay.py); an unprivileged process past pipe-user-pages-soft gets a smaller one.
PIPE_SIZES = (1024 * 1024, 256 * 1024)
PIPE_SIZE = PIPE_SIZES[0]  # the most one splice call moves
ROUNDS = 4  # socket -> pipe -> socket rounds per readable event while the destination keeps up

_splice = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


def available() -> bool:
    """``os.splice`` exists and splicing is not switched off."""
    return ENABLED and _splice is not None


def can_splice(transport: Any) -> bool:
    """``transport`` is a plain (no TLS) Twisted TCP connection with a socket we can splice."""
    return (isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)
            and transport.connected and not transport.disconnecting
            and not transport.dataBuffer and not transport._tempDataLen)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    for size in PIPE_SIZES:
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, size)
            break
        except OSError:
            continue  # above pipe-max-size or the user's pipe pages: the default (64 KiB) still works
    return r, w


class Direction:
    """``src`` -> pipe -> ``dst`` for one direction of a link; ``count(n)`` per spliced chunk."""

    def __init__(self, src: Any, dst: Any, count: Callable[[int], None]) -> None:
        self.src, self.dst, self.count = src, dst, count
        self.r, self.w = _pipe()
        self.pending = 0  # bytes in the pipe
        self.paused = False
        self.eof = False
        self.closed = False
        self._error: OSError | None = None
        self._src_fd, self._dst_fd = src.fileno(), dst.fileno()
        self._dst_write = type(dst).doWrite.__get__(dst)  # Twisted's own, for the empty-pipe case
        self._src_pause = type(src).pauseProducing.__get__(src)
        self._src_resume = type(src).resumeProducing.__get__(src)

    def install(self) -> None:
        src, dst = self.src, self.dst
        src.doRead = self.doRead
        src.pauseProducing = self.pauseProducing
        src.resumeProducing = self.resumeProducing
        dst.doWrite = self.doWrite

    # -- the reactor's events ----------------------------------------------

    def doRead(self) -> Any:
        """The source is readable (``src.doRead``)."""
        if self.closed:
            return main.CONNECTION_LOST
        if self.pending:  # should not happen: we stop reading while the pipe holds bytes
            self.src.stopReading()
            return None
        splice, src_fd, dst_fd, r, w = _splice, self._src_fd, self._dst_fd, self.r, self.w
        for _ in range(ROUNDS):
            try:
                n = splice(src_fd, w, PIPE_SIZE, flags=_FLAGS)
            except OSError as e:
                if e.errno in _AGAIN:
                    return None
                return main.CONNECTION_LOST
            if n == 0:
                self.eof = True
                return main.CONNECTION_DONE  # the reactor calls readConnectionLost (half-close)
            self.count(n)
            self.pending = n
            if not self._drain(splice, r, dst_fd):
                return None  # the destination is full (or failed): wait for it
            if n < PIPE_SIZE:
                return None  # probably nothing more to read right now
        return None

    def doWrite(self) -> Any:
        """The destination is writable (``dst.doWrite``)."""
        if self.closed:
            return self._dst_write()
        if self._error is not None:
            return main.CONNECTION_LOST
        if self.pending and not self._drain(_splice, self.r, self._dst_fd):
            return None
        # The pipe is empty: Twisted's own doWrite does the rest (its queue is
        # empty too), i.e. stops writing and carries out a pending (half-)close.
        return self._dst_write()

    def _drain(self, splice: Any, r: int, dst_fd: int) -> bool:
        """Splice the pipe into the destination; True when it is empty."""
        while self.pending:
            try:
                n = splice(r, dst_fd, self.pending, flags=_FLAGS)
            except OSError as e:
                if e.errno not in _AGAIN:
                    self._error = e  # reported by the destination's doWrite
                self._wait_for_dst()
                return False
            self.pending -= n
        src = self.src
        if not self.paused and not self.eof and src.connected and not src.disconnecting:
            src.startReading()
        return True

    def _wait_for_dst(self) -> None:
        self.src.stopReading()
        self.dst.startWriting()

    # -- the source as a producer -------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True
        self._src_pause()

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.pending and not self.eof:
            self._src_resume()

    # -- the end ---------------------------------------------------------------

    def close(self) -> None:
        """Close the pipe (the sockets are the transports' business).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class Splice:
    """Both directions of one link: client -> device (``up``) and device -> client (``down``)."""

    def __init__(self, up: Direction, down: Direction) -> None:
        self.up, self.down = up, down

    @classmethod
    def start(cls, client: Any, device: Any, count_up: Callable[[int], None],
              count_down: Callable[[int], None]) -> Splice | None:
        """Splice between two paired transports, or None (then relay as usual)."""
        if not (available() and can_splice(client) and can_splice(device)):
            return None
        try:
            up = Direction(client, device, count_up)
        except OSError:
            return None
        try:
            down = Direction(device, client, count_down)
        except OSError:
            up.close()
            return None
        up.install()
        down.install()
        return cls(up, down)

    def buffered(self) -> int:
        """Bytes in the pipes (kernel memory, not userspace)."""
        return self.up.pending + self.down.pending

    def close(self) -> None:
        self.up.close()
        self.down.close()

"""HTTP connections: the per-address connection limit and the header deadline, for every site.

Chosen where the spec is silent:

- ``[http] max_connections_per_address`` counts the open HTTP connections
  of one site per client address (the main site and the ``[push] listen``
  site count apart); a connection upgraded to a websocket leaves the count
  (``[websocket] max_connections`` and ``max_connections_per_address``
  govern it from then on).  Beyond the limit the new connection is aborted
  as soon as it is accepted, without an answer (it costs nothing), and
  counted as ``iotd_http_connections_closed_total{reason="per_address"}``.  Clients of a
  unix socket have no address and are not counted.  Behind a reverse proxy
  every client has the proxy's address: raise the limit or set 0.
- ``[http] header_timeout`` is an absolute deadline for one request's line
  and headers: from the connection's opening (first request) or from the
  first byte of the next request on a keep-alive connection, to the blank
  line that ends the headers.  Bytes trickling in do not extend it.  On
  expiry the client gets a 408 JSON answer and the connection is closed
  (``reason="header_timeout"``).  A body is bounded by ``max_body_bytes`` and
  by Twisted's idle timeout, not by this deadline; a keep-alive connection
  idle between requests is closed by that idle timeout (60 s without a byte).
- Either limit tripping logs one line, then at most one a minute per reason
  and site (with the count since), so a flood does not flood the log.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import protocol
from twisted.web import http, server
from twisted.web.resource import Resource

from iotd import errors, metrics
from iotd.logs import Logger

_LOG_EVERY = 60.0  # seconds between two log lines about connections cut for one reason


def write_error(transport: Any, status: bytes, err: errors.ApiError) -> int:
    """Write ``err`` as a whole JSON answer (``connection: close``) straight to ``transport``.

    For answers given outside a request's normal life (413 before the body, 408
    before the headers); returns the body's length.
    """
    body = json.dumps(err.to_json()).encode()
    transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (status, len(body), body))
    return len(body)


class _Cuts:
    """Connections a site cut for one reason: counted each, logged at most once a minute."""

    log = Logger()

    def __init__(self, clock: Any, reason: str, message: str):
        self._clock = clock
        self.reason = reason
        self._message = message
        self._since = 0
        self._next_line = 0.0

    def note(self, host: str) -> None:
        metrics.http_connections_closed.labels(self.reason).inc()
        self._since += 1
        now = self._clock.seconds()
        if now >= self._next_line:
            self.log.warn(self._message + " ({count} such since the last line)", host=host, count=self._since)
            self._since = 0
            self._next_line = now + _LOG_EVERY


class Channel(http.HTTPChannel):
    """An ``HTTPChannel`` with an absolute deadline for each request's headers.

    Twisted's own ``timeOut`` is an idle timeout that every byte resets; this
    deadline is not.  It runs from the connection's opening, or on a
    keep-alive connection from the first byte of the next request, until the
    blank line that ends the headers.
    """

    header_timeout: float | None = None
    client_host: str | None = None
    _awaiting_headers = True
    _headers_due: float | None = None  # when the current request's headers are overdue (None: not counting)
    _header_deadline = None  # one DelayedCall per channel, re-aimed instead of re-created
    _closing = None
    _clock_seconds = None  # the clock's seconds(), found once

    def connectionMade(self):
        super().connectionMade()
        self.site.opened(self)
        self._start_header_clock()

    def dataReceived(self, data):
        if self._awaiting_headers and self._headers_due is None:
            self._start_header_clock()
        super().dataReceived(data)

    def allHeadersReceived(self):
        self._awaiting_headers = False
        self._headers_due = None  # the pending check (if any) finds nothing to do
        super().allHeadersReceived()

    def requestDone(self, request):
        self._awaiting_headers = True  # the next request's deadline starts with its first byte
        super().requestDone(request)

    def connectionLost(self, reason):
        self.site.closed(self)
        self._awaiting_headers = False
        self._headers_due = None
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        super().connectionLost(reason)

    def close_after(self, seconds: float) -> None:
        """Close the connection in ``seconds`` (whatever the client still sends is dropped)."""
        if self._closing is None:
            self._closing = self.callLater(seconds, self._close_now)

    def _close_now(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    # The deadline of a keep-alive connection's every request: a timer per request (callLater,
    # then cancel once the headers are in) cost a tenth of an idle push poll.  Instead one timer
    # per channel checks ``_headers_due`` when it fires and re-aims itself at the current due time.

    def _start_header_clock(self) -> None:
        if self.header_timeout and self.transport is not None:
            self._headers_due = self._seconds() + self.header_timeout
            if self._header_deadline is None:
                self._header_deadline = self.callLater(self.header_timeout, self._check_headers)

    def _seconds(self) -> float:
        seconds = self._clock_seconds
        if seconds is None:
            clock = getattr(self.callLater, "__self__", None)  # the reactor (or a test's Clock)
            seconds = self._clock_seconds = clock.seconds if clock is not None else time.time
        return seconds()

    def _check_headers(self) -> None:
        self._header_deadline = None
        due = self._headers_due
        if due is None or not self._awaiting_headers or self.transport is None:
            return  # the headers came in: the next request's first byte starts the clock again
        left = due - self._seconds()
        if left > 0:
            self._header_deadline = self.callLater(left, self._check_headers)
            return
        self._headers_overdue()

    def _headers_overdue(self) -> None:
        self._headers_due = None
        self._awaiting_headers = False
        host = getattr(self.transport.getPeer(), "host", "-")
        self.site.slow_headers.note(host)
        write_error(self.transport, b"408 Request Timeout",
                    errors.ApiError(f"request headers not complete within {self.header_timeout:g} s",
                                    code="header_timeout", status=408))
        metrics.http_request_status(408).inc()
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.loseConnection()
        # A client that does not read keeps the 408 in our buffer: abort as Twisted's timeout does.
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)


class _Refused(protocol.Protocol):
    """A connection over the per-address limit: aborted as soon as it is made."""

    def connectionMade(self):
        self.transport.abortConnection()


class Site(server.Site):
    """Per-address connection limit, header deadline, and an access log for every answer.

    Counts every answered request by status; skips the access log for
    ``request.quiet``: a hot path (an idle push poll) sets it so thousands of
    identical lines a second do not cost the reactor; it is still counted.
    """

    protocol = Channel

    def __init__(self, resource: Resource, *args: Any, max_per_address: int = 0,
                 header_timeout: float | None = None, **kwargs: Any):
        super().__init__(resource, *args, **kwargs)
        self.max_per_address = max_per_address
        self.header_timeout = header_timeout
        self._open: dict[str, set[Channel]] = {}
        self.too_many = _Cuts(self.reactor, "per_address",
                              "closed a new connection from {host}: over max_connections_per_address")
        self.slow_headers = _Cuts(self.reactor, "header_timeout",
                                  "closed a connection from {host}: headers not complete within header_timeout")

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None)
        if self.max_per_address and host is not None and self._at_limit(host):
            self.too_many.note(host)
            return _Refused()
        channel = super().buildProtocol(addr)
        channel.header_timeout = self.header_timeout
        channel.client_host = host
        return channel

    def _at_limit(self, host: str) -> bool:
        channels = self._open.get(host)
        if not channels or len(channels) < self.max_per_address:
            return False
        # A connection upgraded to a websocket has left HTTP (autobahn took its transport);
        # the [websocket] limits count it from then on.
        channels.difference_update([c for c in channels if c.transport is None])
        return len(channels) >= self.max_per_address

    def opened(self, channel: Channel) -> None:
        if channel.client_host is not None:
            self._open.setdefault(channel.client_host, set()).add(channel)

    def closed(self, channel: Channel) -> None:
        channels = self._open.get(channel.client_host)
        if channels is not None:
            channels.discard(channel)
            if not channels:
                del self._open[channel.client_host]

    def log(self, request):
        metrics.http_request_status(request.code).inc()
        if not getattr(request, "quiet", False):
            super().log(request)

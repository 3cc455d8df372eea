"""Websocket clients for the websocket tests.

The daemon runs on the Twisted reactor in the test thread; each client is the
``websockets`` library's real (threaded, blocking) client, and every blocking
call runs in its own thread and comes back as a Deferred, so tests simply
``await`` them.  :class:`RawClient` is a bare TCP socket that performs the
handshake and then never reads (the slow client).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet import defer, reactor, task
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """Run a blocking call in a fresh thread; its result as a Deferred."""
    d: defer.Deferred = defer.Deferred()

    def run():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            reactor.callFromThread(d.errback, e)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, daemon=True).start()
    return d


def sockets_of(daemon: Any, kind: str) -> Any:
    """The socket factory of one kind (``element`` or ``subscribe``): its job's service holds it."""
    return daemon.top.getServiceNamed(f"{kind}-ws").factory


def ws_url(daemon: Any, path: str, **query: Any) -> str:
    url = daemon.url.replace("http://", "ws://") + path
    if query:
        url += "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in query.items())
    return url


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await sleep(step)


async def until(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 10.0,
                step: float = 0.02) -> Any:
    """``await read()`` until ``done(value)`` or ``timeout`` seconds passed; the last value (the test asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if done(value) or time.monotonic() > deadline:
            return value
        await sleep(step)


class Client:
    """One ``websockets`` client connection, awaited from the reactor thread."""

    def __init__(self, conn: Any):
        self.conn = conn

    @classmethod
    async def open(cls, url: str, headers: dict | None = None, **kwargs: Any) -> "Client":
        kwargs.setdefault("ping_interval", None)  # tests decide when the client pings
        kwargs.setdefault("proxy", None)
        kwargs.setdefault("open_timeout", 5)
        kwargs.setdefault("close_timeout", 2)
        kwargs.setdefault("legacy", True)
        conn = await in_thread(connect, url, additional_headers=headers or {}, **kwargs)
        return cls(conn)

    async def recv(self, timeout: float = 5.0) -> Any:
        return await in_thread(self.conn.recv, timeout)

    async def recv_json(self, timeout: float = 5.0) -> Any:
        return json.loads(await self.recv(timeout))

    async def frames(self, count: int, timeout: float = 5.0) -> list:
        """The next ``count`` JSON frames."""
        return [await self.recv_json(timeout) for _ in range(count)]

    async def events(self, count: int, timeout: float = 5.0) -> list[dict]:
        """Read frames until ``count`` events (elements of the frame arrays) arrived."""
        out: list[dict] = []
        while len(out) < count:
            frame = await self.recv_json(timeout)
            assert isinstance(frame, list) and frame, frame
            out.extend(frame)
        return out

    async def silent(self, seconds: float = 0.3) -> None:
        """Assert that nothing arrives for ``seconds``."""
        try:
            got = await in_thread(self.conn.recv, seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message {got!r}")

    async def send(self, message: Any) -> None:
        if not isinstance(message, (str, bytes)):
            message = json.dumps(message)
        await in_thread(self.conn.send, message)

    async def send_many(self, messages: list) -> None:
        def run():
            for message in messages:
                self.conn.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
        await in_thread(run)

    async def recv_many(self, count: int, timeout: float = 10.0) -> list:
        def run():
            return [json.loads(self.conn.recv(timeout)) for _ in range(count)]
        return await in_thread(run)

    async def request(self, message: Any, timeout: float = 5.0) -> Any:
        await self.send(message)
        return await self.recv_json(timeout)

    async def request_text(self, message: str, timeout: float = 5.0) -> Any:
        await self.send(message)
        return await self.recv(timeout)

    async def ping(self, timeout: float = 5.0) -> bool:
        """Send an RFC ping; True when the pong came back."""
        event = self.conn.ping()
        return await in_thread(event.wait, timeout)

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Wait for the server to close; ``(code, reason)`` it sent (1006: none)."""
        def wait():
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.conn.recv(max(0.01, deadline - time.monotonic()))
                except ConnectionClosed as e:
                    rcvd = e.rcvd
                    return (rcvd.code, rcvd.reason) if rcvd is not None else (1006, None)
                if time.monotonic() > deadline:
                    raise TimeoutError("connection still open")
        return await in_thread(wait)

    async def close(self) -> None:
        await in_thread(self.conn.close)


async def handshake_error(url: str, headers: dict | None = None) -> tuple[int, Any]:
    """The HTTP status and JSON body of a refused upgrade."""
    try:
        client = await Client.open(url, headers)
    except InvalidStatus as e:
        body = e.response.body
        try:
            return e.response.status_code, json.loads(body)
        except ValueError:
            return e.response.status_code, body
    await client.close()
    raise AssertionError("the upgrade was accepted")


class RawClient:
    """A TCP client that completes the websocket handshake and then never reads."""

    def __init__(self, sock: socket.socket, greeting: bytes):
        self.sock = sock
        self.greeting = greeting

    @classmethod
    async def open(cls, daemon: Any, path: str) -> "RawClient":
        def run():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", daemon.port))
            nonce = base64.b64encode(os.urandom(16)).decode()
            sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n"
                          "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            data = b""
            sock.settimeout(5)
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(1)  # byte by byte: leave everything after the head unread
                if not chunk:
                    break
                data += chunk
            return cls(sock, data)

        return await in_thread(run)

    @property
    def status(self) -> int:
        return int(self.greeting.split(b" ", 2)[1])

    def drain_until_closed(self, timeout: float = 5.0) -> tuple[bytes, str]:
        """Read until the server ends the connection (blocking): data and "eof"/"reset"/"timeout"."""
        self.sock.settimeout(timeout)
        out = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return out, "eof"
                out += chunk
        except ConnectionResetError:
            return out, "reset"
        except TimeoutError:
            return out, "timeout"

    def read_events(self, count: int, timeout: float = 10.0) -> list:
        """Read text frames (JSON arrays) until ``count`` events arrived (blocking)."""
        self.sock.settimeout(timeout)
        data, events = b"", []
        while len(events) < count:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
            frames = parse_frames(data)
            consumed = sum(_frame_size(payload) for _, payload in frames)
            data = data[consumed:]
            for opcode, payload in frames:
                if opcode == 0x1:
                    events.extend(json.loads(payload))
        return events

    def send_text(self, text: str) -> None:
        """One masked text frame (payload under 126 bytes)."""
        payload = text.encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        self.sock.close()


def _frame_size(payload: bytes) -> int:
    n = len(payload)
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, payload)`` of each complete unmasked server frame in ``data``."""
    frames = []
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(data[2:10], "big"), 10
        if len(data) < offset + length:
            break
        frames.append((opcode, data[offset:offset + length]))
        data = data[offset + length:]
    return frames

"""The raw asyncio websocket client the cluster bench's client processes use (handshake, then
count frames or parse them for latency); the fan-out bench uses the compiled ``fanclient.c``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from typing import Any


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + key + masked


class WsClient(asyncio.Protocol):
    """A raw websocket client: handshake, then count frames (or parse them for latency)."""

    def __init__(self, spec: dict, stats: dict, path: str, ready: asyncio.Future):
        self.spec, self.stats, self.path, self.ready = spec, stats, path, ready
        self.marker = spec["marker"].encode()
        self.buf = b""
        self.upgraded = False
        self.parse = spec["mode"] == "latency"
        self.subscribed = spec.get("sub") is None
        self.transport: Any = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        nonce = base64.b64encode(os.urandom(16)).decode()
        headers = "".join(f"{k}: {v}\r\n" for k, v in self.spec.get("headers", {}).items())
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.spec['port']}\r\n"
                         "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n").encode())

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.stats["refused"] += 1
                if not self.ready.done():
                    self.ready.set_exception(RuntimeError(head.split(b"\r\n", 1)[0].decode()))
                self.transport.close()
                return
            self.upgraded = True
            self.stats["open"] += 1
            if self.spec.get("sub") is not None:
                self.transport.write(_mask(json.dumps(self.spec["sub"]).encode()))
            elif not self.ready.done():
                self.ready.set_result(None)
            self.buf = b""
            data = rest
            if not data:
                return
        if not self.subscribed:
            self.buf += data
            if b"subRet" in self.buf:
                self.subscribed = True
                self.buf = b""
                if not self.ready.done():
                    self.ready.set_result(None)
            return
        if self.parse:
            self._frames(data)
        else:
            chunk = self.buf + data
            self.stats["frames"] += chunk.count(self.marker)
            self.buf = chunk[-(len(self.marker) - 1):]

    def _frames(self, data: bytes) -> None:
        buf = self.buf + data
        now = time.time()
        while len(buf) >= 2:
            opcode, length, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, offset = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, offset = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < offset + length:
                break
            payload = buf[offset:offset + length]
            buf = buf[offset + length:]
            if opcode == 1 and self.marker in payload:
                for event in json.loads(payload):
                    self.stats["frames"] += 1
                    sent = event["body"]["payload"]
                    self.stats["lat"].append((sent["seq"], now, sent["ts"]))
        self.buf = buf

    def connection_lost(self, exc) -> None:
        if self.upgraded:
            self.stats["open"] -= 1
            self.stats["lost"] += 1

"""Fan-out bench: ingest over REST -> websocket delivery to 1,000 sockets.

Processes (all on loopback, started by :func:`run`):

* the server under test: the real daemon (``twistd iotd`` with a temp-dir
  config and default settings) or the peer, a minimal broadcast server written
  with the asyncio ``websockets`` library (``--peer``) that answers the same
  ingest URL and sends the same ELEMENT-shaped frames;
* the clients (``--clients``): raw asyncio websocket clients (1,000 or
  10,000 in one process) that count frames and, for the latency row, parse
  the send timestamp embedded in each payload;
* the ingester (``--ingest``): posts packets over keep-alive HTTP, either as
  fast as the server answers (closed loop, ``--batch`` events per request) or
  at a fixed rate (open loop, one event per request).

Rows:

* ``fanout_1000``: 1,000 sockets on one device's packet socket; events
  delivered per second (frames received, all sockets together) at saturation
  (the ingester posts batches of 20 in a closed loop, 2 requests in flight).
* ``fanout_1000_postgresql``: the same on iotd with ``[store] url`` on a
  fresh PostgreSQL database; peer = iotd on SQLite, the two alternating in
  the same run (3 rounds each, medians, with the spread).
* ``fanout_subscribe_1000``: 1,000 subscription connections, each with
  ``up.sub devicePublish {projectID}``; same peer figure.
* ``fanout_latency_p99``: 1,000 device sockets on 1,000 devices, 1,000
  events/s ingested round-robin (one event per request).  ``iotd``/``peer``
  and ``p50``: ms from the ingest acknowledged (the ingester notes when each
  201 arrived) to the frame received (0 when the frame came first); ratio =
  peer/iotd.  ``send_p50``/``send_p99``: ms from the request being sent (the
  timestamp embedded in the payload) to the frame received, i.e. including
  the ingest itself (HTTP, validation, the SQLite commit).
* ``idle_sockets_10000_rss_mb``: RSS of the daemon holding 10,000 idle
  sockets; ratio = 500/measured.

``python bench/fanout.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import (median, merge_results, pg_database, print_table, stop_process,  # noqa: E402
                     free_port, http, percentile, raise_nofile)

PY = sys.executable
TWISTD = os.path.join(os.path.dirname(PY), "twistd")
IOTD_SOCKETS = 1000


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


# -- the servers ----------------------------------------------------------------


class Iotd:
    """The real daemon: ``twistd --nodaemon iotd -c <tmp>/iotd.ini`` with default settings."""

    name = "iotd"

    def __init__(self, store_url: str = "") -> None:
        self.dir = tempfile.mkdtemp(prefix="iotd-fanout-")
        self.port = free_port()
        self.ws_port = self.http_port = self.port
        with open(os.path.join(self.dir, "iotd.ini"), "w") as f:
            f.write(f"[iotd]\ndata_dir = data\nlog_level = warn\n"
                    f"[http]\nlisten = tcp:{self.port}:interface=127.0.0.1\n"
                    f"max_connections_per_address = 0\n"  # every bench client is 127.0.0.1
                    + (f"[store]\nurl = {store_url}\n" if store_url else ""))
        self.proc: subprocess.Popen | None = None
        self.key = ""

    def start(self) -> "Iotd":
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.log = open(os.path.join(self.dir, "twistd.log"), "wb")
        self.proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "--logfile=twistd.log", "iotd",
                                      "-c", "iotd.ini"], cwd=self.dir, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("twistd exited: " + open(os.path.join(self.dir, "twistd.log")).read()[-2000:])
            try:
                if http("GET", self.url("/healthz"))[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        with open(os.path.join(self.dir, "data", "admin.key")) as f:
            self.key = f.read().strip()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def put_device(self, identifier: str, **fields: Any) -> None:
        status, body = http("PUT", self.url(f"/api/v1/devices/{identifier}"), fields, self.key)
        assert status in (200, 201), body

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Peer:
    """The minimal asyncio ``websockets`` broadcast server (``--peer``), in its own process."""

    name = "websockets-asyncio"

    def __init__(self) -> None:
        self.ws_port = free_port()
        self.http_port = free_port()
        self.key = ""
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Peer":
        self.proc = subprocess.Popen([PY, __file__, "--peer", str(self.ws_port), str(self.http_port)],
                                     preexec_fn=raise_nofile)
        wait_port(self.ws_port)
        wait_port(self.http_port)
        return self

    def put_device(self, identifier: str, **fields: Any) -> None:
        pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- peer server process -----------------------------------------------------------


def peer_main(ws_port: int, http_port: int) -> None:
    """Minimal broadcast server: websockets for the sockets, a tiny HTTP/1.1 ingest."""
    from datetime import datetime, timezone

    import logging

    from websockets.asyncio.server import broadcast, serve
    from websockets.exceptions import ConnectionClosed

    logging.getLogger("websockets").setLevel(logging.CRITICAL)

    channels: dict[str, set] = {}
    next_id = [0]

    def now_iso() -> str:
        return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    async def handler(connection) -> None:
        # /api/v1/devices/{device}/packets/socket (the same URL shape as iotd)
        parts = connection.request.path.split("?")[0].split("/")
        channel = parts[4].upper() if len(parts) > 4 else "*"
        channels.setdefault(channel, set()).add(connection)
        try:
            async for message in connection:
                if message == "ping":
                    await connection.send("pong")
        except ConnectionClosed:
            pass
        finally:
            channels[channel].discard(connection)

    async def ingest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                length = 0
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b""):
                        break
                    name, _, value = h.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                device = line.split()[1].decode().split("/")[4].upper()
                many = isinstance(body, list)
                out = []
                stamp = now_iso()
                for item in body if many else [body]:
                    next_id[0] += 1
                    event = {"id": next_id[0], "device_id": device, "inserted_at": now_iso(),
                             "interface_id": None, "transceived_at": stamp,
                             "payload_encoding": item.get("payload_encoding", "json"),
                             "payload": item.get("payload"), "packet_type": "up", "meta": {}}
                    message = json.dumps([{"event": "packet_added", "body": event}], separators=(",", ":"))
                    broadcast(channels.get(device, ()), message)
                    out.append(event)
                resp = json.dumps(out if many else out[0]).encode()
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(resp), resp))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        async with serve(handler, "127.0.0.1", ws_port, ping_interval=None, compression=None,
                         max_queue=None, backlog=2048):
            server = await asyncio.start_server(ingest, "127.0.0.1", http_port, backlog=1024)
            async with server:
                await asyncio.Future()

    asyncio.run(main())


# -- clients process -------------------------------------------------------------------


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


def clients_main(spec: dict) -> None:
    raise_nofile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stats = {"open": 0, "frames": 0, "refused": 0, "lost": 0, "lat": []}
        sem = asyncio.Semaphore(spec.get("concurrency", 200))
        clients: list = []

        async def one(i: int) -> None:
            path = spec["path"].replace("{i}", str(i % spec.get("spread", 1)))
            async with sem:
                ready = loop.create_future()
                for attempt in range(5):
                    try:
                        transport, proto = await loop.create_connection(
                            lambda: WsClient(spec, stats, path, ready), "127.0.0.1", spec["port"])
                        break
                    except OSError:
                        await asyncio.sleep(0.1 * (attempt + 1))
                else:
                    raise RuntimeError("cannot connect")
                clients.append(proto)
                await asyncio.wait_for(ready, 30)

        await asyncio.gather(*(one(i) for i in range(spec["n"])))
        print(f"ready {stats['open']}", flush=True)

        async def keepalive() -> None:  # any client frame keeps both socket kinds alive
            while True:
                await asyncio.sleep(20)
                text = b'{"type":"up.ping"}' if spec.get("sub") else b"ping"
                for c in clients:
                    if c.upgraded and not c.transport.is_closing():
                        c.transport.write(_mask(text))

        task = asyncio.ensure_future(keepalive())
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), 0.25)
            except asyncio.TimeoutError:
                line = None
            if line == b"":
                break
            if line and line.strip() == b"reset":
                stats["frames"], stats["lat"] = 0, []
            if line and line.strip() == b"report":
                print("report " + json.dumps({"frames": stats["frames"], "open": stats["open"],
                                              "lost": stats["lost"], "received": stats["lat"]}), flush=True)
            if line and line.strip() == b"quit":
                break
            if line and line.strip() == b"tick":
                print(f"count {time.time():.4f} {stats['frames']} {stats['open']}", flush=True)
        task.cancel()
        for c in clients:
            c.transport.abort()

    asyncio.run(main())


class Clients:
    """The clients process, driven over stdin/stdout."""

    def __init__(self, spec: dict):
        self.proc = subprocess.Popen([PY, __file__, "--clients", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=raise_nofile)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.strip())

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for i, line in enumerate(self.lines):
                    if line.startswith(prefix):
                        del self.lines[: i + 1]
                        return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"clients exited {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError(f"clients: no {prefix!r} in {timeout} s")

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def count(self) -> tuple[float, int, int]:
        self.send("tick")
        _, t, frames, open_ = self.wait_for("count").split()
        return float(t), int(frames), int(open_)

    def report(self) -> dict:
        self.send("report")
        return json.loads(self.wait_for("report")[len("report "):])

    def stop(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(20)
        except Exception:
            self.proc.kill()
            self.proc.wait()


# -- ingester process ------------------------------------------------------------------


def ingest_main(spec: dict) -> None:
    """Post packets: closed loop (``rate`` 0, ``batch`` per request) or open loop at ``rate``/s."""
    raise_nofile()

    async def main() -> None:
        port, key, devices = spec["port"], spec.get("key", ""), spec["devices"]
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        conns = []
        for _ in range(spec["concurrency"]):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        deadline = time.monotonic() + spec["duration"]
        sent = [0]
        errors = [0]
        acks: dict[int, float] = {}

        async def post(conn, device: str, body: Any, seq: int = -1) -> None:
            reader, writer = conn
            data = json.dumps(body).encode()
            writer.write((f"POST /api/v1/devices/{device}/packets HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)
            status = await reader.readline()
            length, chunked = 0, False
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b""):
                    break
                name, _, value = h.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            else:
                await reader.readexactly(length)
            if b" 201 " not in status:
                errors[0] += 1
            elif seq >= 0:
                acks[seq] = time.time()

        def packet(seq: int) -> dict:
            return {"payload": {"ts": time.time(), "seq": seq, "pad": "x" * spec.get("pad", 64)},
                    "payload_encoding": "json"}

        if spec["rate"] <= 0:
            async def loop_(conn) -> None:
                while time.monotonic() < deadline:
                    items = [packet(sent[0] + i) for i in range(spec["batch"])]
                    sent[0] += len(items)
                    await post(conn, devices[0], items if spec["batch"] > 1 else items[0])

            await asyncio.gather(*(loop_(c) for c in conns))
        else:
            free: asyncio.Queue = asyncio.Queue()
            for c in conns:
                free.put_nowait(c)
            start = time.monotonic()
            pending = set()
            seq = 0

            async def one(seq: int) -> None:
                conn = await free.get()
                try:
                    await post(conn, devices[seq % len(devices)], packet(seq), seq)
                finally:
                    free.put_nowait(conn)

            while time.monotonic() < deadline:
                due = start + seq / spec["rate"]
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.ensure_future(one(seq))
                pending.add(task)
                task.add_done_callback(pending.discard)
                seq += 1
            sent[0] = seq
            await asyncio.gather(*pending)
        print(json.dumps({"sent": sent[0], "errors": errors[0], "acks": acks}), flush=True)

    asyncio.run(main())


def run_ingest(spec: dict) -> dict:
    out = subprocess.run([PY, __file__, "--ingest", json.dumps(spec)], capture_output=True, text=True,
                         timeout=spec["duration"] + 120, preexec_fn=raise_nofile)
    if out.returncode != 0:
        raise RuntimeError("ingester failed: " + out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the phases -----------------------------------------------------------------------------


def ws_path(server: Any, path: str, query: str = "") -> str:
    if isinstance(server, Iotd):
        sep = "&" if "?" in path else "?"
        return f"{path}{sep}auth={server.key}{query}"
    return path


def throughput(server: Any, kind: str, quick: bool) -> dict:
    """Frames delivered per second to 1,000 sockets with the ingester in a closed loop."""
    device = "BENCH-0"
    server.put_device(device, productID="bench", deviceName="d0", projectID="p1")
    spec: dict[str, Any] = {"port": server.ws_port, "n": IOTD_SOCKETS, "mode": "count"}
    if kind == "subscribe" and isinstance(server, Iotd):
        spec.update(path=f"/api/v1/system/common/websocket/connect?token={server.key}", marker='"down.pub"',
                    sub={"type": "up.sub", "body": {"code": "devicePublish", "params": {"projectID": "p1"}}})
    else:
        spec.update(path=ws_path(server, f"/api/v1/devices/{device}/packets/socket"), marker="packet_added")
    clients = Clients(spec)
    try:
        clients.wait_for("ready")
        duration = 3.5 if quick else 10.0  # the window starts after a 2.5 s ramp
        ingest = {"port": server.http_port, "key": server.key, "devices": [device], "rate": 0,
                  "batch": 20, "concurrency": 2, "duration": duration}
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(run_ingest(ingest)))
        thread.start()
        time.sleep(1.5)  # warm up
        t0, f0, _ = clients.count()
        time.sleep(duration - 2.5)
        t1, f1, open_ = clients.count()
        thread.join()
        rate = (f1 - f0) / (t1 - t0)
        return {"rate": rate, "open": open_, "sent": result.get("sent"), "errors": result.get("errors")}
    finally:
        clients.stop()


def latency(server: Any, quick: bool) -> dict:
    """1,000 device sockets on 1,000 devices; 1,000 events/s round-robin; ms send -> frame."""
    n = IOTD_SOCKETS
    devices = [f"BENCH-{i}" for i in range(n)]
    for d in devices:
        server.put_device(d)
    spec = {"port": server.ws_port, "n": n, "spread": n, "mode": "latency", "marker": "packet_added",
            "path": ws_path(server, "/api/v1/devices/BENCH-{i}/packets/socket")}
    clients = Clients(spec)
    try:
        clients.wait_for("ready")
        duration = 3.0 if quick else 10.0
        ingest = {"port": server.http_port, "key": server.key, "devices": devices, "rate": 1000,
                  "batch": 1, "concurrency": 16, "duration": duration}
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(run_ingest(ingest)))
        thread.start()
        time.sleep(1.0)
        clients.send("reset")  # measure after a second of warm-up
        thread.join()
        time.sleep(0.5)
        report = clients.report()
        acks = {int(k): v for k, v in result["acks"].items()}
        # from the ingest acknowledged to the frame received (0 when the frame came first),
        # and from the ingest request sent (the timestamp in the payload) to the frame received
        from_ack = [max(0.0, now - acks[seq]) * 1000 for seq, now, _ in report["received"] if seq in acks]
        from_send = [(now - sent) * 1000 for _, now, sent in report["received"]]
        return {"frames": len(report["received"]), "open": report["open"], "lost": report["lost"],
                "sent": result.get("sent"), "errors": result.get("errors"),
                "p50": percentile(from_ack, 0.5), "p99": percentile(from_ack, 0.99),
                "send_p50": percentile(from_send, 0.5), "send_p99": percentile(from_send, 0.99)}
    finally:
        clients.stop()


def idle_rss(quick: bool) -> dict:
    n = 10000
    server = Iotd().start()
    try:
        server.put_device("BENCH-0")
        base = rss_mb(server.proc.pid)
        clients = Clients({"port": server.ws_port, "n": n, "mode": "idle", "marker": "packet_added",
                           "concurrency": 100, "path": ws_path(server, "/api/v1/devices/BENCH-0/packets/socket")})
        try:
            line = clients.wait_for("ready", timeout=300)
            time.sleep(1.0)
            rss = rss_mb(server.proc.pid)
            return {"rss": rss, "base": base, "open": int(line.split()[1]), "n": n}
        finally:
            clients.stop()
    finally:
        server.stop()


def with_server(cls: type, fn, *args):
    server = cls().start()
    try:
        return fn(server, *args)
    finally:
        server.stop()


def _spread(runs: list[dict]) -> str:
    return f"{min(r['rate'] for r in runs):.0f}-{max(r['rate'] for r in runs):.0f}"


def fanout_rounds(quick: bool, pg_url: str | None) -> dict[str, list[dict]]:
    """``fanout_1000`` on iotd (SQLite), iotd (PostgreSQL, when reachable) and the peer, alternating,
    3 rounds (1 with ``--quick``); each run on a fresh server with the same work."""
    runs: dict[str, list[dict]] = {"sqlite": [], "postgresql": [], "peer": []}
    for _ in range(1 if quick else 3):
        runs["sqlite"].append(with_server(Iotd, throughput, "element", quick))
        if pg_url:
            with pg_database() as url:  # a fresh database per run, as the SQLite runs get a fresh file
                runs["postgresql"].append(with_server(lambda: Iotd(url), throughput, "element", quick))
        runs["peer"].append(with_server(Peer, throughput, "element", quick))
    return runs


def run(quick: bool = False) -> list[dict]:
    raise_nofile()
    rows = []
    with pg_database() as probe:  # is PostgreSQL there at all?
        pg_url = probe
    runs = fanout_rounds(quick, pg_url)
    iotd = {"rate": median(r["rate"] for r in runs["sqlite"]), "open": runs["sqlite"][-1]["open"],
            "sent": runs["sqlite"][-1]["sent"]}
    peer = {"rate": median(r["rate"] for r in runs["peer"]), "sent": runs["peer"][-1]["sent"]}
    iotd_sub = with_server(Iotd, throughput, "subscribe", quick)
    peer = with_server(Peer, throughput, "element", quick)
    rows.append({"name": "fanout_1000", "unit": "events/s", "iotd": round(iotd["rate"]),
                 "peer_name": Peer.name, "peer": round(peer["rate"]),
                 "ratio": round(iotd["rate"] / peer["rate"], 3) if peer["rate"] else None,
                 "open": iotd["open"], "ingested": iotd["sent"], "peer_ingested": peer["sent"],
                 "runs": len(runs["sqlite"]), "spread": _spread(runs["sqlite"]), "peer_spread": _spread(runs["peer"])})
    if runs["postgresql"]:
        pg = median(r["rate"] for r in runs["postgresql"])
        rows.append({"name": "fanout_1000_postgresql", "unit": "events/s", "iotd": round(pg),
                     "peer_name": "iotd on SQLite", "peer": round(iotd["rate"]),
                     "ratio": round(pg / iotd["rate"], 3) if iotd["rate"] else None,
                     "runs": len(runs["postgresql"]), "spread": _spread(runs["postgresql"]),
                     "open": runs["postgresql"][-1]["open"]})
    rows.append({"name": "fanout_subscribe_1000", "unit": "events/s", "iotd": round(iotd_sub["rate"]),
                 "peer_name": Peer.name, "peer": round(peer["rate"]),
                 "ratio": round(iotd_sub["rate"] / peer["rate"], 3) if peer["rate"] else None,
                 "open": iotd_sub["open"], "ingested": iotd_sub["sent"]})
    lat = with_server(Iotd, latency, quick)
    peer_lat = with_server(Peer, latency, quick)
    rows.append({"name": "fanout_latency_p99", "unit": "ms", "iotd": round(lat["p99"], 3),
                 "peer_name": Peer.name, "peer": round(peer_lat["p99"], 3),
                 "ratio": round(peer_lat["p99"] / lat["p99"], 3) if lat["p99"] else None,
                 "p50": round(lat["p50"], 3), "peer_p50": round(peer_lat["p50"], 3),
                 # from the ingest request sent (timestamp in the payload), ingest included
                 "send_p50": round(lat["send_p50"], 2), "send_p99": round(lat["send_p99"], 2),
                 "peer_send_p99": round(peer_lat["send_p99"], 2),
                 "frames": lat["frames"], "ingested": lat["sent"]})
    idle = idle_rss(quick)
    rows.append({"name": "idle_sockets_10000_rss_mb", "unit": "MB", "iotd": round(idle["rss"], 1),
                 "peer_name": "none", "peer": None, "ratio": round(500 / idle["rss"], 3),
                 "open": idle["open"], "base_mb": round(idle["base"], 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="websocket fan-out bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="merge the rows into this results file")
    parser.add_argument("--peer", nargs=2, type=int, metavar=("WS_PORT", "HTTP_PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", help=argparse.SUPPRESS)
    parser.add_argument("--ingest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        raise_nofile()
        peer_main(*args.peer)
        return
    if args.clients:
        clients_main(json.loads(args.clients))
        return
    if args.ingest:
        ingest_main(json.loads(args.ingest))
        return
    rows = run(args.quick)
    print_table(rows)
    if args.json and merge_results is not None:
        merge_results(args.json, rows)
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

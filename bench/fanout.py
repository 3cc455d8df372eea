"""Fan-out bench: device send -> client frame, through the real ``twistd iotd`` and its peers.

Every server gets exactly the same work -- the same events (same payload, same
rates, same count), the same number of sockets, the same client program:

* servers: ``twistd iotd`` from this checkout (``Daemon``: temp dir, default
  settings, SQLite), every event ingested over REST and committed before it
  is published; the peers: a minimal broadcast server on the asyncio
  ``websockets`` library (``--peer``, same ingest URL, same ELEMENT-shaped
  frames, nothing stored) and Mosquitto (QoS 0, no persistence, every
  subscriber an MQTT connection, the events published by an MQTT client).
* the client: ``bench/fanclient.c`` (compiled on first use), N websocket or
  MQTT connections on one epoll loop; it scans what it receives for the
  send time in each event's payload and records ``now - ts`` per event.  Its
  CPU use is reported per run (``client_cpu``, cores) so one can see it is
  not the limit.
* the ingester (``--ingest``): asyncio, HTTP/1.1 keep-alive (iotd, the
  ``websockets`` peer) or MQTT (Mosquitto).  Open loop: event ``seq`` is due
  at ``start + seq/rate`` and carries that due time as ``ts`` (so a server
  that makes the ingester wait is charged for it: no coordinated omission),
  one event per request over up to 64 connections.

The servers run side by side for a scenario (idle while not measured), each
with its clients connected once; runs alternate between them, rotating who
goes first, >= 3 each, medians with min-max.

Rows:

* ``fanout_send_p99_100x1000``: 1,000 sockets on ONE device, 100 events/s
  open loop (100,000 frames/s): device send -> client frame p99 (p50, max in
  the row), ms; ratio = the better peer's p99 / iotd's.  ``ack_p50``/``ack_p99``:
  iotd's ingest acknowledgement.
* ``fanout_send_p99_1000x1``: 1,000 devices x 1 socket, 1,000 events/s
  round-robin.
* ``fanout_equal_work``: 5,000 events (100 with ``--quick``) to 1,000
  sockets on one device, sent as fast as each server takes them (HTTP:
  batches of 20, 2 requests in flight; MQTT: one publisher); from the first
  send to the last socket's last event -> events delivered per second.
* ``idle_sockets_10000_rss_mb``: RSS of the daemon holding 10,000 idle
  sockets; ratio = 300 MB (the target) / measured.

``python bench/fanout.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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
sys.path.insert(0, HERE)
from _common import (Daemon, free_port, machine, median, merge_results, print_table,  # noqa: E402
                     raise_nofile, spread, stop_process, today)

PY = sys.executable
SOCKETS = 1000
CLIENT_SRC = os.path.join(HERE, "fanclient.c")


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_binary() -> str:
    """``fanclient.c`` compiled once per source version (cached in the temp dir)."""
    with open(CLIENT_SRC, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"iotd-bench-fanclient-{digest}")
    if not os.path.exists(path):
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("the fan-out client needs a C compiler (cc); apt-get install gcc")
        subprocess.run([cc, "-O2", "-o", path + ".tmp", CLIENT_SRC], check=True)
        os.replace(path + ".tmp", path)
    return path


# -- the servers ----------------------------------------------------------------


class Iotd:
    """The real daemon with default settings; events over REST, sockets on the HTTP port."""

    name = "iotd"
    proto = "ws"

    def __init__(self, ini: str = "") -> None:
        self.daemon = Daemon(ini, name="fanout")

    def start(self) -> "Iotd":
        self.daemon.start()
        self.port = self.http_port = self.daemon.port
        self.key = self.daemon.key
        self.pid = self.daemon.proc.pid
        return self

    def devices(self, names: list[str]) -> None:
        for name in names:
            self.daemon.call("PUT", f"/api/v1/devices/{name}", {})

    def template(self) -> str:
        return f"/api/v1/devices/BENCH-%d/packets/socket?auth={self.key}"

    def stop(self) -> None:
        self.daemon.stop()


class WsPeer:
    """The minimal asyncio ``websockets`` broadcast server (``--peer``), in its own process."""

    name = "websockets"
    proto = "ws"
    key = ""

    def start(self) -> "WsPeer":
        self.port, self.http_port = free_port(), free_port()
        self.proc = subprocess.Popen([PY, __file__, "--peer", str(self.port), str(self.http_port)],
                                     preexec_fn=raise_nofile)
        wait_port(self.port)
        wait_port(self.http_port)
        self.pid = self.proc.pid
        return self

    def devices(self, names: list[str]) -> None:
        pass

    def template(self) -> str:
        return "/api/v1/devices/BENCH-%d/packets/socket"

    def stop(self) -> None:
        stop_process(self.proc)


class Mosquitto:
    """Mosquitto 2 on loopback: QoS 0, no persistence, TCP_NODELAY on (its best for latency)."""

    name = "mosquitto"
    proto = "mqtt"
    key = ""

    def start(self) -> "Mosquitto":
        self.port = self.http_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="iotd-bench-mosquitto-")
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "set_tcp_nodelay true\nmax_connections -1\nmax_queued_messages 0\n"
                    "log_dest none\n")
        self.proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=raise_nofile)
        wait_port(self.port)
        self.pid = self.proc.pid
        return self

    def devices(self, names: list[str]) -> None:
        pass

    def template(self) -> str:
        return "bench/BENCH-%d"

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


SERVERS = {"iotd": Iotd, "websockets": WsPeer, "mosquitto": Mosquitto}


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


# -- the client program ------------------------------------------------------------------


class Clients:
    """One ``fanclient`` process: ``n`` sockets to ``server``, on ``spread`` devices."""

    def __init__(self, server: Any, n: int, spread_: int = 1, timeout: float = 120.0):
        self.proc = subprocess.Popen([client_binary(), server.proto, "127.0.0.1", str(server.port), str(n),
                                      str(spread_), server.template()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     preexec_fn=raise_nofile)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        _, opened, failed = self.wait_for("ready", timeout).split()
        self.open, self.failed = int(opened), int(failed)
        if self.open != n:
            raise RuntimeError(f"{server.name}: {self.open} of {n} sockets open ({failed} failed)")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.strip())

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for i, line in enumerate(self.lines):
                    if line.startswith(prefix):
                        del self.lines[: i + 1]
                        return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"fanclient exited {self.proc.returncode}")
            time.sleep(0.005)
        raise RuntimeError(f"fanclient: no {prefix!r} in {timeout} s")

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def count(self) -> tuple[int, int, float]:
        """(events so far, open sockets, wall time of the last event)."""
        self.send("tick")
        _, _, events, opened, last = self.wait_for("count").split()
        return int(events), int(opened), float(last)

    def report(self) -> dict:
        self.send("report")
        return json.loads(self.wait_for("report")[len("report "):])

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


# -- ingester process ------------------------------------------------------------------


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _mqtt_len(n: int) -> bytes:
    out = bytearray()
    while True:
        d, n = n % 128, n // 128
        out.append(d | (128 if n else 0))
        if not n:
            return bytes(out)


def ingest_main(spec: dict) -> None:
    """Send events: open loop at ``rate``/s (one per request) or ``total`` as fast as taken
    (HTTP batches of ``batch``, ``concurrency`` in flight; MQTT one publisher)."""
    raise_nofile()

    async def main() -> dict:
        port, key, devices, pad = spec["port"], spec.get("key", ""), spec["devices"], "x" * spec.get("pad", 64)
        mqtt = spec["proto"] == "mqtt"
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        errors, acks = [0], []

        def event(seq: int, ts: float) -> dict:
            return {"payload": {"ts": ts, "seq": seq, "pad": pad}, "payload_encoding": "json"}

        async def http_post(conn, device: str, body: Any) -> None:
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

        if mqtt:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = _mqtt_str("MQTT") + bytes([4, 2, 0, 0]) + _mqtt_str(f"ingest-{os.getpid()}")
            writer.write(b"\x10" + _mqtt_len(len(body)) + body)
            await reader.readexactly(4)  # CONNACK

            def publish(device: str, items: list[dict]) -> None:
                for it in items:  # the same ELEMENT-shaped message iotd and the peer send
                    msg = json.dumps([{"event": "packet_added", "body": {
                        "device_id": device, "packet_type": "up", "payload_encoding": "json",
                        "payload": it["payload"]}}], separators=(",", ":")).encode()
                    var = _mqtt_str(f"bench/{device}")
                    writer.write(b"\x30" + _mqtt_len(len(var) + len(msg)) + var + msg)
        conns = []
        if not mqtt:
            for _ in range(spec["concurrency"]):
                conns.append(await asyncio.open_connection("127.0.0.1", port))
        first = time.time()
        sent = 0
        if spec.get("total"):  # as fast as the server takes them
            total, batch = spec["total"], spec.get("batch", 20)
            if mqtt:
                while sent < total:
                    items = [event(sent + i, time.time()) for i in range(min(batch, total - sent))]
                    publish(devices[0], items)
                    sent += len(items)
                    await writer.drain()
            else:
                async def lane(conn) -> None:
                    nonlocal sent
                    while sent < total:
                        items = [event(sent + i, time.time()) for i in range(min(batch, total - sent))]
                        sent += len(items)
                        await http_post(conn, devices[0], items)

                await asyncio.gather(*(lane(c) for c in conns))
        else:  # open loop at `rate`
            rate, duration = spec["rate"], spec["duration"]
            count = int(rate * duration)
            free: asyncio.Queue = asyncio.Queue()
            for c in conns:
                free.put_nowait(c)
            start, wall = time.monotonic(), time.time()
            pending: set = set()

            async def one(seq: int, ts: float) -> None:
                conn = await free.get()
                try:
                    await http_post(conn, devices[seq % len(devices)], event(seq, ts))
                    acks.append((time.time() - ts) * 1000)
                finally:
                    free.put_nowait(conn)

            for seq in range(count):
                delay = start + seq / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                ts = wall + seq / rate  # the due time: waiting for a connection is charged to the server
                if mqtt:
                    publish(devices[seq % len(devices)], [event(seq, ts)])
                else:
                    task = asyncio.ensure_future(one(seq, ts))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            sent = count
            if pending:
                await asyncio.gather(*pending)
        if mqtt:
            await writer.drain()
            writer.write(b"\xe0\x00")  # DISCONNECT
            await writer.drain()
            writer.close()
        acks.sort()
        pick = (lambda q: acks[min(len(acks) - 1, int(q * (len(acks) - 1) + 0.5))] if acks else None)
        return {"sent": sent, "errors": errors[0], "first": first, "ack_p50": pick(0.5), "ack_p99": pick(0.99)}

    print(json.dumps(asyncio.run(main())), flush=True)


def run_ingest(spec: dict) -> dict:
    out = subprocess.run([PY, __file__, "--ingest", json.dumps(spec)], capture_output=True, text=True,
                         timeout=600, preexec_fn=raise_nofile)
    if out.returncode != 0:
        raise RuntimeError("ingester failed: " + out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the scenarios ------------------------------------------------------------------------


def _wait_delivered(clients: Clients, expected: int, quiet: float = 3.0, limit: float = 300.0) -> None:
    """Until the clients counted ``expected`` events, or nothing arrived for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last_n, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        n, _, _ = clients.count()
        if n >= expected:
            return
        if n != last_n:
            last_n, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return
        time.sleep(0.05)


def one_run(server: Any, clients: Clients, spec: dict, fanout: int) -> dict:
    """One measured run on ``server``: the ingest, then wait for every event at every socket."""
    clients.send("reset")
    clients.count()  # the reset is done
    c0, s0, t0 = clients.cpu(), cpu_seconds(server.pid), time.monotonic()
    ingest = run_ingest(dict(spec, port=server.http_port, key=server.key, proto=server.proto))
    expected = ingest["sent"] * fanout
    _wait_delivered(clients, expected)
    report = clients.report()
    t1 = time.monotonic()
    out = dict(report, sent=ingest["sent"], errors=ingest["errors"], expected=expected,
               missing=expected - report["events"], ack_p50=ingest["ack_p50"], ack_p99=ingest["ack_p99"],
               client_cpu=(clients.cpu() - c0) / (t1 - t0), server_cpu=(cpu_seconds(server.pid) - s0) / (t1 - t0))
    if report["events"]:
        out["rate"] = report["events"] / max(report["last"] - ingest["first"], 1e-9)
    return out


def start_servers(names: list[str], devices: list[str]) -> dict[str, Any]:
    """The servers of the fan-out rows, started once and kept (idle) for every scenario."""
    servers: dict[str, Any] = {}
    try:
        for name in names:
            servers[name] = SERVERS[name]().start()
            servers[name].devices(devices)
    except Exception:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: dict[str, Any]) -> None:
    for s in servers.values():
        s.stop()


def scenario(servers: dict[str, Any], n: int, spread_: int, spec: dict, fanout: int, reps: int,
             log: Any) -> dict[str, list[dict]]:
    """``n`` sockets to every server (on ``spread_`` devices); ``reps`` alternating runs each."""
    names = list(servers)
    clients: dict[str, Clients] = {}
    spec = dict(spec, devices=[f"BENCH-{i}" for i in range(spread_)])
    runs: dict[str, list[dict]] = {name: [] for name in names}
    try:
        for name in names:
            clients[name] = Clients(servers[name], n, spread_)
        for i in range(reps):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                r = one_run(servers[name], clients[name], spec, fanout)
                log(f"  {name}: p50 {r['p50']:.1f} p99 {r['p99']:.1f} max {r['max']:.1f} ms, "
                    f"{r['events']}/{r['expected']} events, {r.get('rate', 0):,.0f}/s, "
                    f"client {r['client_cpu']:.2f} cores, server {r['server_cpu']:.2f}, ack p99 {r['ack_p99']}")
                runs[name].append(r)
    finally:
        for c in clients.values():
            c.stop()
    return runs


def _m(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(median(vals), 3) if vals else None


def _target(row: dict, key: str, op: str, bound: float, what: str, log: Any) -> None:
    value = row.get(key)
    ok = value is not None and (value >= bound if op == ">=" else value <= bound)
    row.setdefault("targets", []).append(f"{what} {op} {bound:g}: {'pass' if ok else 'FAIL'} ({value})")
    log(f"  target {row['name']}: {what} {op} {bound:g} -> {value} {'pass' if ok else 'FAIL'}")


def latency_row(name: str, runs: dict[str, list[dict]], log: Any, **extra: Any) -> dict:
    iotd = runs["iotd"]
    peers = {p: r for p, r in runs.items() if p != "iotd"}
    p99 = _m(iotd, "p99")
    best = min(peers, key=lambda p: _m(peers[p], "p99") or float("inf")) if peers else None
    row: dict[str, Any] = {
        "name": name, "unit": "ms", "iotd": p99, "peer_name": best, "peer": _m(peers[best], "p99") if best else None,
        "ratio": round(_m(peers[best], "p99") / p99, 3) if best and p99 else None,
        "spread": spread([r["p99"] for r in iotd]), "runs": len(iotd),
        "p50": _m(iotd, "p50"), "max": _m(iotd, "max"), "ack_p50": _m(iotd, "ack_p50"), "ack_p99": _m(iotd, "ack_p99"),
        "missing": sum(r["missing"] for r in iotd), "errors": sum(r["errors"] for r in iotd),
        "client_cpu": _m(iotd, "client_cpu"), "server_cpu": _m(iotd, "server_cpu"),
    }
    for p, pr in peers.items():
        row[f"{p}_p99"], row[f"{p}_p50"], row[f"{p}_max"] = _m(pr, "p99"), _m(pr, "p50"), _m(pr, "max")
        row[f"{p}_spread"] = spread([r["p99"] for r in pr])
        row[f"{p}_missing"] = sum(r["missing"] for r in pr)
        row[f"{p}_client_cpu"] = _m(pr, "client_cpu")
        row[f"{p}_ratio"] = round(_m(pr, "p99") / p99, 3) if p99 else None
    row.update(extra)
    return row


def idle_rss(n: int) -> dict:
    server = Iotd().start()
    try:
        server.devices(["BENCH-0"])
        base = rss_mb(server.pid)
        clients = Clients(server, n, 1, timeout=300)
        try:
            time.sleep(1.0)
            return {"rss": rss_mb(server.pid), "base": base, "open": clients.open}
        finally:
            clients.stop()
    finally:
        server.stop()


def run(quick: bool = False) -> list[dict]:
    raise_nofile()
    reps = 3
    names = ["iotd", "websockets"] + (["mosquitto"] if shutil.which("mosquitto") else [])
    stamp = {"machine": machine(), "date": today()}
    rows = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    seconds = 1.0 if quick else 10.0
    servers = start_servers(names, [f"BENCH-{i}" for i in range(SOCKETS)])
    try:
        rows += latency_rows(servers, names, seconds, 100 if quick else 5000, reps, stamp, log)
    finally:
        stop_servers(servers)
    idle = idle_rss(10000)
    row = {"name": "idle_sockets_10000_rss_mb", "unit": "MB", "iotd": round(idle["rss"], 1),
           "peer_name": "target 300 MB", "peer": 300.0, "ratio": round(300 / idle["rss"], 3),
           "open": idle["open"], "base_mb": round(idle["base"], 1), **stamp}
    _target(row, "iotd", "<=", 300, "MB", log)
    rows.append(row)
    return rows


def latency_rows(servers: dict[str, Any], names: list[str], seconds: float, total: int, reps: int,
                 stamp: dict, log: Any) -> list[dict]:
    rows = []
    log(f"fanout_send_p99_100x1000: {SOCKETS} sockets on one device, 100 events/s for {seconds:g} s")
    runs = scenario(servers, SOCKETS, 1, {"rate": 100, "duration": seconds, "concurrency": 64}, SOCKETS, reps, log)
    row = latency_row("fanout_send_p99_100x1000", runs, log, events_per_run=int(100 * seconds), sockets=SOCKETS,
                      note="device send (the due time of an open-loop schedule) -> client frame", **stamp)
    _target(row, "iotd", "<=", 50, "p99 ms", log)
    for p in names[1:]:
        _target(row, f"{p}_ratio", ">=", 10, f"x better than {p}", log)
    rows.append(row)

    log(f"fanout_send_p99_1000x1: {SOCKETS} devices x 1 socket, 1,000 events/s round-robin for {seconds:g} s")
    runs = scenario(servers, SOCKETS, SOCKETS, {"rate": 1000, "duration": seconds, "concurrency": 64}, 1, reps, log)
    row = latency_row("fanout_send_p99_1000x1", runs, log, events_per_run=int(1000 * seconds), sockets=SOCKETS,
                      **stamp)
    _target(row, "iotd", "<=", 20, "p99 ms", log)
    rows.append(row)

    log(f"fanout_equal_work: {total} events to {SOCKETS} sockets on one device")
    runs = scenario(servers, SOCKETS, 1, {"total": total, "batch": 20, "concurrency": 2}, SOCKETS, reps, log)
    iotd = runs["iotd"]
    row = {"name": "fanout_equal_work", "unit": "events/s", "iotd": round(_m(iotd, "rate") or 0),
           "peer_name": "websockets", "peer": round(_m(runs["websockets"], "rate") or 0),
           "spread": spread([r.get("rate", 0) for r in iotd], 0), "runs": len(iotd), "events": total,
           "sockets": SOCKETS, "missing": sum(r["missing"] for r in iotd),
           "client_cpu": _m(iotd, "client_cpu"), "server_cpu": _m(iotd, "server_cpu")}
    row["ratio"] = round(row["iotd"] / row["peer"], 3) if row["peer"] else None
    for p in names[1:]:
        pr = runs[p]
        row[f"{p}_rate"] = round(_m(pr, "rate") or 0)
        row[f"{p}_spread"] = spread([r.get("rate", 0) for r in pr], 0)
        row[f"{p}_missing"] = sum(r["missing"] for r in pr)
        row[f"{p}_client_cpu"] = _m(pr, "client_cpu")
        row[f"{p}_ratio"] = round(row["iotd"] / row[f"{p}_rate"], 3) if row[f"{p}_rate"] else None
    row.update(stamp)
    _target(row, "websockets_ratio", ">=", 1.5, "x websockets", log)
    if "mosquitto" in runs:
        _target(row, "mosquitto_ratio", ">=", 1.0, "x mosquitto", log)
    rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="websocket fan-out bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="merge the rows into this results file")
    parser.add_argument("--peer", nargs=2, type=int, metavar=("WS_PORT", "HTTP_PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--ingest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        raise_nofile()
        peer_main(*args.peer)
        return
    if args.ingest:
        ingest_main(json.loads(args.ingest))
        return
    rows = run(args.quick)
    print_table(rows)
    if args.json:
        merge_results(args.json, rows)


if __name__ == "__main__":
    main()

"""Cluster bench: 2 real ``twistd iotd`` nodes against 1 on the same PostgreSQL + Redis.

Every node is the real daemon (``[store] url`` on a throwaway PostgreSQL database,
``[cluster] node`` and ``bus = redis://...``); the 1-node side is node ``a`` alone
with the very same config (PostgreSQL + Redis bus), node ``b`` is stopped for it.
The configurations alternate run by run (1 node, 2 nodes, 1 node, ...) and the
rows report medians of the runs with their spread (min-max).

Parties (each its own process, started from this file with ``--role``):

- ``gen``: the idle push poller (raw asyncio HTTP/1.1, keep-alive, one request
  in flight per device, like bench/push.py); ``GENS`` processes, each with
  ``devices / GENS`` devices, device ``i`` polling ``ports[i % len(ports)]``: on
  the 2-node side the devices are split evenly over the two nodes' ports.  The
  processes are primed (every device answered once) and then all told ``go`` at
  once; each reports its polls in the same window and its own CPU use.
- ``clients``: raw websocket clients (``bench/_wsclient.py``) on one
  device's packet socket, noting the instant every socket has every event.
- ``ingest``: a fixed number of events in batches, closed loop, one connection
  per node port (the same connections for both sides, all to ``a`` on 1 node).

Rows:

- ``cluster_idle_polls``: idle ``GET /push`` answered per second, all devices
  polling back to back.  Peer: 1 node.  ratio = 2 nodes / 1 node.
- ``cluster_fanout``: ``SOCKETS`` websockets on one device (half on each node on
  the 2-node side); ``EVENTS`` events ingested in batches; the figure is event
  deliveries (frames' events, all sockets) per second from the first POST until
  the last socket has the last event.  Peer: 1 node.
- ``cluster_cross_node_latency``: events POSTed to node ``a`` one by one at
  ``RATE``/s; ms from just before the POST (a timestamp in the payload) to the
  frame on a socket on node ``b`` (p99 is the figure, p50 next to it); peer = the
  same events on a socket on node ``a`` (both sockets in the same runs), so the
  ratio (b / a) is what the bus hop costs.

``python bench/cluster.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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
from _common import (HOST, machine as machine_name, today, median, merge_results, pg_database, print_table, stop_process,  # noqa: E402
                     free_port, http, parse_http, percentile, raise_nofile)

PY = sys.executable
TWISTD = os.path.join(os.path.dirname(PY), "twistd")
DEVICES = 10_000
FIRST_ID = 3_000_000
GENS = 2
SOCKETS = 1000
EVENTS = 3000
BATCH = 20
RATE = 50.0
LATENCY_EVENTS = 300
REDIS = os.environ.get("IOTD_BENCH_REDIS", "redis://127.0.0.1:6379/11")
CORES = os.cpu_count()
NOTE = (f"{CORES} cores: the load generator, PostgreSQL and Redis compete with the nodes for them "
        f"(in cores, 1.0 = one: gen_cpu = the generator processes, node_cpu = the twistd nodes together, "
        f"machine_cpu = the whole machine, PostgreSQL included, in the window; background_cpu = the machine with this bench idle just before each run: other work on the host)")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (/proc/stat): every process, PostgreSQL and Redis too."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def postgres_cpu() -> float:
    """CPU seconds of every ``postgres`` process so far (the local server's backends and workers)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
        except OSError:
            continue
        if head.endswith("(postgres"):
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def busy_cores(before: tuple[int, int]) -> float:
    after = machine()
    return (after[0] - before[0]) / max(1, after[1] - before[1]) * (CORES or 1)


def background(seconds: float = 0.5) -> float:
    """Busy cores of the machine over ``seconds`` with this bench idle (nodes up, no load): other work."""
    m0 = machine()
    time.sleep(seconds)
    return busy_cores(m0)


def redis_answers(url: str) -> bool:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# the nodes
# --------------------------------------------------------------------------------------


class Node:
    """One real ``twistd iotd`` node on the shared PostgreSQL database and Redis bus."""

    def __init__(self, workdir: str, name: str, store_url: str, bus: str):
        self.name = name
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.ini = os.path.join(self.dir, "iotd.ini")
        with open(self.ini, "w") as f:
            f.write(f"[iotd]\ndata_dir = data\nlog_level = warn\n"
                    f"[http]\nlisten = tcp:{self.port}:interface={HOST}:backlog=4096\n"
                    f"max_connections_per_address = 0\n"  # every bench client is 127.0.0.1
                    f"[push]\ncommand_timeout = 600\noffline_after = 600\n"
                    f"auto_register_per_minute = 1000000\n"  # the devices register by polling
                    f"[devicelink]\nenabled = false\n"
                    f"[store]\nurl = {store_url}\n"
                    f"[cluster]\nnode = {name}\nbus = {bus}\n")
        self.proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> "Node":
        self.log = open(os.path.join(self.dir, "twistd.log"), "ab")
        self.proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "iotd", "-c", self.ini], cwd=self.dir,
                                     env=dict(os.environ, PYTHONPATH=ROOT), stdout=self.log,
                                     stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited {self.proc.returncode}: {self.tail()}")
            try:
                status, body = http("GET", self.url("/healthz"))
                if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} not ok: {self.tail()}")
            time.sleep(0.05)

    def tail(self) -> str:
        with open(os.path.join(self.dir, "twistd.log"), errors="replace") as f:
            return f.read()[-3000:]

    def cpu(self) -> float:
        """User + system CPU seconds of the twistd process so far."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.log.close()
            self.proc = None


class Cluster:
    """Nodes ``a`` and ``b`` on one fresh PostgreSQL database and one Redis; ``a`` stays up, ``b`` comes and goes."""

    def __init__(self, workdir: str, store_url: str, bus: str):
        self.a = Node(workdir, "a", store_url, bus)
        self.b = Node(workdir, "b", store_url, bus)
        self.a.start()
        with open(os.path.join(self.a.dir, "data", "admin.key")) as f:
            self.key = f.read().strip()

    def nodes(self, n: int) -> list[Node]:
        """Exactly ``n`` nodes running (1: ``a`` alone, 2: ``a`` and ``b``)."""
        if n == 2 and not self.b.running:
            self.b.start()
        elif n == 1 and self.b.running:
            self.b.stop()
            time.sleep(0.5)
        return [self.a, self.b][:n]

    def check_alive(self) -> None:
        for node in (self.a, self.b):
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"node {node.name} died: {node.tail()}")

    def errors_logged(self) -> dict[str, int]:
        out = {}
        for node in (self.a, self.b):
            path = os.path.join(node.dir, "twistd.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text = f.read()
                out[node.name] = sum(1 for line in text.splitlines()
                                     if "Traceback" in line or "[error]" in line.lower() or "critical" in line.lower())
        return out

    def put_device(self, identifier: str) -> None:
        status, body = http("PUT", self.a.url(f"/api/v1/devices/{identifier}"), {}, self.key)
        if status not in (200, 201):
            raise RuntimeError(f"PUT device {identifier}: {status} {body!r}")

    def stop(self) -> None:
        self.b.stop()
        self.a.stop()


# --------------------------------------------------------------------------------------
# role: idle poll generator
# --------------------------------------------------------------------------------------


class _Poller(asyncio.Protocol):
    def __init__(self, gen: "Gen", device_id: int):
        self.gen = gen
        self.request = b"GET /push?deviceId=%d&uuid=bench-%d HTTP/1.1\r\nHost: iotd\r\n\r\n" % (device_id, device_id)
        self.device_id = device_id
        self.transport: Any = None
        self.buf = b""
        self.seen = False
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.connected.set_result(None)

    def connection_lost(self, exc):
        self.gen.lost += 1
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("lost"))

    def poll(self) -> None:
        self.transport.write(self.request)

    def data_received(self, data):
        self.buf += data
        while True:
            parsed = parse_http(self.buf)
            if parsed is None:
                return
            status, _, self.buf = parsed
            self.gen.answered(self, status)


class Gen:
    def __init__(self, spec: dict):
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.count = self.errors = self.lost = 0
        self.measuring = self.holding = False
        self.unseen = len(spec["ids"])
        self.primed = self.loop.create_future()

    def answered(self, conn: _Poller, status: int) -> None:
        if status != 200:
            self.errors += 1
        if not conn.seen:
            conn.seen = True
            self.unseen -= 1
            if self.unseen == 0 and not self.primed.done():
                self.primed.set_result(None)
        if self.measuring:
            self.count += 1
        if not self.holding:
            conn.poll()

    async def run(self) -> None:
        ports = self.spec["ports"]
        sem = asyncio.Semaphore(200)
        conns: list[_Poller] = []

        async def one(device_id: int) -> None:
            async with sem:
                for _ in range(40):
                    conn = _Poller(self, device_id)
                    try:
                        await self.loop.create_connection(lambda: conn, HOST, ports[device_id % len(ports)])
                        await conn.connected
                        conns.append(conn)
                        return
                    except OSError:
                        await asyncio.sleep(0.05)
                raise RuntimeError("cannot connect")

        await asyncio.gather(*(one(i) for i in self.spec["ids"]))
        for conn in conns:
            conn.poll()
        await asyncio.wait_for(self.primed, 600)
        reader = asyncio.StreamReader()
        await self.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print("primed", flush=True)
        if (await reader.readline()).strip() != b"go":
            return
        await asyncio.sleep(self.spec["warmup"])
        self.count = 0
        self.errors = 0
        c0, t0 = cpu(), time.perf_counter()
        self.measuring = True
        await asyncio.sleep(self.spec["seconds"])
        self.measuring = False
        elapsed, used = time.perf_counter() - t0, cpu() - c0
        count = self.count
        self.holding = True
        print(json.dumps({"count": count, "seconds": elapsed, "cpu": used / elapsed, "errors": self.errors,
                          "lost": self.lost, "devices": len(conns)}), flush=True)
        for conn in conns:
            conn.transport.close()


def role_gen(spec: dict) -> None:
    raise_nofile()

    async def main() -> None:
        await Gen(spec).run()

    asyncio.run(main())


class Child:
    """A role process driven over stdin/stdout lines."""

    def __init__(self, role: str, spec: dict):
        self.proc = subprocess.Popen([PY, os.path.abspath(__file__), "--role", role, "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=dict(os.environ, PYTHONPATH=ROOT), preexec_fn=raise_nofile)

    def line(self, timeout: float = 600.0) -> str:
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            self.kill()
            raise RuntimeError(f"{self.proc.args[3]}: no answer (exit {self.proc.poll()})")
        return result[0].strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def idle_run(cluster: Cluster, n: int, devices: int, seconds: float, warmup: float) -> dict:
    nodes = cluster.nodes(n)
    quiet = background()
    ports = [node.port for node in nodes]
    ids = [FIRST_ID + i for i in range(devices)]
    gens = [Child("gen", {"ports": ports, "ids": ids[g::GENS], "seconds": seconds, "warmup": warmup})
            for g in range(GENS)]
    try:
        for g in gens:
            if g.line() != "primed":
                raise RuntimeError("generator not primed")
        cpu0, m0, pg0 = [node.cpu() for node in nodes], machine(), postgres_cpu()
        for g in gens:
            g.send("go")
        outs = [json.loads(g.line()) for g in gens]
        node_cpu = [node.cpu() - c for node, c in zip(nodes, cpu0)]
        busy, pg = busy_cores(m0), postgres_cpu() - pg0
    finally:
        for g in gens:
            g.wait()
    cluster.check_alive()
    window = max(o["seconds"] for o in outs)
    rate = sum(o["count"] / o["seconds"] for o in outs)
    return {"rate": rate, "errors": sum(o["errors"] for o in outs), "lost": sum(o["lost"] for o in outs),
            "gen_cpu": sum(o["cpu"] for o in outs),
            "node_cpu": sum(node_cpu) / (window + warmup),  # nodes and machine from "go" (warm-up included)
            "machine_cpu": busy, "pg_cpu": pg / (window + warmup), "background_cpu": quiet}


# --------------------------------------------------------------------------------------
# role: websocket clients (fan-out, latency)
# --------------------------------------------------------------------------------------


def role_clients(spec: dict) -> None:
    """``spec``: port, n, path, mode ("count": note when every socket has ``target`` events; "latency")."""
    raise_nofile()
    from _wsclient import WsClient  # the raw asyncio client: handshake, count or parse frames

    target = spec.get("target", 0)

    class Counting(WsClient):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.got, self.full = 0, False

        def data_received(self, data: bytes) -> None:
            before = self.stats["frames"]
            super().data_received(data)
            if self.stats["frames"] != before:
                self.got += self.stats["frames"] - before
                if self.got >= target and not self.full:
                    self.full = True
                    self.stats["full"] += 1
                    if self.stats["full"] == spec["n"]:
                        self.stats["done_at"] = time.time()
                        self.stats["cpu_done"] = cpu()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stats: dict[str, Any] = {"open": 0, "frames": 0, "refused": 0, "lost": 0, "lat": [], "full": 0,
                                 "done_at": None}
        sem = asyncio.Semaphore(100)
        spec.setdefault("marker", "packet_added")
        spec.setdefault("mode", "count")

        async def one() -> None:
            async with sem:
                ready = loop.create_future()
                for attempt in range(10):
                    try:
                        _, proto = await loop.create_connection(
                            lambda: Counting(spec, stats, spec["path"], ready), HOST, spec["port"])
                        break
                    except OSError:
                        await asyncio.sleep(0.1 * (attempt + 1))
                else:
                    raise RuntimeError("cannot connect")
                await asyncio.wait_for(ready, 30)

        await asyncio.gather(*(one() for _ in range(spec["n"])))
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(f"ready {stats['open']}", flush=True)
        while True:
            line = (await reader.readline()).strip()
            if line == b"go":
                stats["cpu_go"] = cpu()
            elif line == b"report":
                print(json.dumps({"frames": stats["frames"], "open": stats["open"], "lost": stats["lost"],
                                  "refused": stats["refused"], "full": stats["full"], "done_at": stats["done_at"],
                                  "cpu": (stats.get("cpu_done") or cpu()) - stats.get("cpu_go", 0.0),
                                  "received": stats["lat"]}), flush=True)
            elif line in (b"quit", b""):
                return

    asyncio.run(main())


# --------------------------------------------------------------------------------------
# role: ingester (fixed count, closed loop, in batches)
# --------------------------------------------------------------------------------------


async def _post(conn: tuple, device: str, auth: bytes, body: Any) -> int:
    reader, writer = conn
    data = json.dumps(body).encode()
    writer.write(b"POST /api/v1/devices/%s/packets HTTP/1.1\r\nHost: iotd\r\n%s"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (device.encode(), auth, len(data), data))
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
    return int(status.split()[1]) if status else 0


def role_ingest(spec: dict) -> None:
    """``spec``: ports (one connection each), key, device, events, batch; or rate (open loop, one port)."""
    raise_nofile()

    async def main() -> None:
        auth = b"Authorization: Bearer %s\r\n" % spec["key"].encode()
        conns = [await asyncio.open_connection(HOST, port) for port in spec["ports"]]
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print("ready", flush=True)
        if (await reader.readline()).strip() != b"go":
            return
        errors = [0]
        pad = "x" * 64
        started = time.time()
        if spec.get("rate"):
            # open loop: event ``seq`` is due at start + seq / rate, one per request, ts taken just before it
            free: asyncio.Queue = asyncio.Queue()
            for c in conns:
                free.put_nowait(c)
            t0 = time.monotonic()

            async def one(seq: int) -> None:
                conn = await free.get()
                try:
                    body = {"payload": {"ts": time.time(), "seq": seq, "pad": pad}, "payload_encoding": "json"}
                    if await _post(conn, spec["device"], auth, body) != 201:
                        errors[0] += 1
                finally:
                    free.put_nowait(conn)

            tasks = []
            for seq in range(spec["events"]):
                delay = t0 + seq / spec["rate"] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(seq)))
            await asyncio.gather(*tasks)
        else:
            left = [spec["events"]]

            async def lane(conn: tuple) -> None:
                while left[0] > 0:
                    n = min(spec["batch"], left[0])
                    left[0] -= n
                    body = [{"payload": {"i": i, "pad": pad}, "payload_encoding": "json"} for i in range(n)]
                    if await _post(conn, spec["device"], auth, body) != 201:
                        errors[0] += n

            await asyncio.gather(*(lane(c) for c in conns))
        print(json.dumps({"started": started, "finished": time.time(), "errors": errors[0]}), flush=True)
        for _, writer in conns:
            writer.close()

    asyncio.run(main())


# --------------------------------------------------------------------------------------
# the measurements
# --------------------------------------------------------------------------------------


def socket_path(cluster: Cluster, device: str) -> str:
    return f"/api/v1/devices/{device}/packets/socket?auth={cluster.key}"


def fanout_run(cluster: Cluster, n: int, sockets: int, events: int) -> dict:
    """``sockets`` sockets on one device, in 2 client processes (one per node on 2 nodes); ``events``
    ingested in batches over 2 connections (one per node on 2 nodes); rate = deliveries / makespan."""
    nodes = cluster.nodes(n)
    quiet = background()
    device = "FANOUT-0"
    per = sockets // 2
    groups = [nodes[i % n] for i in range(2)]
    clients = [Child("clients", {"port": node.port, "n": per, "path": socket_path(cluster, device),
                                 "target": events}) for node in groups]
    ingest = Child("ingest", {"ports": [node.port for node in groups], "key": cluster.key, "device": device,
                              "events": events, "batch": BATCH})
    try:
        for c in clients:
            line = c.line(120)
            if line != f"ready {per}":
                raise RuntimeError(f"clients: {line}")
        if ingest.line(60) != "ready":
            raise RuntimeError("ingester not ready")
        cpu0, m0 = [node.cpu() for node in nodes], machine()
        for c in clients:
            c.send("go")
        ingest.send("go")
        done = json.loads(ingest.line(600))
        deadline = time.monotonic() + 120
        while True:
            reports = []
            for c in clients:
                c.send("report")
                reports.append(json.loads(c.line(60)))
            if all(r["done_at"] for r in reports) or time.monotonic() > deadline:
                busy = busy_cores(m0)
                break
            time.sleep(0.2)
        node_cpu = [node.cpu() - c for node, c in zip(nodes, cpu0)]
    finally:
        for c in clients:
            c.send("quit")
            c.wait()
        ingest.wait()
    cluster.check_alive()
    if not all(r["done_at"] for r in reports):
        missing = [(r["full"], r["frames"]) for r in reports]
        raise RuntimeError(f"fan-out stalled: (sockets full, events) per client process {missing}, "
                           f"expected {per} sockets x {events}; ingest {done}")
    finished = max(r["done_at"] for r in reports)
    makespan = finished - done["started"]
    return {"rate": sockets * events / makespan, "seconds": makespan, "ingest_s": done["finished"] - done["started"],
            "errors": done["errors"], "lost": sum(r["lost"] for r in reports),
            "frames": sum(r["frames"] for r in reports), "client_cpu": sum(r["cpu"] for r in reports) / makespan,
            "node_cpu": sum(node_cpu) / makespan, "machine_cpu": busy, "background_cpu": quiet}


def latency_run(cluster: Cluster, events: int) -> dict:
    """One socket on ``a`` and one on ``b`` (the same device); ``events`` POSTed to ``a`` at ``RATE``/s."""
    a, b = cluster.nodes(2)
    quiet = background()
    device = "LATENCY-0"
    clients = {node.name: Child("clients", {"port": node.port, "n": 1, "path": socket_path(cluster, device),
                                            "mode": "latency", "target": events}) for node in (a, b)}
    ingest = Child("ingest", {"ports": [a.port, a.port, a.port, a.port], "key": cluster.key, "device": device,
                              "events": events, "rate": RATE})
    try:
        for c in clients.values():
            if c.line(60) != "ready 1":
                raise RuntimeError("latency client not ready")
        if ingest.line(60) != "ready":
            raise RuntimeError("ingester not ready")
        ingest.send("go")
        done = json.loads(ingest.line(600))
        time.sleep(1.0)
        reports = {}
        for name, c in clients.items():
            c.send("report")
            reports[name] = json.loads(c.line(60))
    finally:
        for c in clients.values():
            c.send("quit")
            c.wait()
        ingest.wait()
    cluster.check_alive()
    out: dict[str, Any] = {"errors": done["errors"], "sent": events, "background_cpu": quiet}
    for name, report in reports.items():
        ms = [(now - sent) * 1000 for _, now, sent in report["received"]]
        seqs = [seq for seq, _, _ in report["received"]]
        out[name] = {"p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99), "max": max(ms) if ms else None,
                     "frames": len(ms), "in_order": seqs == sorted(seqs), "distinct": len(set(seqs))}
    return out


def _spread(values: list[float], digits: int = 0) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def run(quick: bool = False) -> list[dict]:
    raise_nofile()
    if not redis_answers(REDIS):
        print(f"Redis not reachable at {REDIS}: the cluster rows are left out")
        return []
    reps = 2 if quick else 3
    devices = 1_000 if quick else DEVICES
    seconds, warmup = (0.5, 0.2) if quick else (6.0, 1.0)
    events = 200 if quick else EVENTS
    lat_events = 100 if quick else LATENCY_EVENTS
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="iotd-bench-cluster-") as workdir, pg_database() as pg_url:
        if pg_url is None:
            return []
        cluster = Cluster(workdir, pg_url, REDIS)
        try:
            cluster.put_device("FANOUT-0")
            cluster.put_device("LATENCY-0")
            # 1. idle polls; an unmeasured first pass registers the devices (auto-registration by polling)
            idle_run(cluster, 1, devices, 0.5, 0.0)
            idle: dict[int, list[dict]] = {1: [], 2: []}
            for _ in range(reps):
                for n in (1, 2):
                    idle[n].append(idle_run(cluster, n, devices, seconds, warmup))
                    print(f"  idle polls, {n} node(s): {idle[n][-1]}", flush=True)
            # 2. fan-out
            fan: dict[int, list[dict]] = {1: [], 2: []}
            for _ in range(reps):
                for n in (1, 2):
                    fan[n].append(fanout_run(cluster, n, SOCKETS, events))
                    print(f"  fan-out, {n} node(s): {fan[n][-1]}", flush=True)
            # 3. cross-node latency (a socket on each node, the same events)
            lat = []
            for _ in range(reps):
                lat.append(latency_run(cluster, lat_events))
                print(f"  latency: {lat[-1]}", flush=True)
            logged = cluster.errors_logged()
        finally:
            cluster.stop()

    two, one = median(r["rate"] for r in idle[2]), median(r["rate"] for r in idle[1])
    rows.append({"name": "cluster_idle_polls", "unit": "req/s", "iotd": round(two, 1), "peer_name": "iotd 1 node",
                 "peer": round(one, 1), "ratio": round(two / one, 3) if one else None,
                 "spread": _spread([r["rate"] for r in idle[2]]),
                 "peer_spread": _spread([r["rate"] for r in idle[1]]), "runs": reps, "devices": devices,
                 "gen_procs": GENS,
                 "gen_cpu": round(median(r["gen_cpu"] for r in idle[2]), 2),
                 "peer_gen_cpu": round(median(r["gen_cpu"] for r in idle[1]), 2),
                 "node_cpu": round(median(r["node_cpu"] for r in idle[2]), 2),
                 "peer_node_cpu": round(median(r["node_cpu"] for r in idle[1]), 2),
                 "machine_cpu": round(median(r["machine_cpu"] for r in idle[2]), 2),
                 "peer_machine_cpu": round(median(r["machine_cpu"] for r in idle[1]), 2),
                 "background_cpu": round(median(r["background_cpu"] for rs in idle.values() for r in rs), 2),
                 "pg_cpu": round(median(r["pg_cpu"] for r in idle[2]), 2),
                 "peer_pg_cpu": round(median(r["pg_cpu"] for r in idle[1]), 2),
                 "errors": sum(r["errors"] for rs in idle.values() for r in rs),
                 "lost": sum(r["lost"] for rs in idle.values() for r in rs),
                 "note": NOTE + "; store PostgreSQL, bus Redis on both sides"})
    two, one = median(r["rate"] for r in fan[2]), median(r["rate"] for r in fan[1])
    rows.append({"name": "cluster_fanout", "unit": "events/s", "iotd": round(two), "peer_name": "iotd 1 node",
                 "peer": round(one), "ratio": round(two / one, 3) if one else None,
                 "spread": _spread([r["rate"] for r in fan[2]]), "peer_spread": _spread([r["rate"] for r in fan[1]]),
                 "runs": reps, "sockets": SOCKETS, "events": events, "batch": BATCH,
                 "seconds": round(median(r["seconds"] for r in fan[2]), 2),
                 "peer_seconds": round(median(r["seconds"] for r in fan[1]), 2),
                 "client_cpu": round(median(r["client_cpu"] for r in fan[2]), 2),
                 "peer_client_cpu": round(median(r["client_cpu"] for r in fan[1]), 2),
                 "node_cpu": round(median(r["node_cpu"] for r in fan[2]), 2),
                 "peer_node_cpu": round(median(r["node_cpu"] for r in fan[1]), 2),
                 "machine_cpu": round(median(r["machine_cpu"] for r in fan[2]), 2),
                 "peer_machine_cpu": round(median(r["machine_cpu"] for r in fan[1]), 2),
                 "background_cpu": round(median(r["background_cpu"] for rs in fan.values() for r in rs), 2),
                 "errors": sum(r["errors"] for rs in fan.values() for r in rs),
                 "note": f"{CORES} cores shared by the nodes, the 2 client processes, the ingester, PostgreSQL "
                         f"and Redis; ingest split over the nodes like the sockets (2 connections, batches of "
                         f"{BATCH}); time from the first POST to the last socket's last event"})
    b99, a99 = median(r["b"]["p99"] for r in lat), median(r["a"]["p99"] for r in lat)
    rows.append({"name": "cluster_cross_node_latency", "unit": "ms", "iotd": round(b99, 2),
                 "peer_name": "socket on the ingesting node", "peer": round(a99, 2),
                 "ratio": round(b99 / a99, 3) if a99 else None,
                 "spread": _spread([r["b"]["p99"] for r in lat], 2),
                 "peer_spread": _spread([r["a"]["p99"] for r in lat], 2),
                 "p50": round(median(r["b"]["p50"] for r in lat), 2),
                 "peer_p50": round(median(r["a"]["p50"] for r in lat), 2),
                 "p50_spread": _spread([r["b"]["p50"] for r in lat], 2),
                 "max": round(max(r["b"]["max"] for r in lat), 2),
                 "peer_max": round(max(r["a"]["max"] for r in lat), 2),
                 "runs": reps, "events": lat_events, "rate": RATE,
                 "frames": sum(r["b"]["frames"] for r in lat), "peer_frames": sum(r["a"]["frames"] for r in lat),
                 "in_order": all(r[x]["in_order"] for r in lat for x in "ab"),
                 "errors": sum(r["errors"] for r in lat),
                 "background_cpu": round(median(r["background_cpu"] for r in lat), 2),
                 "note": "iotd = p99 ingest on a (POST) -> frame on a socket on b; peer = the same events on a "
                         "socket on a, in the same runs; from just before the POST"})
    rows[-1]["node_errors_logged"] = logged
    for row in rows:
        row.update(machine=machine_name(), date=today())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="cluster bench (2 nodes vs 1 on PostgreSQL + Redis)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="merge the rows into this results file")
    parser.add_argument("--role", choices=["gen", "clients", "ingest"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        spec = json.loads(args.spec)
        {"gen": role_gen, "clients": role_clients, "ingest": role_ingest}[args.role](spec)
        return
    rows = run(args.quick)
    print_table(rows)
    if args.json:
        merge_results(args.json, rows)


if __name__ == "__main__":
    main()

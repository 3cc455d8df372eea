"""Push benchmark: 10,000 simulated devices polling iotd over keep-alive connections.

Every party is its own process, started from this file with ``--role``:

- iotd: the real ``twistd iotd`` (temp data_dir, one loopback listener).
- ``bare``: the peer, a bare ``twisted.web`` resource on the same (epoll)
  reactor, answering ``GET /push`` empty (idle) or with a fixed command
  (round trips) and ``POST /result`` empty, without an access log: the
  framework's own ceiling.
- ``gen``: the load generator, raw asyncio protocols with hand-written
  HTTP/1.1 (keep-alive, one request in flight per device, like firmware).

Measurements (each run >= 3 times, alternating iotd and peer, medians reported):

- ``push_idle_polls``: idle ``GET /push`` answered per second, every device
  polling back to back (nothing queued), after one unmeasured round per
  server (iotd registers the devices then).
- ``push_roundtrips``: command round trips per second: commands are queued
  over the REST API first (``POST /api/v1/devices/{id}/commands``, that rate
  is reported as ``queue_per_s``), then every device polls, gets its command,
  posts the result (a JSON-encoded string, as firmware does) and polls
  again; a device with nothing left waits 1 s before its next poll.

``run(quick)`` returns the rows; ``python bench/push.py [--quick] [--json PATH]``
prints the table and merges the rows into PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (HOST, machine, today, median, merge_results, pg_database, print_table, stop_process,  # noqa: E402
                     free_port, parse_http, raise_nofile)

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
TWISTD = str(Path(sys.executable).parent / "twistd")
DEVICES = 10_000
# What a Control iD user runs instead; not a peer column here (see the README's benchmark section).
CONTROLID_NOTE = ("ControlIDRemoteHost (Node) not run: its server.js calls app.listen only after the "
                  "Shielder cloud authorizes the box (push_Shielder.autorizaBox), which cannot answer offline")
FIRST_ID = 1_000_000
COMMAND = {"verb": "POST", "endpoint": "load_objects", "body": {"object": "users"}}
RESULT = json.dumps({"response": json.dumps({"users": [{"id": 1, "name": "Walter White"}]})}).encode()


# --------------------------------------------------------------------------------------
# role: bare twisted.web peer
# --------------------------------------------------------------------------------------


def role_bare(args: argparse.Namespace) -> None:
    raise_nofile()
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.web import resource as wresource
    from twisted.web import server

    command = json.dumps(COMMAND, separators=(",", ":")).encode()
    mode = args.mode

    class Bare(wresource.Resource):
        isLeaf = True

        def render_GET(self, request):
            if mode == "idle":
                return b""
            request.setHeader(b"content-type", b"application/json")
            return command

        def render_POST(self, request):
            request.content.read()
            return b""

    class QuietSite(server.Site):
        def log(self, request):
            pass

    reactor.listenTCP(args.port, QuietSite(Bare()), backlog=4096, interface=HOST)
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


# --------------------------------------------------------------------------------------
# role: load generator (raw asyncio HTTP/1.1)
# --------------------------------------------------------------------------------------


class _Http(asyncio.Protocol):
    """One keep-alive connection; one request in flight; minimal response parsing."""

    def __init__(self, gen: "Gen", device_id: int):
        self.gen = gen
        self.device_id = device_id
        self.transport: Any = None
        self.buf = b""
        self.connected = asyncio.get_running_loop().create_future()
        self.state = "idle"
        self.rounds = 0

    def connection_made(self, transport):
        self.transport = transport
        self.connected.set_result(None)

    def connection_lost(self, exc):
        self.gen.lost += 1
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("lost"))

    def data_received(self, data):
        self.buf += data
        while True:
            parsed = parse_http(self.buf)
            if parsed is None:
                return
            status, body, rest = parsed
            self.buf = rest
            self.gen.on_response(self, status, body)


class Gen:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.port = args.port
        self.count = 0
        self.queued = 0
        self.errors = 0
        self.lost = 0
        self.measuring = False
        self.loop = asyncio.get_running_loop()
        self.first_round: set[int] = set()
        self.first_done = self.loop.create_future()
        self.holding = False
        self.empty = 0
        self.remaining = 0
        self.all_done = self.loop.create_future()

    def poll_request(self, device_id: int) -> bytes:
        return (b"GET /push?deviceId=%d&uuid=bench-%d HTTP/1.1\r\nHost: iotd\r\n\r\n"
                % (device_id, device_id))

    def result_request(self, device_id: int) -> bytes:
        return (b"POST /result?deviceId=%d&uuid=bench-%d&endpoint=load_objects HTTP/1.1\r\nHost: iotd\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (device_id, device_id, len(RESULT), RESULT))

    def poll(self, conn: _Http) -> None:
        conn.state = "poll"
        conn.transport.write(self.poll_request(conn.device_id))

    def on_response(self, conn: _Http, status: int, body: bytes) -> None:
        if status != 200:
            self.errors += 1
        if conn.device_id not in self.first_round:
            self.first_round.add(conn.device_id)
            if len(self.first_round) == self.args.devices and not self.first_done.done():
                self.first_done.set_result(None)
        if self.args.mode == "idle":
            if self.measuring:
                self.count += 1
            if not self.holding:
                self.poll(conn)
            return
        # round trips: poll -> command -> result -> poll, ``rounds`` times per device
        if conn.state == "poll":
            if body:
                conn.state = "result"
                conn.transport.write(self.result_request(conn.device_id))
            elif self.holding:
                conn.state = "held"
            else:  # nothing for this device (yet): poll again a little later
                self.empty += 1
                self.loop.call_later(0.05, self.poll, conn)
        elif conn.state == "result":
            self.count += 1
            conn.rounds += 1
            if conn.rounds < self.args.rounds:
                self.poll(conn)
            else:
                conn.state = "done"
                self.remaining -= 1
                if self.remaining == 0 and not self.all_done.done():
                    self.all_done.set_result(time.perf_counter())

    async def connect_all(self) -> list[_Http]:
        conns: list[_Http] = []
        sem = asyncio.Semaphore(200)

        async def one(device_id: int) -> None:
            async with sem:
                for _ in range(20):
                    conn = _Http(self, device_id)
                    try:
                        await self.loop.create_connection(lambda: conn, HOST, self.port)
                        await conn.connected
                        conns.append(conn)
                        return
                    except OSError:
                        await asyncio.sleep(0.05)
                raise RuntimeError("cannot connect")

        first = self.args.first_id
        await asyncio.gather(*(one(first + i) for i in range(self.args.devices)))
        return conns

    async def queue_commands(self, per_device: int) -> float:
        """Queue ``per_device`` commands for every device over the REST API; returns commands/s."""
        body = json.dumps(COMMAND).encode()
        auth = b"Authorization: Bearer " + self.args.key.encode()
        ids = [self.args.first_id + i for _ in range(per_device) for i in range(self.args.devices)]
        lanes = 64
        started = time.perf_counter()

        async def lane(chunk: list[int]) -> None:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            for device_id in chunk:
                writer.write(b"POST /api/v1/devices/%d/commands HTTP/1.1\r\nHost: iotd\r\n%s\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (device_id, auth, len(body), body))
                buf = b""
                while True:
                    buf += await reader.read(65536)
                    parsed = parse_http(buf)
                    if parsed is not None:
                        break
                if parsed[0] != 201:
                    raise RuntimeError(f"queueing answered {parsed[0]}: {parsed[1][:200]!r}")
                self.queued += 1
            writer.close()

        await asyncio.gather(*(lane(ids[n::lanes]) for n in range(lanes)))
        return len(ids) / (time.perf_counter() - started)

    async def run(self) -> dict[str, Any]:
        args = self.args
        conns = await self.connect_all()
        result: dict[str, Any] = {}
        if args.mode == "idle":
            for conn in conns:
                self.poll(conn)
            await asyncio.wait_for(self.first_done, 300)
            await asyncio.sleep(args.warmup)
            self.count = 0
            self.measuring = True
            started = time.perf_counter()
            await asyncio.sleep(args.seconds)
            elapsed = time.perf_counter() - started
            self.measuring = False
            self.holding = True
        else:
            # One poll each (registers the devices), hold; the operator queues; then all go at once
            # and each device runs ``rounds`` commands back to back: rate = commands / makespan.
            if args.per_device:  # iotd: register the devices, queue their commands
                self.holding = True
                for conn in conns:
                    self.poll(conn)
                await asyncio.wait_for(self.first_done, 300)
                await asyncio.sleep(0.2)
                result["queue_per_s"] = await self.queue_commands(args.per_device)
                await asyncio.sleep(0.5)
            self.holding = False
            self.count = 0
            self.remaining = len(conns)
            started = time.perf_counter()
            for conn in conns:
                self.poll(conn)
            finished = await asyncio.wait_for(self.all_done, 3600)  # PostgreSQL at 10,000 devices is slow
            elapsed = finished - started
        result.update(rate=self.count / elapsed, count=self.count, seconds=round(elapsed, 3),
                      errors=self.errors, lost=self.lost, empty=self.empty)
        for conn in conns:
            conn.transport.close()
        return result


def role_gen(args: argparse.Namespace) -> None:
    raise_nofile()

    async def main() -> dict[str, Any]:
        return await Gen(args).run()

    print(json.dumps(asyncio.run(main())), flush=True)


# --------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as resp:
                if resp.status in (200, 404):
                    return
        except urllib.error.HTTPError as e:
            if e.code in (200, 404):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not come up")


class Iotd:
    def __init__(self, workdir: str, store_url: str = ""):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        ini = os.path.join(workdir, "iotd.ini")
        with open(ini, "w") as f:
            f.write(f"[iotd]\ndata_dir = data\nlog_level = warn\n"
                    f"[http]\nlisten = tcp:{self.port}:interface={HOST}:backlog=4096\n"
                    f"max_connections_per_address = 0\n"  # 10,000 keep-alive devices from one address
                    f"[push]\ncommand_timeout = 600\noffline_after = 600\n"
                    f"auto_register_per_minute = 1000000\n"  # the bench registers 10,000 devices by polling
                    f"[devicelink]\nenabled = false\n"
                    + (f"[store]\nurl = {store_url}\n" if store_url else ""))
        self.log = open(os.path.join(workdir, "twistd.log"), "wb")
        self.proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "iotd", "-c", ini], cwd=workdir,
                                     env=_env(), stdout=self.log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc)
        with open(os.path.join(workdir, "data", "admin.key")) as f:
            self.key = f.read().strip()

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


class Bare:
    def __init__(self, mode: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--role", "bare", "--mode", mode,
                                      "--port", str(self.port)], env=_env(), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError("bare peer did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def generate(port: int, mode: str, devices: int, first_id: int, seconds: float = 0.0, warmup: float = 0.0,
             key: str = "", per_device: int = 0, rounds: int = 1) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(HERE), "--role", "gen", "--mode", mode, "--port", str(port),
                          "--devices", str(devices), "--first-id", str(first_id), "--seconds", str(seconds),
                          "--warmup", str(warmup), "--key", key, "--per-device", str(per_device),
                          "--rounds", str(rounds)],
                         env=_env(), stdout=subprocess.PIPE, text=True, timeout=5400)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(name: str, iotd_runs: list[dict], peer_runs: list[dict], peer_name: str = "twisted.web bare",
         **extra: Any) -> dict[str, Any]:
    iotd = median(r["rate"] for r in iotd_runs)
    peer = median(r["rate"] for r in peer_runs)
    row = {"name": name, "unit": "req/s", "iotd": round(iotd, 1), "peer_name": peer_name,
           "peer": round(peer, 1), "ratio": round(iotd / peer, 3) if peer else None,
           "spread": f"{min(r['rate'] for r in iotd_runs):.0f}-{max(r['rate'] for r in iotd_runs):.0f}"}
    row.update(extra)
    return row


def run(quick: bool) -> list[dict[str, Any]]:
    """Each measurement alternates iotd on SQLite, iotd on PostgreSQL (when reachable) and the bare
    peer, ``reps`` times, with the same devices and commands for each."""
    reps = 3
    seconds, warmup = (0.5, 0.2) if quick else (6.0, 1.0)
    devices = 1_000 if quick else DEVICES  # quick is a smoke check; the contract figure is the full run
    rows = []
    with tempfile.TemporaryDirectory(prefix="iotd-bench-push-") as workdir, pg_database() as pg_url:
        daemons = {"sqlite": Iotd(os.path.join(workdir, "sqlite"))}
        try:
            if pg_url:
                daemons["postgresql"] = Iotd(os.path.join(workdir, "postgresql"), pg_url)
            # idle polls
            bare = Bare("idle")
            runs: dict[str, list[dict]] = {name: [] for name in daemons}
            peer_runs: list[dict] = []
            try:
                # One unmeasured round each first: iotd registers the devices on their first polls
                # (a one-time cost a running fleet does not pay), and every server starts warm.
                for port in [d.port for d in daemons.values()] + [bare.port]:
                    generate(port, "idle", devices, FIRST_ID, seconds, warmup)
                for _ in range(reps):
                    for name, iotd in daemons.items():
                        runs[name].append(generate(iotd.port, "idle", devices, FIRST_ID, seconds, warmup))
                    peer_runs.append(generate(bare.port, "idle", devices, FIRST_ID, seconds, warmup))
            finally:
                bare.stop()
            errors = sum(r["errors"] for rs in list(runs.values()) + [peer_runs] for r in rs)
            rows.append(_row("push_idle_polls", runs["sqlite"], peer_runs, devices=devices, errors=errors))
            if "postgresql" in runs:
                rows.append(_row("push_idle_polls_postgresql", runs["postgresql"], runs["sqlite"],
                                 peer_name="iotd on SQLite", devices=devices, errors=errors))
            # command round trips: K commands per device, all devices at once; rate = commands / makespan
            bare = Bare("roundtrip")
            per_device = 1 if quick else 3
            runs = {name: [] for name in daemons}
            peer_runs = []
            try:
                for _ in range(reps):
                    for name, iotd in daemons.items():
                        runs[name].append(generate(iotd.port, "roundtrip", devices, FIRST_ID, key=iotd.key,
                                                   per_device=per_device, rounds=per_device))
                    peer_runs.append(generate(bare.port, "roundtrip", devices, FIRST_ID, rounds=per_device))
            finally:
                bare.stop()
            errors = sum(r["errors"] for rs in list(runs.values()) + [peer_runs] for r in rs)
            for name, peer, peer_name in (("push_roundtrips", peer_runs, "twisted.web bare"),
                                          ("push_roundtrips_postgresql", runs["sqlite"], "iotd on SQLite")):
                backend = "postgresql" if name.endswith("_postgresql") else "sqlite"
                if backend in runs:
                    rows.append(_row(name, runs[backend], peer, peer_name=peer_name, devices=devices,
                                     commands_per_device=per_device,
                                     queue_per_s=round(median(r["queue_per_s"] for r in runs[backend]), 1),
                                     errors=errors))
        finally:
            for iotd in daemons.values():
                iotd.stop()
    stamp = {"machine": machine(), "date": today(), "other_peer": CONTROLID_NOTE}
    for row in rows:
        row.update(stamp)
        if row["name"] == "push_idle_polls":
            ok = row["ratio"] is not None and row["ratio"] >= 0.9
            row["targets"] = [f"x bare twisted.web >= 0.9: {'pass' if ok else 'FAIL'} ({row['ratio']})"]
            print(f"  target push_idle_polls: x bare twisted.web >= 0.9 -> {row['ratio']} {'pass' if ok else 'FAIL'}",
                  file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per measurement")
    parser.add_argument("--json", help="merge the result rows into this JSON file")
    parser.add_argument("--role", choices=["bare", "gen"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="idle", choices=["idle", "roundtrip"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=DEVICES, help=argparse.SUPPRESS)
    parser.add_argument("--first-id", type=int, default=FIRST_ID, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--period", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--key", default="", help=argparse.SUPPRESS)
    parser.add_argument("--per-device", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "bare":
        return role_bare(args)
    if args.role == "gen":
        return role_gen(args)
    rows = run(args.quick)
    print_table(rows)
    if args.json:
        merge_results(args.json, rows)


if __name__ == "__main__":
    main()

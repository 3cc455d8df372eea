"""DeviceLink relay benchmark: the real ``twistd iotd`` next to haproxy, socat and direct loopback.

Every party is its own process:

- ``device`` (this file, ``--role device``): the devices -- a TCP sink
  (answers a FIN with the byte count it got), a TCP counter (a length, then
  that many bytes), a TCP echo and a UDP sink; blocking sockets, a thread per
  connection.
- the relays under test: ``twistd iotd`` from this checkout (links created
  over REST, ``POST /api/v1/devicelink/BENCH``), once with splice (the
  default) and once with ``IOTD_RELAY_SPLICE=off`` (the userspace path), both
  started once and kept for the whole bench; the peers, with the same buffer
  size as iotd's 128 KiB: haproxy (``mode tcp``, ``tune.bufsize 131072``,
  ``nbthread 1``) and socat (``-b 131072``, a process per connection); and
  the client dialling the device directly (the loopback limit).
- ``gen-tcp`` / ``gen-udp`` / ``gen-bulk`` / ``ping``: load generators with
  blocking sockets (one thread per TCP connection).

Measurements (each party >= 3 times, the parties alternating and rotating
who goes first; medians, with min-max as ``spread``):

- ``relay_tcp_1``, ``relay_tcp_8``: client -> device bulk Gbit/s (10^9 bit/s
  counted by the sink) over 1 and 8 concurrent links; ``iotd`` is the
  spliced daemon, the peer haproxy; ``socat``, ``direct`` and
  ``limit_ratio`` (iotd / direct) in the same row.  ``relay_tcp_1_nosplice``
  and ``relay_tcp_8_nosplice``: the daemon with splice off, same peers.
- ``relay_tcp_aes_1``: an encrypted link (AES-256-CTR, decrypted on the way
  to the device) against a plain link on the same userspace path.
- ``relay_ws_tcp_1``: one link used over its websocket on the HTTP port next
  to its own port (splice off for both: the websocket side never splices).
- ``relay_udp_64``, ``relay_udp_1200``: datagrams/s delivered to the sink,
  at saturation (the generator sends as fast as it can) with the loss, and at
  a fixed offered rate below loss (``fixed_rate``; delivered and loss there).
- ``relay_latency_p99``: 64-byte TCP ping-pong through the relay minus the
  same ping direct to the echo device, p99 (and p50), in us; ratio =
  peer/iotd (lower is better).

``run(quick)`` returns the rows; ``python bench/relay.py [--quick] [--json PATH]``
prints the table and merges the rows into PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Daemon, daemon_env, http, machine, median, merge_results, print_table, spread, today  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
LOOPBACK = "127.0.0.1"
AES_KEY = bytes(range(32))
AES_IV = bytes(range(16))
BUFFER = 131072  # every relay's buffer: iotd reads and queues 128 KiB


# --------------------------------------------------------------------------------------
# roles (child processes)
# --------------------------------------------------------------------------------------


def _serve(listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def _tcp_listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((LOOPBACK, 0))
    s.listen(64)
    return s


def _sink(conn: socket.socket) -> None:
    buf = bytearray(1 << 20)
    total = 0
    with conn:
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
        conn.sendall(struct.pack("!Q", total))


def _counter(conn: socket.socket) -> None:
    """Read an 8-byte length N, then N bytes; answer with the count (no FIN needed: a websocket has none)."""
    buf = bytearray(1 << 20)
    with conn:
        head = b""
        while len(head) < 8:
            chunk = conn.recv(8 - len(head))
            if not chunk:
                return
            head += chunk
        want, total = struct.unpack("!Q", head)[0], 0
        while total < want:
            n = conn.recv_into(buf, min(len(buf), want - total))
            if not n:
                break
            total += n
        conn.sendall(struct.pack("!Q", total))
        try:
            conn.recv(1)  # until the client goes
        except OSError:
            pass


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)


class _UDPSink:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:  # root may go past rmem_max: the sink must not be where datagrams are lost
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind((LOOPBACK, 0))
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> dict[str, Any]:
        with self.lock:
            old = dict(getattr(self, "stats", {}))
            self.stats = {"count": 0, "bytes": 0, "first": None, "last": None}
        return old

    def run(self) -> None:
        buf = bytearray(65536)
        clock = time.perf_counter
        while True:
            n = self.sock.recv_into(buf)
            now = clock()
            with self.lock:
                st = self.stats
                if st["first"] is None:
                    st["first"] = now
                st["last"] = now
                st["count"] += 1
                st["bytes"] += n


def role_device(_: argparse.Namespace) -> None:
    sink, echo, counter = _tcp_listener(), _tcp_listener(), _tcp_listener()
    udp = _UDPSink()
    threading.Thread(target=_serve, args=(sink, _sink), daemon=True).start()
    threading.Thread(target=_serve, args=(counter, _counter), daemon=True).start()
    threading.Thread(target=_serve, args=(echo, _echo), daemon=True).start()
    threading.Thread(target=udp.run, daemon=True).start()
    ports = {
        "tcp_sink": sink.getsockname()[1],
        "tcp_echo": echo.getsockname()[1],
        "tcp_counter": counter.getsockname()[1],
        "udp_sink": udp.sock.getsockname()[1],
    }
    print(json.dumps(ports), flush=True)
    for line in sys.stdin:
        if line.strip() == "udp":
            print(json.dumps(udp.reset()), flush=True)


def role_gen_tcp(args: argparse.Namespace) -> None:
    from iotd.relay.ctr import stream_transform

    ports = [int(p) for p in args.ports.split(",")]
    block = os.urandom(256 * 1024)
    results: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(ports)
    start = threading.Barrier(len(ports))

    def one(i: int, port: int) -> None:
        s = socket.create_connection((LOOPBACK, port))
        start.wait()
        t0 = time.perf_counter()
        deadline = t0 + args.seconds
        send = s.sendall
        while time.perf_counter() < deadline:
            for _ in range(8):
                send(block)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8:
            chunk = s.recv(8 - len(reply))
            if not chunk:
                break
            reply += chunk
        t1 = time.perf_counter()
        s.close()
        if args.key:  # the count came back through the relay's device->client encryption
            reply = stream_transform(bytes.fromhex(args.key), bytes.fromhex(args.iv))(reply)
        results[i] = (t0, t1, struct.unpack("!Q", reply)[0] if len(reply) == 8 else 0)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(ports)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0 = min(r[0] for r in results)
    t1 = max(r[1] for r in results)
    print(json.dumps({"bytes": sum(r[2] for r in results), "seconds": t1 - t0}), flush=True)


def _ws_frame(payload: bytes, mask: bytes = b"\x5a\xa5\x3c\xc3") -> bytes:
    """One masked binary frame (the client side of RFC 6455)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x82, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x82, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
    keystream = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")
    return head + mask + masked


def _ws_open(port: int, path: str) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port))
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("websocket handshake refused")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
    return s


def _ws_read(s: socket.socket, want: int) -> bytes:
    """``want`` bytes of the binary messages the server sends (unmasked frames)."""
    got = b""
    buf = b""
    while len(got) < want:
        while len(buf) < 2 or len(buf) < _ws_need(buf):
            chunk = s.recv(65536)
            if not chunk:
                return got
            buf += chunk
        need = _ws_need(buf)
        start = {126: 4, 127: 10}.get(buf[1] & 0x7F, 2)  # the header's length
        got += buf[start:need]
        buf = buf[need:]
    return got


def _ws_need(buf: bytes) -> int:
    """Bytes of the whole first frame in ``buf`` (header included), as far as it is known."""
    n = buf[1] & 0x7F
    if n < 126:
        return 2 + n
    if n == 126:
        return 4 + (struct.unpack("!H", buf[2:4])[0] if len(buf) >= 4 else 1 << 30)
    return 10 + (struct.unpack("!Q", buf[2:10])[0] if len(buf) >= 10 else 1 << 30)


def role_gen_bulk(args: argparse.Namespace) -> None:
    """Send an 8-byte length and that many bytes through the link's port or websocket;
    the device answers with its count."""
    total = args.count
    block = os.urandom(64 * 1024)
    header = struct.pack("!Q", total)
    if args.transport == "ws":
        s = _ws_open(args.port, args.path)
        frame = _ws_frame(block)  # masked once: the content is random anyway
        first, send_block, last = _ws_frame(header), frame, lambda rest: _ws_frame(block[:rest])
    else:
        s = socket.create_connection((LOOPBACK, args.port))
        first, send_block, last = header, block, lambda rest: block[:rest]
    t0 = time.perf_counter()
    s.sendall(first)
    left = total
    while left >= len(block):
        s.sendall(send_block)
        left -= len(block)
    if left:
        s.sendall(last(left))
    reply = _ws_read(s, 8) if args.transport == "ws" else s.recv(8)
    t1 = time.perf_counter()
    s.close()
    print(json.dumps({"bytes": struct.unpack("!Q", reply)[0] if len(reply) == 8 else 0,
                      "seconds": t1 - t0}), flush=True)


def role_gen_udp(args: argparse.Namespace) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((LOOPBACK, args.port))
    payload = os.urandom(args.size)
    send = s.send
    sent = 0
    clock = time.perf_counter
    t0 = clock()
    deadline = t0 + args.seconds
    burst = 256 if args.rate <= 0 else max(1, int(args.rate / 2000))  # paced: bursts every 0.5 ms
    while True:
        now = clock()
        if now >= deadline:
            break
        if args.rate > 0 and sent >= (now - t0) * args.rate:
            time.sleep(0.0002)
            continue
        for _ in range(burst):
            try:
                send(payload)
                sent += 1
            except OSError:  # ECONNREFUSED from an ICMP error, ENOBUFS: not sent
                pass
    print(json.dumps({"sent": sent, "seconds": clock() - t0}), flush=True)


def role_ping(args: argparse.Namespace) -> None:
    """Ping-pong over several connections in turn (direct and relayed see the same
    moments of machine load); prints one list of round-trip times (us) per port."""
    socks = []
    for port in (int(p) for p in args.ports.split(",")):
        s = socket.create_connection((LOOPBACK, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    msg = os.urandom(args.size)
    clock = time.perf_counter_ns
    rtts: list[list[float]] = [[] for _ in socks]
    for i in range(args.count + 200):
        for s, out in zip(socks, rtts):
            t0 = clock()
            s.sendall(msg)
            got = 0
            while got < len(msg):
                chunk = s.recv(65536)
                if not chunk:
                    raise SystemExit("echo closed")
                got += len(chunk)
            if i >= 200:  # warm-up
                out.append((clock() - t0) / 1000.0)
    for s in socks:
        s.close()
    print(json.dumps(rtts), flush=True)


# --------------------------------------------------------------------------------------
# controller
# --------------------------------------------------------------------------------------


def _child(role: str, *argv: str, stdin: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE), "--role", role, *argv], stdin=stdin,
                            stdout=subprocess.PIPE, text=True, env=daemon_env())


def _json_line(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args!r} exited without output (code {proc.wait()})")
    return json.loads(line)


def _run_child(role: str, *argv: str) -> Any:
    proc = _child(role, *argv, stdin=subprocess.DEVNULL)
    out = _json_line(proc)
    proc.wait()
    return out


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            proc.kill()
            proc.wait()


class Device:
    def __init__(self) -> None:
        self.proc = _child("device")
        self.ports = _json_line(self.proc)

    def udp_stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("udp\n")
        self.proc.stdin.flush()
        return dict(_json_line(self.proc))

    def close(self) -> None:
        _stop(self.proc)


def _listening(port: int, protocol: str) -> bool:
    table = "/proc/net/tcp" if protocol == "tcp" else "/proc/net/udp"
    want = f":{port:04X}"
    with open(table) as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(want) and (protocol == "udp" or fields[3] == "0A"):
                return True
    return False


def _free_port(protocol: str) -> int:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class IotdRelay:
    """One ``twistd iotd`` for the whole bench; ``links(...)`` opens links over REST."""

    def __init__(self, splice: bool) -> None:
        self.splice = splice
        self.name = "iotd" if splice else "iotd (no splice)"
        base = 41000 if splice else 41200
        ini = ("[push]\nenabled = false\n"
               "[devicelink]\ninterface = 127.0.0.1\nallowed_device_networks = 127.0.0.0/8\n"
               f"port_range = {base}-{base + 150}\nmax_links = 100\nunused_ttl = 600\n")
        self.daemon = Daemon(ini, env={"IOTD_RELAY_SPLICE": "auto" if splice else "off"},
                             name="relay").start()
        self.daemon.call("PUT", "/api/v1/devices/BENCH", {"host": LOOPBACK})

    @contextmanager
    def links(self, protocol: str, device_port: int, n: int, aes: bool = False) -> Iterator[Any]:
        body: dict[str, Any] = {"protocol": protocol, "devicePort": device_port, "timeout": 0}
        if aes:
            body["encrypt"] = {"key": AES_KEY.hex(), "initializationVector": AES_IV.hex()}
        made = [self.daemon.call("POST", "/api/v1/devicelink/BENCH", body) for _ in range(n)]
        try:
            yield made
        finally:
            for link in made:  # a link whose both ends closed is gone already (404)
                http("DELETE", self.daemon.url(f"/api/v1/devicelink/{link['token']}"), key=self.daemon.key)

    @contextmanager
    def __call__(self, protocol: str, device_port: int, n: int, aes: bool = False) -> Iterator[list[int]]:
        with self.links(protocol, device_port, n, aes) as made:
            yield [link["port"] for link in made]

    def stop(self) -> None:
        self.daemon.stop()


def _wait_listening(proc: subprocess.Popen[Any], port: int, protocol: str, what: str) -> None:
    deadline = time.monotonic() + 5
    while not _listening(port, protocol):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start listening")
        time.sleep(0.01)


def _end(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def socat_relay(protocol: str, device_port: int, links: int, aes: bool = False) -> Iterator[list[int]]:
    """socat relaying one port to ``device_port`` with 128 KiB buffers; yields that port ``links`` times."""
    port = _free_port(protocol)
    if protocol == "tcp":
        spec = [f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork", f"TCP:{LOOPBACK}:{device_port}"]
    else:
        spec = [f"UDP-LISTEN:{port},bind={LOOPBACK},reuseaddr", f"UDP:{LOOPBACK}:{device_port}"]
    proc = subprocess.Popen(["socat", "-b", str(BUFFER), *spec], stdin=subprocess.DEVNULL)
    try:
        _wait_listening(proc, port, protocol, "socat")
        yield [port] * links
    finally:
        _end(proc)


@contextmanager
def haproxy_relay(protocol: str, device_port: int, links: int, aes: bool = False) -> Iterator[list[int]]:
    """haproxy ``mode tcp`` (one thread, 128 KiB buffers) relaying one port to ``device_port``."""
    assert protocol == "tcp"
    port = _free_port("tcp")
    conf = (f"global\n  nbthread 1\n  tune.bufsize {BUFFER}\n  maxconn 1000\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
            f"frontend f\n  bind {LOOPBACK}:{port}\n  default_backend b\n"
            f"backend b\n  server device {LOOPBACK}:{device_port}\n")
    fd, path = tempfile.mkstemp(prefix="iotd-bench-haproxy-", suffix=".cfg")
    with os.fdopen(fd, "w") as f:
        f.write(conf)
    proc = subprocess.Popen(["haproxy", "-db", "-f", path], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(proc, port, "tcp", "haproxy")
        yield [port] * links
    finally:
        _end(proc)
        os.unlink(path)


@contextmanager
def direct(protocol: str, device_port: int, links: int, aes: bool = False) -> Iterator[list[int]]:
    """No relay: the client dials the device itself (the loopback limit)."""
    yield [device_port] * links


Relay = Callable[..., Any]


def tcp_throughput(relay: Relay, device: Device, links: int, seconds: float, aes: bool = False) -> float:
    """Client -> device bulk Gbit/s over ``links`` links.  With ``aes`` the client sends random
    bytes (what it would send encrypted); the relay decrypts them."""
    argv = ["--ports", "", "--seconds", str(seconds)]
    if aes:
        argv += ["--key", AES_KEY.hex(), "--iv", AES_IV.hex()]
    with relay("tcp", device.ports["tcp_sink"], links, aes=aes) as ports:
        argv[1] = ",".join(map(str, ports))
        out = _run_child("gen-tcp", *argv)
    return float(out["bytes"]) * 8 / out["seconds"] / 1e9


def link_bulk(iotd: IotdRelay, device: Device, transport: str, total: int) -> float:
    """Gbit/s of ``total`` bytes client -> device through one link's port or its websocket."""
    with iotd.links("tcp", device.ports["tcp_counter"], 1) as (link,):
        if transport == "ws":
            argv = ["--transport", "ws", "--port", str(iotd.daemon.port),
                    "--path", f"/api/v1/devicelink/{link['token']}/socket"]
        else:
            argv = ["--transport", "port", "--port", str(link["port"])]
        out = _run_child("gen-bulk", *argv, "--count", str(total))
    if out["bytes"] != total:
        raise RuntimeError(f"{transport}: the device counted {out['bytes']} of {total} bytes")
    return float(out["bytes"]) * 8 / out["seconds"] / 1e9


def udp_rate(relay: Relay, device: Device, size: int, seconds: float, rate: float = 0.0) -> tuple[float, float]:
    """(delivered datagrams/s, loss) of ``size``-byte datagrams sent as fast as possible, or at ``rate``/s."""
    with relay("udp", device.ports["udp_sink"], 1) as ports:
        device.udp_stats()  # reset
        out = _run_child("gen-udp", "--port", str(ports[0]), "--size", str(size), "--seconds", str(seconds),
                         "--rate", str(rate))
        time.sleep(0.3)  # let the relay drain its socket buffer into the sink
        st = device.udp_stats()
    if rate > 0:  # the offered window, not the delivery span (a paced sender's span is the window)
        delivered = st["count"] / max(out["seconds"], 1e-9)
    else:
        span = (st["last"] - st["first"]) if st["count"] > 1 else seconds
        delivered = st["count"] / max(span, 1e-9)
    loss = 1.0 - st["count"] / max(out["sent"], 1)
    return delivered, loss


def _percentile(values: list[float], q: float) -> float:
    vals = sorted(values)
    return vals[min(len(vals) - 1, int(round(q * (len(vals) - 1))))]


def added_latency(relay: Relay, device: Device, count: int) -> tuple[float, float, float, float]:
    """(added p50, added p99, direct p50, direct p99) in us: 64-byte ping-pong through
    the relay to the echo device, alternating with the same ping direct to it."""
    echo = device.ports["tcp_echo"]
    with relay("tcp", echo, 1) as ports:
        argv = ["--ports", f"{echo},{ports[0]}", "--count", str(count), "--size", "64"]
        direct_, relayed = _run_child("ping", *argv)
    d50, d99 = _percentile(direct_, 0.50), _percentile(direct_, 0.99)
    return _percentile(relayed, 0.50) - d50, _percentile(relayed, 0.99) - d99, d50, d99


def _have(tool: str) -> bool:
    if shutil.which(tool):
        return True
    print(f"{tool} is not installed: its peer column is left out", file=sys.stderr)
    return False


def _alternate(reps: int, parties: dict[str, Callable[[], Any] | None]) -> dict[str, list[Any]]:
    """Run every party ``reps`` times, one after the other, rotating who goes first each round."""
    names = [n for n, f in parties.items() if f is not None]
    out: dict[str, list[Any]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(parties[name]())  # type: ignore[misc]
    return out


def _r(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def _row(name: str, unit: str, runs: dict[str, list[float]], me: str, peer: str | None,
         lower_is_better: bool = False, **extra: Any) -> dict[str, Any]:
    iotd = median(runs[me])
    p = median(runs[peer]) if peer in runs else None
    if p is None:
        ratio = None
    elif lower_is_better:
        ratio = p / iotd if iotd > 0 else None
    else:
        ratio = iotd / p if p > 0 else None
    row: dict[str, Any] = {"name": name, "unit": unit, "iotd": _r(iotd), "peer_name": peer if p is not None else "none",
                           "peer": _r(p), "ratio": _r(ratio), "spread": spread(runs[me]),
                           "peer_spread": spread(runs[peer]) if p is not None else None, "runs": len(runs[me])}
    row.update(extra)
    return row


def _target(row: dict[str, Any], key: str, op: str, bound: float, what: str) -> None:
    value = row.get(key)
    ok = value is not None and (value >= bound if op == ">=" else value <= bound)
    row.setdefault("targets", []).append(f"{what} {op} {bound:g}: {'pass' if ok else 'FAIL'} ({value})")
    print(f"  target {row['name']}: {what} {op} {bound:g} -> {value} {'pass' if ok else 'FAIL'}",
          file=sys.stderr, flush=True)


def run(quick: bool) -> list[dict[str, Any]]:
    """Run every measurement; returns the result rows (and prints progress and the targets)."""
    seconds = 0.4 if quick else 4.0
    udp_seconds = 0.2 if quick else 3.0
    reps = 3 if quick else 5
    pings = 1000 if quick else 20000
    socat = socat_relay if _have("socat") else None
    haproxy = haproxy_relay if _have("haproxy") else None
    device = Device()
    on, off = IotdRelay(True), IotdRelay(False)
    rows: list[dict[str, Any]] = []
    stamp = {"machine": machine(), "date": today()}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        for links in (1, 8):
            parties: dict[str, Callable[[], Any] | None] = {
                "iotd": lambda: tcp_throughput(on, device, links, seconds),
                "iotd (no splice)": lambda: tcp_throughput(off, device, links, seconds),
                "haproxy": (lambda: tcp_throughput(haproxy, device, links, seconds)) if haproxy else None,
                "socat": (lambda: tcp_throughput(socat, device, links, seconds)) if socat else None,
                "direct": lambda: tcp_throughput(direct, device, links, seconds),
            }
            if links == 1:
                parties["iotd aes"] = lambda: tcp_throughput(off, device, links, seconds, aes=True)
            runs = _alternate(reps, parties)
            log(f"tcp {links} link(s), Gbit/s: " + ", ".join(f"{k} {[round(v, 2) for v in vs]}" for k, vs in runs.items()))
            extra = {k: _r(median(v)) for k, v in runs.items() if k in ("socat", "direct")}
            lim = median(runs["direct"])
            for me, name in (("iotd", f"relay_tcp_{links}"), ("iotd (no splice)", f"relay_tcp_{links}_nosplice")):
                row = _row(name, "Gbit/s", runs, me, "haproxy" if haproxy else ("socat" if socat else None),
                           socat_ratio=_r(median(runs[me]) / median(runs["socat"])) if socat else None,
                           limit_ratio=_r(median(runs[me]) / lim), links=links,
                           splice=me == "iotd", **extra, **stamp)
                if haproxy:
                    _target(row, "ratio", ">=", 1.0, "x haproxy")
                if me == "iotd" and links == 1:
                    _target(row, "limit_ratio", ">=", 0.8, "x direct loopback (splice)")
                rows.append(row)
            if links == 1:
                row = _row("relay_tcp_aes_1", "Gbit/s", runs, "iotd aes", "iotd (no splice)",
                           peer_note="the same daemon's plain link, userspace path", **stamp)
                _target(row, "ratio", ">=", 0.7, "x plain (userspace path)")
                rows.append(row)
        total = (64 if quick else 1024) * 1024 * 1024
        runs = _alternate(reps, {"ws": lambda: link_bulk(off, device, "ws", total),
                                 "iotd port": lambda: link_bulk(off, device, "port", total)})
        log(f"tcp link over a websocket, Gbit/s: {runs}")
        rows.append(_row("relay_ws_tcp_1", "Gbit/s", runs, "ws", "iotd port", bytes=total,
                         note="splice off for both (the websocket side never splices)", **stamp))
        for size, fixed in ((64, 20000.0), (1200, 20000.0)):
            sat = _alternate(reps, {"iotd": lambda: udp_rate(on, device, size, udp_seconds),
                                    "socat": (lambda: udp_rate(socat, device, size, udp_seconds)) if socat else None})
            paced = _alternate(reps, {"iotd": lambda: udp_rate(on, device, size, udp_seconds, fixed),
                                      "socat": (lambda: udp_rate(socat, device, size, udp_seconds, fixed)) if socat else None})
            log(f"udp {size} B (delivered/s, loss): saturation {sat}; at {fixed:g}/s {paced}")
            rates = {k: [r for r, _ in v] for k, v in sat.items()}
            rows.append(_row(
                f"relay_udp_{size}", "datagrams/s", rates, "iotd", "socat" if socat else None,
                loss=round(median(x for _, x in sat["iotd"]), 4),
                peer_loss=round(median(x for _, x in sat["socat"]), 4) if socat else None,
                fixed_rate=fixed,
                fixed_delivered=round(median(r for r, _ in paced["iotd"])),
                fixed_loss=round(median(x for _, x in paced["iotd"]), 4),
                peer_fixed_delivered=round(median(r for r, _ in paced["socat"])) if socat else None,
                peer_fixed_loss=round(median(x for _, x in paced["socat"]), 4) if socat else None,
                **stamp))
        lat = _alternate(reps, {"iotd": lambda: added_latency(on, device, pings),
                                "haproxy": (lambda: added_latency(haproxy, device, pings)) if haproxy else None,
                                "socat": (lambda: added_latency(socat, device, pings)) if socat else None})
        log(f"latency (added p50, added p99, direct p50, direct p99): {lat}")
        p99 = {k: [r[1] for r in v] for k, v in lat.items()}
        peer = "haproxy" if haproxy else ("socat" if socat else None)
        rows.append(_row(
            "relay_latency_p99", "us", p99, "iotd", peer, lower_is_better=True,
            p50=round(median(r[0] for r in lat["iotd"]), 2),
            peer_p50=round(median(r[0] for r in lat[peer]), 2) if peer else None,
            socat_p99=round(median(r[1] for r in lat["socat"]), 2) if socat else None,
            direct_p50=round(median(r[2] for v in lat.values() for r in v), 2),
            direct_p99=round(median(r[3] for v in lat.values() for r in v), 2), **stamp))
    finally:
        on.stop()
        off.stop()
        device.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a couple of seconds per measurement")
    parser.add_argument("--json", metavar="PATH", help="merge the rows into this JSON file")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--protocol", default="tcp", help=argparse.SUPPRESS)
    parser.add_argument("--device-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--links", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--base-port", type=int, default=21000, help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--iv", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--ws", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="port", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    roles = {
        "device": role_device,
        "gen-tcp": role_gen_tcp,
        "gen-udp": role_gen_udp,
        "gen-bulk": role_gen_bulk,
        "ping": role_ping,
    }
    if args.role:
        roles[args.role](args)
        return
    rows = run(args.quick)
    print_table(rows)
    print(json.dumps(rows))
    if args.json:
        merge_results(args.json, rows)


if __name__ == "__main__":
    main()

"""DeviceLink relay benchmark: iotd side by side with socat, on loopback, in one run.

Every party is its own process, started from this file with ``--role``:

- ``device``: the devices -- a TCP sink (answers a FIN with the byte count
  it got), a TCP echo and a UDP sink; plain blocking sockets, a thread per
  connection.  Control over its stdin/stdout.
- ``relay``: the relay under test -- a ``LinkManager`` on the epoll reactor
  with N links to one device port; prints the link ports, runs until its
  stdin closes.  The peer is ``socat`` (``TCP-LISTEN:p,reuseaddr,fork
  TCP:127.0.0.1:dev`` and ``UDP-LISTEN:p,reuseaddr UDP:127.0.0.1:dev``: one
  UDP session, no fork per datagram).
- ``gen-tcp`` / ``gen-udp`` / ``ping``: load generators with blocking sockets.

Measurements (each run >= 3 times, alternating iotd and peer, medians reported):

- TCP bulk throughput client -> device, 1 and 8 concurrent links, MB/s
  (10^6 bytes/s) counted by the sink.  AES rows decrypt client -> device and
  are compared with iotd plain.
- UDP datagrams/s delivered to the sink at saturation (the generator sends
  as fast as it can), with the loss.
- A TCP link over a websocket on the HTTP port, next to the same link's port:
  1 link, the same bytes (a length header, then that many bytes, answered by
  the device's count) through the link's websocket and through its port, MB/s
  (row ``relay_ws_tcp_1``, peer ``iotd port``).
- Added latency: TCP ping-pong of 64 bytes through the relay minus direct to
  the echo device, p50 and p99; the ratio is peer/iotd (lower is better).

``run(quick)`` returns the rows; ``python bench/relay.py [--quick] [--json PATH]``
prints the table and merges the rows into PATH.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    from bench._common import median, merge_results, print_table
except ImportError:  # run as a script: bench/ is on sys.path
    from _common import median, merge_results, print_table  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
LOOPBACK = "127.0.0.1"
AES_KEY = bytes(range(32))
AES_IV = bytes(range(16))


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


def role_relay(args: argparse.Namespace) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol

    sys.path.insert(0, str(ROOT))
    from iotd.relay.links import LinkManager

    base = args.base_port
    # The bench's devices are on loopback, which links refuse unless allowed explicitly.
    manager = LinkManager(reactor, LOOPBACK, (base, base + 199), max_links=200, unused_ttl=600,
                          device_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    key = bytes.fromhex(args.key) if args.key else None
    iv = bytes.fromhex(args.iv) if args.iv else None
    ports = []
    for _ in range(args.links):
        link = manager.open(
            tenant="bench",
            device="BENCH",
            protocol=args.protocol,
            device_host=LOOPBACK,
            device_port=args.device_port,
            timeout_ms=0,
            source=None,
            key=key,
            iv=iv,
        )
        ports.append(link.port)

    class Control(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            manager.close_all().addBoth(lambda _: reactor.stop())

    out: dict[str, Any] = {"ports": ports}
    if args.ws:  # an HTTP site whose /link/<i> is link i's websocket (what iotd's route does)
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from iotd.relay.ws_side import WebSocketSide, socket_factory, upgrade

        links = manager.all_links()
        factory = socket_factory(reactor)

        class LinkSocket(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> Any:
                link = links[int(request.postpath[-1])]
                side = link.relay.accept_websocket(request.getClientAddress(), WebSocketSide)
                return upgrade(factory, side).render(request)

        out["http"] = reactor.listenTCP(0, Site(LinkSocket()), interface=LOOPBACK).getHost().port
    stdio.StandardIO(Control())
    print(json.dumps(out), flush=True)
    reactor.run()


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
    deadline = clock() + args.seconds
    while clock() < deadline:
        for _ in range(256):
            try:
                send(payload)
                sent += 1
            except OSError:  # ECONNREFUSED from an ICMP error, ENOBUFS: not sent
                pass
    print(json.dumps({"sent": sent}), flush=True)


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


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _child(role: str, *argv: str, stdin: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE), "--role", role, *argv],
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )


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


_base_port = [21000]


@contextmanager
def iotd_relay(protocol: str, device_port: int, links: int, aes: bool = False,
               ws: bool = False) -> Iterator[Any]:
    """A relay process with ``links`` links to ``device_port``; yields their ports
    (with ``ws``: ``(ports, http_port)``, link i's websocket is ``/link/i`` there)."""
    _base_port[0] = 21000 + (_base_port[0] - 21000 + 200) % 8000  # fresh ports every run
    argv = ["--protocol", protocol, "--device-port", str(device_port), "--links", str(links)]
    argv += ["--base-port", str(_base_port[0])]
    if aes:
        argv += ["--key", AES_KEY.hex(), "--iv", AES_IV.hex()]
    if ws:
        argv += ["--ws"]
    proc = _child("relay", *argv)
    try:
        out = _json_line(proc)
        yield (list(out["ports"]), out["http"]) if ws else list(out["ports"])
    finally:
        _stop(proc)


@contextmanager
def socat_relay(protocol: str, device_port: int, links: int) -> Iterator[list[int]]:
    """socat relaying one port to ``device_port``; yields that port ``links`` times."""
    port = _free_port(protocol)
    if protocol == "tcp":
        spec = [f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork", f"TCP:{LOOPBACK}:{device_port}"]
    else:
        spec = [f"UDP-LISTEN:{port},bind={LOOPBACK},reuseaddr", f"UDP:{LOOPBACK}:{device_port}"]
    proc = subprocess.Popen(["socat", *spec], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not _listening(port, protocol):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("socat did not start listening")
            time.sleep(0.01)
        yield [port] * links
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


Relay = Callable[..., Any]


def tcp_throughput(relay: Relay, device: Device, links: int, seconds: float, aes: bool = False) -> float:
    """Client -> device bulk MB/s over ``links`` links.  With ``aes`` the client
    sends random bytes (what it would send encrypted); the relay decrypts them."""
    kw: dict[str, Any] = {"aes": True} if aes else {}
    argv = ["--ports", "", "--seconds", str(seconds)]
    if aes:
        argv += ["--key", AES_KEY.hex(), "--iv", AES_IV.hex()]
    with relay("tcp", device.ports["tcp_sink"], links, **kw) as ports:
        argv[1] = ",".join(map(str, ports))
        out = _run_child("gen-tcp", *argv)
    return float(out["bytes"]) / out["seconds"] / 1e6


def link_bulk(device: Device, transport: str, total: int) -> float:
    """MB/s of ``total`` bytes client -> device through one iotd link's port or websocket."""
    with iotd_relay("tcp", device.ports["tcp_counter"], 1, ws=True) as (ports, http):
        if transport == "ws":
            argv = ["--transport", "ws", "--port", str(http), "--path", "/link/0"]
        else:
            argv = ["--transport", "port", "--port", str(ports[0])]
        out = _run_child("gen-bulk", *argv, "--count", str(total))
    if out["bytes"] != total:
        raise RuntimeError(f"{transport}: the device counted {out['bytes']} of {total} bytes")
    return float(out["bytes"]) / out["seconds"] / 1e6


def udp_rate(relay: Relay, device: Device, size: int, seconds: float) -> tuple[float, float]:
    with relay("udp", device.ports["udp_sink"], 1) as ports:
        device.udp_stats()  # reset
        out = _run_child("gen-udp", "--port", str(ports[0]), "--size", str(size), "--seconds", str(seconds))
        time.sleep(0.3)  # let the relay drain its socket buffer into the sink
        st = device.udp_stats()
    span = (st["last"] - st["first"]) if st["count"] > 1 else seconds
    rate = st["count"] / max(span, 1e-9)
    loss = 1.0 - st["count"] / max(out["sent"], 1)
    return rate, loss


def _percentile(values: list[float], q: float) -> float:
    vals = sorted(values)
    return vals[min(len(vals) - 1, int(round(q * (len(vals) - 1))))]


def added_latency(relay: Relay, device: Device, count: int) -> tuple[float, float, float, float]:
    """(added p50, added p99, direct p50, direct p99) in us: 64-byte ping-pong through
    the relay to the echo device, alternating with the same ping direct to it."""
    echo = device.ports["tcp_echo"]
    with relay("tcp", echo, 1) as ports:
        argv = ["--ports", f"{echo},{ports[0]}", "--count", str(count), "--size", "64"]
        direct, relayed = _run_child("ping", *argv)
    d50, d99 = _percentile(direct, 0.50), _percentile(direct, 0.99)
    return _percentile(relayed, 0.50) - d50, _percentile(relayed, 0.99) - d99, d50, d99


def _socat_available() -> bool:
    if shutil.which("socat"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("socat missing: trying apt-get install -y socat", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "socat"], capture_output=True)
        if not shutil.which("socat"):
            subprocess.run(["apt-get", "update"], capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "socat"], capture_output=True)
    if shutil.which("socat"):
        return True
    print("socat is not installed and could not be installed: peer columns skipped", file=sys.stderr)
    return False


def _row(name: str, unit: str, iotd: float, peer_name: str, peer: float | None, lower_is_better: bool = False, **extra: Any) -> dict[str, Any]:
    if peer is None:
        ratio = None
    elif lower_is_better:
        ratio = peer / iotd if iotd > 0 else None
    else:
        ratio = iotd / peer if peer > 0 else None
    row: dict[str, Any] = {
        "name": name,
        "unit": unit,
        "iotd": round(iotd, 3),
        "peer_name": peer_name,
        "peer": None if peer is None else round(peer, 3),
        "ratio": None if ratio is None else round(ratio, 3),
    }
    row.update(extra)
    return row


def _alternate(reps: int, a: Callable[[], Any], b: Callable[[], Any] | None) -> tuple[list[Any], list[Any]]:
    """Run ``a`` and ``b`` ``reps`` times each, alternating (and swapping who goes first)."""
    ra: list[Any] = []
    rb: list[Any] = []
    for i in range(reps):
        order = [(a, ra), (b, rb)] if i % 2 == 0 else [(b, rb), (a, ra)]
        for f, out in order:
            if f is not None:
                out.append(f())
    return ra, rb


def run(quick: bool) -> list[dict[str, Any]]:
    """Run every measurement; returns the result rows (and prints progress)."""
    seconds = 1.0 if quick else 5.0
    reps = 3 if quick else 5
    pings = 3000 if quick else 20000
    have_socat = _socat_available()
    socat = socat_relay if have_socat else None
    device = Device()
    rows: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        for links in (1, 8):
            a, b = _alternate(
                reps,
                lambda: tcp_throughput(iotd_relay, device, links, seconds),
                (lambda: tcp_throughput(socat, device, links, seconds)) if socat else None,
            )
            log(f"tcp {links} link(s): iotd {a} socat {b}")
            rows.append(
                _row(f"relay_tcp_{links}", "MB/s", median(a), "socat", median(b) if b else None)
            )
        for links in (1, 8):
            a, b = _alternate(
                reps,
                lambda: tcp_throughput(iotd_relay, device, links, seconds, aes=True),
                lambda: tcp_throughput(iotd_relay, device, links, seconds),
            )
            log(f"tcp aes {links} link(s): aes {a} plain {b}")
            rows.append(_row(f"relay_tcp_aes_{links}", "MB/s", median(a), "iotd plain", median(b)))
        total = (256 if quick else 1024) * 1024 * 1024
        a, b = _alternate(reps, lambda: link_bulk(device, "ws", total), lambda: link_bulk(device, "port", total))
        log(f"tcp link over a websocket: ws {a} port {b}")
        rows.append(_row("relay_ws_tcp_1", "MB/s", median(a), "iotd port", median(b), bytes=total))
        for size in (64, 1200):
            a, b = _alternate(
                reps,
                lambda: udp_rate(iotd_relay, device, size, seconds),
                (lambda: udp_rate(socat, device, size, seconds)) if socat else None,
            )
            log(f"udp {size} B: iotd {a} socat {b}")
            rows.append(
                _row(
                    f"relay_udp_{size}",
                    "datagrams/s",
                    median(r for r, _ in a),
                    "socat",
                    median(r for r, _ in b) if b else None,
                    loss=round(median(loss for _, loss in a), 4),
                    peer_loss=round(median(loss for _, loss in b), 4) if b else None,
                )
            )
        lat_iotd, lat_peer = _alternate(
            reps,
            lambda: added_latency(iotd_relay, device, pings),
            (lambda: added_latency(socat, device, pings)) if socat else None,
        )
        log(f"latency (added p50, added p99, direct p50, direct p99): iotd {lat_iotd} socat {lat_peer}")
        rows.append(
            _row(
                "relay_latency_p99",
                "us",
                median(r[1] for r in lat_iotd),
                "socat",
                median(r[1] for r in lat_peer) if lat_peer else None,
                lower_is_better=True,
                p50=round(median(r[0] for r in lat_iotd), 2),
                peer_p50=round(median(r[0] for r in lat_peer), 2) if lat_peer else None,
                direct_p50=round(median(r[2] for r in lat_iotd + lat_peer), 2),
                direct_p99=round(median(r[3] for r in lat_iotd + lat_peer), 2),
            )
        )
    finally:
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
    args = parser.parse_args(argv)
    roles = {
        "device": role_device,
        "relay": role_relay,
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

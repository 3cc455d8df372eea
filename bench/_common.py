"""Helpers shared by the benchmarks: medians, a results table, a JSON results file, and the
small client-side pieces every bench needs (free ports, the open-files limit, a JSON HTTP call,
percentiles, an HTTP/1.1 response parser for the asyncio load generators).

A result row is a dict ``{"name", "unit", "iotd", "peer_name", "peer", "ratio", ...}``;
extra keys (``loss``, ``p50``...) are kept as they are.  The results file is a
JSON list of rows; merging replaces rows with the same ``name``.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Sequence

BASE_KEYS = ("name", "unit", "iotd", "peer_name", "peer", "ratio")
HOST = "127.0.0.1"


def raise_nofile() -> None:
    """Raise the soft open-files limit to the hard one (thousands of client sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def http(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    """``(status, parsed JSON body, or the raw body when it is not JSON)``."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


def parse_http(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """One HTTP/1.1 response from the front of ``buf``: ``(status, body, rest)``, or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end]
    status = int(head[9:12])
    lower = head.lower()
    start = end + 4
    pos = lower.find(b"content-length:")
    if pos >= 0:
        stop = lower.find(b"\r\n", pos)
        length = int(lower[pos + 15:stop if stop >= 0 else None])
        if len(buf) < start + length:
            return None
        return status, buf[start:start + length], buf[start + length:]
    if b"transfer-encoding: chunked" in lower:
        body = b""
        at = start
        while True:
            line_end = buf.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(buf[at:line_end].split(b";")[0], 16)
            if len(buf) < line_end + 2 + size + 2:
                return None
            body += buf[line_end + 2:line_end + 2 + size]
            at = line_end + 2 + size + 2
            if size == 0:
                return status, body, buf[at:]
    return status, b"", buf[start:]


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (the mean of the middle two for an even count)."""
    vals = list(values)
    if not vals:
        raise ValueError("median of nothing")
    return float(statistics.median(vals))


def merge_results(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge ``rows`` into the JSON list at ``path`` (created if missing); returns the new list.

    Rows whose ``name`` matches a new row are replaced in place; new names are
    appended.  The file is replaced atomically.
    """
    p = Path(path)
    existing: list[dict[str, Any]] = []
    if p.exists() and p.stat().st_size:
        loaded = json.loads(p.read_text())
        if not isinstance(loaded, list):
            raise ValueError(f"{p}: expected a JSON list of result rows")
        existing = loaded
    new = {r["name"]: r for r in rows}
    merged = [new.pop(r.get("name"), r) for r in existing]
    merged.extend(new.values())
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(merged, f, indent=2)
        f.write("\n")
    os.replace(tmp, p)
    return merged


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """Print ``rows`` as an aligned text table; extra keys go in a last column."""
    header = ["name", "unit", "iotd", "peer", "peer_name", "ratio", "extra"]
    lines = [header]
    for r in rows:
        extra = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in BASE_KEYS)
        lines.append(
            [
                str(r.get("name")),
                str(r.get("unit")),
                _fmt(r.get("iotd")),
                _fmt(r.get("peer")),
                str(r.get("peer_name")),
                _fmt(r.get("ratio")),
                extra,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def stop_process(proc: Any, timeout: float = 30.0) -> None:
    """SIGTERM a server process and wait; kill it if it does not stop in ``timeout``."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class pg_database:
    """``with pg_database() as url:`` a fresh PostgreSQL database for one benchmark run (dropped after).

    ``url`` is None when no PostgreSQL answers at ``IOTD_BENCH_PG`` (default
    ``postgresql://postgres@127.0.0.1:5432/postgres``): the PostgreSQL rows are
    then left out, with one line saying so.
    """

    def __init__(self, admin_url: str | None = None):
        self.admin_url = admin_url or os.environ.get("IOTD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
        self.name = f"iotd_bench_{os.getpid()}_{os.urandom(3).hex()}"
        self.url: str | None = None

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)

    def __enter__(self) -> str | None:
        try:
            self._admin(f'CREATE DATABASE "{self.name}"')
        except Exception as e:  # no server, no rights: the SQLite rows still run
            print(f"PostgreSQL not reachable ({type(e).__name__}): the *_postgresql rows are left out")
            return None
        self.url = self.admin_url.rsplit("/", 1)[0] + "/" + self.name
        return self.url

    def __exit__(self, *exc: Any) -> None:
        if self.url is not None:
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# -- the real daemon -------------------------------------------------------------------

ROOT = str(Path(__file__).resolve().parent.parent)
TWISTD = str(Path(sys.executable).parent / "twistd")


def daemon_env(**extra: str) -> dict[str, str]:
    """The environment of every child: this checkout's ``iotd`` first on the path."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return env


class Daemon:
    """``twistd --nodaemon iotd -c <tmp>/iotd.ini`` from this checkout, on loopback.

    ``ini`` is added to the generated file (sections of its own); ``env`` to the
    environment.  ``start()`` waits for ``/healthz`` and reads the first admin key;
    it also checks that the daemon imported this checkout's ``iotd`` (the log line
    the plugin prints is not enough: a venv may hold another checkout).
    """

    def __init__(self, ini: str = "", env: dict[str, str] | None = None, name: str = "iotd") -> None:
        self.dir = tempfile.mkdtemp(prefix=f"iotd-bench-{name}-")
        self.port = free_port()
        self.env = env or {}
        with open(os.path.join(self.dir, "iotd.ini"), "w") as f:
            f.write(f"[iotd]\ndata_dir = data\nlog_level = warn\n"
                    f"[http]\nlisten = tcp:{self.port}:interface={HOST}:backlog=4096\n"
                    f"max_connections_per_address = 0\n" + ini)
        self.proc: Any = None
        self.key = ""

    def start(self) -> "Daemon":
        import subprocess

        self.log = open(os.path.join(self.dir, "twistd.log"), "wb")
        self.proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "--logfile=twistd.log", "iotd",
                                      "-c", "iotd.ini"], cwd=self.dir, env=daemon_env(**self.env),
                                     stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("twistd did not start: " + self.tail())
            try:
                if http("GET", self.url("/healthz"))[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        with open(os.path.join(self.dir, "data", "admin.key")) as f:
            self.key = f.read().strip()
        self.check_checkout()
        return self

    def check_checkout(self) -> None:
        """The daemon's environment resolves ``iotd`` to this checkout (PYTHONPATH first, before
        a venv that may hold another checkout installed in development mode)."""
        import subprocess

        found = subprocess.run([sys.executable, "-c", "import iotd, iotd.tap as p; "
                                "print(iotd.__file__); print(p.__file__)"], cwd=self.dir,
                               env=daemon_env(**self.env), capture_output=True, text=True).stdout.split()
        if len(found) != 2 or not all(f.startswith(ROOT + os.sep) for f in found):
            raise RuntimeError(f"twistd would import {found}, not this checkout {ROOT}")

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, out = http(method, self.url(path), body, self.key)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {out!r}")
        return out

    def tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "twistd.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        import shutil

        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def spread(values: Sequence[float], digits: int = 2) -> str:
    """``"min-max"`` of a run's values."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}"


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())

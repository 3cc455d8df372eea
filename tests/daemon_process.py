"""Start the real ``twistd iotd`` as a subprocess (for end-to-end tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import dbutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base: str, method: str, path: str, body=None, key: str | None = None,
            headers: dict | None = None, raw: bytes | None = None):
    """``(status, parsed JSON or None)`` of one HTTP request to ``base + path`` (an error body that
    is not JSON -- a proxy's own page -- comes back as bytes)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            got = resp.read()
            return resp.status, (json.loads(got) if got else None)
    except urllib.error.HTTPError as e:
        got = e.read()
        try:
            return e.code, (json.loads(got) if got else None)
        except ValueError:
            return e.code, got


class DaemonProcess:
    """``with DaemonProcess(tmp_path, extra_ini) as d: d.get("/healthz")``."""

    def __init__(self, workdir, extra: str = "", port: int | None = None):
        self.workdir = str(workdir)
        self.port = port or free_port()
        self.ini = os.path.join(self.workdir, "iotd.ini")
        with open(self.ini, "w") as f:
            f.write(f"[iotd]\ndata_dir = data\n[http]\nlisten = tcp:{self.port}:interface=127.0.0.1\n{extra}")
            if "[store]" not in extra:  # the test's database on PostgreSQL (nothing on SQLite)
                f.write(dbutil.store_ini(os.path.join(self.workdir, "data")))
        self.log_path = os.path.join(self.workdir, "twistd.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_key(self) -> str:
        with open(os.path.join(self.workdir, "data", "admin.key")) as f:
            return f.read().strip()

    def start(self, timeout: float = 20.0, preexec_fn=None) -> "DaemonProcess":
        """Run twistd (``preexec_fn`` runs in the child before it, e.g. to lower a limit)."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "iotd", "-c", self.ini],
                                     cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec_fn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited {self.proc.returncode}: {self.log()}")
            try:
                status, _ = self.request("GET", "/healthz")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("twistd did not answer /healthz: " + self.log())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def request(self, method: str, path: str, body=None, key: str | None = None,
                headers: dict | None = None, raw: bytes | None = None):
        """``(status, parsed JSON or None)``; ``raw`` is sent as the body instead of ``body`` as JSON."""
        return request(self.url, method, path, body, key, headers, raw)

    def request_text(self, method: str, path: str):
        """``(status, body as text)`` (for ``/metrics``)."""
        req = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.stop()

"""Several real ``twistd iotd`` nodes on one PostgreSQL database and one Redis (cluster tests).

``with Nodes(tmp_path, ("a", "b")) as nodes: nodes["a"].request(...)``.  The
database is the test's own (tests/dbutil.py, dropped at the end); the Redis
database number is the test's own too, and the channels are named after the
database's cluster id, so runs never hear each other.  ``redis_url`` points
the nodes at another Redis (a private one a test may restart).

:class:`Socket` is a real websocket client (the ``websockets`` library) that
collects frames in a thread, for assertions from the test thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Callable
from urllib.parse import quote

import dbutil
from daemon_process import DaemonProcess, free_port

_DB = [0]


def redis_db() -> int:
    """A Redis database number for this test (1..15, cycling): pub/sub is named by cluster id anyway."""
    _DB[0] = _DB[0] % 15 + 1
    return _DB[0]


class Nodes:
    def __init__(self, tmp_path: Any, names: tuple[str, ...] = ("a", "b"), extra: str = "",
                 redis_url: str | None = None, store_url: str | None = None):
        self.tmp_path = tmp_path
        self.store_url = store_url or dbutil.target(os.path.join(str(tmp_path), "cluster.sqlite3"))
        self.redis_url = redis_url or f"redis://127.0.0.1:6379/{redis_db()}"
        self.nodes: dict[str, DaemonProcess] = {}
        for name in names:
            workdir = os.path.join(str(tmp_path), name)
            os.makedirs(workdir, exist_ok=True)
            ini = (f"[store]\nurl = {self.store_url}\n[cluster]\nnode = {name}\nbus = {self.redis_url}\n"
                   f"[devicelink]\npublic_host = {name}.example\n{extra}")
            self.nodes[name] = DaemonProcess(workdir, ini)
        self._key: str | None = None

    def __getitem__(self, name: str) -> DaemonProcess:
        return self.nodes[name]

    @property
    def admin_key(self) -> str:
        """The first admin key (written by the first node started)."""
        if self._key is None:
            for node in self.nodes.values():
                path = os.path.join(node.workdir, "data", "admin.key")
                if os.path.exists(path):
                    self._key = node.admin_key
                    break
        assert self._key is not None, "no node has started"
        return self._key

    def start(self) -> "Nodes":
        for node in self.nodes.values():  # one after the other: the first makes the admin key
            node.start()
        self.wait_all_up()
        return self

    def wait_all_up(self, timeout: float = 15.0) -> None:
        """Until every running node's /healthz says ok (bus connected)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            if node.proc is None or node.proc.poll() is not None:
                continue
            while True:
                status, body = node.request("GET", "/healthz")
                if status == 200 and body["status"] == "ok":
                    break
                assert time.monotonic() < deadline, f"node not ok: {body}"
                time.sleep(0.05)

    def kill(self, name: str) -> None:
        node = self.nodes[name]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        node._log.close()

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.stop()

    def __enter__(self) -> "Nodes":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """Poll ``check()`` until it is truthy (returns it) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


class Socket:
    """A websocket collecting every frame's events in a thread: ``events``, ``closed`` (code)."""

    def __init__(self, node: DaemonProcess, path: str, key: str, **query: Any):
        from websockets.sync.client import connect

        query = {"auth": key, **query}
        url = node.url.replace("http://", "ws://") + path + "?" + "&".join(
            f"{k}={quote(str(v), safe='')}" for k, v in query.items())
        self.ws = connect(url, open_timeout=10, close_timeout=2, proxy=None, max_size=None, legacy=True)
        self.events: list[dict[str, Any]] = []
        self.texts: list[str] = []
        self.closed: int | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                message = self.ws.recv()
                if isinstance(message, str) and message.startswith("["):
                    with self._lock:
                        self.events.extend(json.loads(message))
                else:
                    self.texts.append(message)
        except ConnectionClosed as e:
            self.closed = e.rcvd.code if e.rcvd is not None else 1006
        except Exception:
            self.closed = -1

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e["body"] for e in self.events]

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


class PrivateRedis:
    """A redis-server of the test's own on a free port (so a test may restart it)."""

    def __init__(self, workdir: Any):
        self.port = free_port()
        self.dir = str(workdir)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 10, "redis-server answers")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "PrivateRedis":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

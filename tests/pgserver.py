"""A private PostgreSQL server for one test: stopping it disturbs neither the machine's server nor other tests.

:class:`PgServer` runs ``initdb`` into a directory of its own under the
system temp dir (not pytest's ``tmp_path``: that is private to root and the
server runs as the ``postgres`` OS user, because ``initdb`` refuses root;
as root the binaries run through ``runuser -u postgres --``).  It listens
on 127.0.0.1 on a free port chosen once (a restart keeps it, so a client's
URL stays valid), its unix socket lives inside its directory, auth is
``trust``, and durability is off (``fsync``, ``synchronous_commit``,
``full_page_writes``: a test server needs no crash safety, and it starts in
a second or two).  The binaries are those of the newest version under
``/usr/lib/postgresql/*/bin`` (``IOTD_TEST_PG_BIN`` overrides).

``start()``, ``stop()`` (``pg_ctl stop -m fast``: sessions are cut, as when
an operator stops the server), ``url(dbname)``, ``create_database(name)``,
``destroy()`` (stop, then remove the directory).  The :func:`pg_server`
fixture always destroys it, also when the test fails; directories left by a
killed run (their pid is in the name) are stopped and removed by the next.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

import dbutil

PREFIX = "iotd-pg-"
_LEFTOVER = re.compile(rf"^{PREFIX}(\d+)-")


def bin_dir() -> str:
    """The directory of the newest installed PostgreSQL's binaries."""
    env = os.environ.get("IOTD_TEST_PG_BIN")
    if env:
        return env
    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(os.path.join(d, "initdb"))]
    if not found:
        raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin (set IOTD_TEST_PG_BIN)")

    def version(path: str) -> tuple[int, ...]:
        part = path.split("/")[-2]
        return tuple(int(x) for x in re.findall(r"\d+", part)) or (0,)

    return max(found, key=version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres() -> list[str]:
    """The prefix that runs a command as the ``postgres`` OS user (nothing when we are not root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _chown_postgres(path: str) -> None:
    if os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


def drop_leftovers() -> None:
    """Stop and remove the servers of earlier runs whose process is gone (a run that was killed)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        match = _LEFTOVER.match(os.path.basename(path))
        if match is None or not dbutil.run_is_gone(int(match.group(1))):
            continue
        try:
            with open(os.path.join(path, "data", "postmaster.pid")) as f:
                os.kill(int(f.readline()), signal.SIGQUIT)  # immediate shutdown
        except (OSError, ValueError):
            pass
        shutil.rmtree(path, ignore_errors=True)


class PgServer:
    """See the module docstring."""

    def __init__(self) -> None:
        drop_leftovers()
        self.bin = bin_dir()
        self.dir = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
        _chown_postgres(self.dir)
        self.data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "server.log")
        self.port = _free_port()
        self._initialised = False
        self.running = False

    def _run(self, *args: str, timeout: float = 60) -> None:
        out = subprocess.run(_as_postgres() + [os.path.join(self.bin, args[0]), *args[1:]],
                             capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stdout}{out.stderr}{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> "PgServer":
        """Initialise (the first time) and start; returns when the server accepts connections."""
        if not self._initialised:
            self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                      "--locale=C", "--no-sync", "--no-instructions")
            self._initialised = True
        options = " ".join([
            f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-c unix_socket_directories={self.dir}",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c shared_buffers=16MB", "-c max_connections=50", "-c log_min_messages=warning",
        ])
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-l", self.log_path, "-o", options)
        self.running = True
        return self

    def stop(self) -> None:
        """Fast shutdown (``pg_ctl stop -m fast``): sessions are cut, the server is gone when it returns."""
        if self.running:
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", self.data)
            self.running = False

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        """Stop the server (immediately if a fast stop fails) and remove its directory."""
        try:
            self.stop()
        except Exception:
            try:
                self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", self.data)
            except Exception:
                pass
            self.running = False
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pg_server():
    """A started :class:`PgServer` of the test's own, destroyed when the test ends (pass or fail)."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def wait_until(predicate, timeout: float, every: float = 0.1, what: str = "condition"):
    """``predicate()``'s first true value within ``timeout`` seconds, else AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)

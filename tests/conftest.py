"""Shared fixtures: a real daemon tree on loopback, on a real store of each backend.

Every test runs once per store backend (ids ``[sqlite]``, ``[postgresql]``;
``IOTD_TEST_BACKENDS=sqlite`` or ``make test BACKENDS=sqlite`` selects): SQLite
files in ``tmp_path``, or a PostgreSQL database of the test's own (see
:mod:`dbutil`).  ``make_config`` and ``DaemonProcess`` point the daemon at it.

``daemon`` builds the service tree with :func:`iotd.tap.makeService` (port 0
on 127.0.0.1, data_dir in ``tmp_path``), starts it on the real reactor and
gives a :class:`Daemon` with the base URL, the bootstrap admin key and the
context.  Extra config goes in through the ``daemon_config`` fixture (a dict
of ``{section: {key: value}}``) that a test module may override.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

import dbutil
from pgserver import pg_server  # noqa: F401  (fixture: a private PostgreSQL server)
from iotd import config as configmod
from iotd.tap import makeService


class Daemon:
    def __init__(self, top: Any, port: int):
        self.top = top
        self.ctx = top.ctx
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        with open(self.ctx.config.admin_key_path) as f:
            self.admin_key = f.read().strip()

    def headers(self, key: str | None = None) -> dict:
        return {b"Authorization": [f"Bearer {key or self.admin_key}".encode()],
                b"Content-Type": [b"application/json"]}

    async def request(self, method: str, path: str, body: Any = None, key: str | None = None,
                      raw: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
        """``(status, parsed JSON or raw bytes or None)`` for one request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = self.headers(key)
        if headers:
            hdrs.update(headers)
        resp = await treq.request(method, self.url + path, data=data, headers=hdrs)
        content = await resp.content()
        if not content:
            return resp.code, None
        try:
            return resp.code, json.loads(content)
        except ValueError:
            return resp.code, content

    async def new_key(self, role: str = "admin", groups=(), permissions=(), tenant: str | None = None) -> str:
        if tenant is None:
            status, body = await self.request("POST", "/api/v1/api-keys",
                                              {"name": "t", "role": role, "groups": list(groups),
                                               "permissions": list(permissions)})
            assert status == 201, body
            return body["key"]
        key, secret = await self.ctx.keys.create(tenant, "t", role, groups, permissions)
        return secret

    async def put_device(self, identifier: str, key: str | None = None, **fields) -> dict:
        status, body = await self.request("PUT", f"/api/v1/devices/{identifier}", fields, key=key)
        assert status in (200, 201), body
        return body


def make_config(tmp_path, overrides: dict | None = None) -> configmod.Config:
    sections = {"iotd": {"data_dir": str(tmp_path / "data")},
                "http": {"listen": "tcp:0:interface=127.0.0.1"},
                "devicelink": {"port_range": "31000-31099"}}  # below the ephemeral range
    url = dbutil.store_url(tmp_path / "data" / "iotd.sqlite3")
    if url:
        sections["store"] = {"url": url}
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    text = "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {v}" for k, v in kv.items()) for s, kv in sections.items())
    return configmod.parse_text(text)


async def start_daemon(cfg: configmod.Config) -> Daemon:
    top = makeService(cfg, reactor)
    top.startService()
    await top.getServiceNamed("core").started
    http = top.getServiceNamed("http-0")
    port = await http._waitingForPort
    return Daemon(top, port.getHost().port)


async def stop_daemon(d: Daemon) -> None:
    await defer.maybeDeferred(d.top.stopService)


SQLITE_ONLY_DOC = """A test of a property only an SQLite store has; it runs on SQLite alone.

Allowed for: the database file's mode (0600), the database file removed
under the daemon, a full disk (``PRAGMA max_page_count``, ``statvfs``), and
``iotd-admin backup`` writing an SQLite copy (on PostgreSQL it points to
``pg_dump``, tested on both).  Anything else must pass on both backends: a test
that passes only on SQLite is a bug in the store.
"""


POSTGRESQL_ONLY_DOC = """A test of what only a database server does; it runs on PostgreSQL alone.

Allowed for: the connection to the server lost (the server restarted or the
connections cut) and the store reconnecting by itself.  An SQLite store has
no connection to lose.
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: " + " ".join(SQLITE_ONLY_DOC.split()))
    config.addinivalue_line("markers", "postgresql_only: " + " ".join(POSTGRESQL_ONLY_DOC.split()))


def pytest_collection_modifyitems(config, items):
    """Drop the other backend's run of ``sqlite_only``/``postgresql_only`` tests (deselected, not skipped)."""
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        on = spec.params.get("backend") if spec is not None else None
        if (on == "postgresql" and item.get_closest_marker("sqlite_only") is not None) or (
                on == "sqlite" and item.get_closest_marker("postgresql_only") is not None):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """pytest-twisted wraps a hypothesis test's ``inner_test`` in place and never restores it; the
    same function run again (its other backend) would be wrapped twice and fail. Restore it."""
    hyp = getattr(pyfuncitem.obj, "hypothesis", None)
    original = getattr(hyp, "inner_test", None)
    try:
        yield
    finally:
        if original is not None:
            hyp.inner_test = original


@pytest.fixture(scope="session", autouse=True, params=dbutil.SELECTED)
def backend(request) -> str:
    """The store backend of this run of the test (tests are grouped by it)."""
    with dbutil.using(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _test_databases(backend):
    """The databases a test made are dropped when it ends."""
    with dbutil.scope():
        yield


@pytest.fixture
def daemon_config() -> dict:
    return {}


@pytest_twisted.async_yield_fixture
async def daemon(tmp_path, daemon_config):
    d = await start_daemon(make_config(tmp_path, daemon_config))
    try:
        yield d
    finally:
        await stop_daemon(d)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

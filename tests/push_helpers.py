"""Helpers for the push tests: a daemon whose clock is a ``task.Clock``, and device-side requests.

:class:`ClockReactor` is the real reactor for sockets and threads but a
:class:`twisted.internet.task.Clock` for time (``seconds``, ``callLater``), so
a whole daemon serves real HTTP while the tests move its time by hand.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from conftest import Daemon, make_config, stop_daemon
from iotd.tap import makeService


class ClockReactor:
    """Real reactor for I/O and threads, ``clock`` for time."""

    def __init__(self, clock: task.Clock, real: Any = reactor):
        self.clock = clock
        self._real = real

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay, fn, *args, **kw):
        return self.clock.callLater(delay, fn, *args, **kw)

    def getDelayedCalls(self):
        return self.clock.getDelayedCalls()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def new_clock() -> task.Clock:
    clock = task.Clock()
    clock.rightNow = float(int(time.time()))
    return clock


async def start_clock_daemon(tmp_path, overrides: dict | None = None) -> tuple[Daemon, task.Clock]:
    clock = new_clock()
    top = makeService(make_config(tmp_path, overrides), ClockReactor(clock))
    top.startService()
    await top.getServiceNamed("core").started
    port = await top.getServiceNamed("http-0")._waitingForPort
    return Daemon(top, port.getHost().port), clock


@pytest.fixture
def push_config() -> dict:
    return {}


@pytest_twisted.async_yield_fixture
async def clocked(tmp_path, push_config):
    """``(daemon, clock)``: the real daemon tree on loopback with time on a Clock."""
    d, clock = await start_clock_daemon(tmp_path, push_config)
    try:
        yield d, clock
    finally:
        await stop_daemon(d)


async def poll(url: str, device_id: Any, **params: Any) -> tuple[int, Any, Any]:
    """``GET /push``: (status, parsed JSON / raw bytes / None when empty, headers)."""
    query = {"deviceId": str(device_id), **{k: str(v) for k, v in params.items()}}
    resp = await treq.get(url + "/push", params=query)
    content = await resp.content()
    return resp.code, _decode(content), resp.headers


async def post_result(url: str, device_id: Any, body: Any = None, raw: bytes | None = None,
                      **params: Any) -> tuple[int, bytes]:
    """``POST /result``: (status, raw body)."""
    query = {"deviceId": str(device_id), **{k: str(v) for k, v in params.items()}}
    data = raw if raw is not None else json.dumps(body).encode()
    resp = await treq.post(url + "/result", params=query, data=data,
                           headers={b"Content-Type": [b"application/json"]})
    return resp.code, await resp.content()


def _decode(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return content


def push_service(daemon: Daemon):
    """The daemon's command service (the service tree's child named ``push``)."""
    return daemon.top.getServiceNamed("push")


async def settle(daemon: Daemon) -> None:
    """Every write the push service issued so far is committed."""
    await push_service(daemon).settle()


class LogLines:
    """The log while in the ``with`` block: ``events`` as emitted, ``lines`` as formatted text."""

    def __init__(self):
        self.events: list[dict] = []
        self.lines: list[str] = []

    def __call__(self, event):
        self.events.append(event)
        text = formatEvent(event)
        if text:
            self.lines.append(text)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)

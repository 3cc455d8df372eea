"""A Control iD-like push device simulator over real HTTP.

Each :class:`SimDevice` behaves like the firmware: ``GET /push?deviceId=N&uuid=U``
every ``period`` seconds while the answer is empty; when it gets a command it
"runs" it, sends ``POST /result?deviceId=N&uuid=U&endpoint=E`` with the
response as a JSON-encoded *string* (as real firmware does), and polls again
at once, so queued commands run back to back.

``python tests/push_sim.py URL DEVICE_ID...`` runs devices until interrupted.
"""

from __future__ import annotations

import json
import sys
import uuid as uuidlib
from typing import Any, Callable

import treq
from twisted.internet import defer, reactor, task
from twisted.web.client import HTTPConnectionPool


def run_command(command: dict[str, Any]) -> dict[str, Any]:
    """What the simulated device answers: it echoes what it was asked to do."""
    return {"endpoint": command.get("endpoint"), "echo": command.get("body")}


class SimDevice:
    def __init__(self, base_url: str, device_id: int, period: float = 0.01, pool: Any = None,
                 clock: Any = reactor, execute: Callable[[dict], dict] = run_command):
        self.base_url = base_url.rstrip("/")
        self.device_id = device_id
        self.uuid = str(uuidlib.uuid4())
        self.period = period
        self.clock = clock
        self.execute = execute
        self._kw = {"pool": pool} if pool is not None else {}
        self.executed: list[dict[str, Any]] = []  # every command received, in order
        self.polls = 0
        self.errors: list[str] = []
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    async def poll_once(self) -> dict[str, Any] | None:
        resp = await treq.get(f"{self.base_url}/push",
                              params={"deviceId": str(self.device_id), "uuid": self.uuid}, **self._kw)
        body = await resp.content()
        self.polls += 1
        if resp.code != 200:
            self.errors.append(f"/push answered {resp.code}: {body[:200]!r}")
            return None
        return json.loads(body) if body else None

    async def post_result(self, command: dict[str, Any], outcome: dict[str, Any]) -> None:
        payload = json.dumps({"response": json.dumps(outcome)}).encode()
        resp = await treq.post(f"{self.base_url}/result", data=payload,
                               params={"deviceId": str(self.device_id), "uuid": self.uuid,
                                       "endpoint": command.get("endpoint", "")},
                               headers={b"Content-Type": [b"application/json"]}, **self._kw)
        body = await resp.content()
        if resp.code != 200 or body:
            self.errors.append(f"/result answered {resp.code}: {body[:200]!r}")

    async def run(self, until: Callable[["SimDevice"], bool] | None = None) -> None:
        """Poll, run, post the result, poll again -- until ``until(self)`` or :meth:`stop`."""
        while not self._stopping and not (until is not None and until(self)):
            command = await self.poll_once()
            if command is None:
                await task.deferLater(self.clock, self.period, lambda: None)
                continue
            self.executed.append(command)
            await self.post_result(command, self.execute(command))


async def main(url: str, ids: list[int]) -> None:
    pool = HTTPConnectionPool(reactor, persistent=True)
    devices = [SimDevice(url, i, period=1.0, pool=pool) for i in ids]
    await defer.gatherResults([defer.ensureDeferred(d.run()) for d in devices])


if __name__ == "__main__":
    task.react(lambda _reactor: defer.ensureDeferred(main(sys.argv[1], [int(a) for a in sys.argv[2:]])))

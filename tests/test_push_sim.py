"""100 commands through 10 simulated devices over real HTTP: none lost, none duplicated."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.web.client import HTTPConnectionPool

from push_sim import SimDevice

DEVICES, PER_DEVICE = 10, 10


@pytest_twisted.ensureDeferred
async def test_hundred_commands_through_ten_devices(daemon):
    for n in range(DEVICES):
        await daemon.put_device(f"sim-{n}", pushId=1000 + n)
    pool = HTTPConnectionPool(reactor, persistent=True)
    sims = [SimDevice(daemon.url, 1000 + n, period=0.005, pool=pool) for n in range(DEVICES)]
    running = [defer.ensureDeferred(s.run(until=lambda s: len(s.executed) >= PER_DEVICE)) for s in sims]
    # The operator queues while the devices are already polling, round-robin over the devices.
    expected: dict[int, list[int]] = {n: [] for n in range(DEVICES)}
    for seq in range(DEVICES * PER_DEVICE):
        n = seq % DEVICES
        status, body = await daemon.request("POST", f"/api/v1/devices/sim-{n}/commands",
                                            {"endpoint": "load_objects", "body": {"seq": seq}})
        assert status == 201
        expected[n].append(body["id"])
    watchdog = reactor.callLater(30, lambda: [s.stop() for s in sims])
    try:
        await defer.gatherResults(running)
    finally:
        if watchdog.active():
            watchdog.cancel()
    # Give a device that got an extra command (a duplicate) the chance to show it.
    await task.deferLater(reactor, 0.05, lambda: None)
    for s in sims:
        s.stop()
    await pool.closeCachedConnections()

    for n, sim in enumerate(sims):
        assert sim.errors == []
        # Each device ran exactly its own commands, each once, oldest first.
        assert [c["body"]["seq"] for c in sim.executed] == [seq for seq in range(n, 100, DEVICES)]
        status, body = await daemon.request("GET", f"/api/v1/devices/sim-{n}/commands?limit=1000")
        assert [c["id"] for c in body["items"]] == expected[n]
        for c in body["items"]:
            assert c["status"] == "done" and c["attempts"] == 1
            assert c["response"] == {"endpoint": "load_objects", "echo": c["body"]}
            assert json.loads(c["responseRaw"]) == c["response"]  # stored as the firmware sent it

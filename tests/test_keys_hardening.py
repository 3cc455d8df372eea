"""Keys honoured at once and never resurrected; a key's lifetime and rights bound its children.

Issue 12, items 1 and 8, and ``lastUsedAt``: against the real daemon (the
``daemon`` fixture, real SQLite) and the real ``iotd-admin`` CLI run as a
subprocess on the daemon's database.
"""

import os
import subprocess
import sys
import time

import pytest_twisted
from conftest import repo_root
from twisted.internet import defer, reactor, task, threads
from ws_helpers import Client, eventually, sleep, ws_url

import dbutil
from iotd.auth import KeyRing
from iotd.store import keys as keysql
from iotd.timefmt import iso, parse_iso


def run_cli(daemon, *args):
    """``iotd-admin`` on the daemon's store, from this source tree (blocking)."""
    ini = os.path.join(os.path.dirname(daemon.ctx.config.database_path), "cli.ini")
    with open(ini, "w") as f:
        f.write(dbutil.cli_ini(daemon.ctx.config))
    env = dict(os.environ, PYTHONPATH=repo_root())
    out = subprocess.run([sys.executable, "-m", "iotd.admin", "-c", ini, *args],
                         capture_output=True, text=True, timeout=60, env=env, cwd=repo_root())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def cli(daemon, *args):
    """The CLI in a thread: the daemon keeps running (and polling) meanwhile, as in real life."""
    return await threads.deferToThread(run_cli, daemon, *args)


def in_seconds(seconds: float) -> str:
    return iso(int((time.time() + seconds) * 1_000_000))


async def key_id_of_role(daemon, role):
    status, body = await daemon.request("GET", "/api/v1/api-keys")
    assert status == 200
    return next(k["id"] for k in body["items"] if k["role"] == role)


def hold_reads(store, fn):
    """Make ``store.read(fn, ...)`` take its snapshot at once but deliver it only on release.

    Returns ``(taken, release)``: ``taken`` fires once the snapshot was read;
    ``release()`` lets the read's result through to its caller.
    """
    real = store.read
    taken: defer.Deferred = defer.Deferred()
    gate: defer.Deferred = defer.Deferred()

    def read(f, *args):
        d = real(f, *args)
        if f is not fn:
            return d

        def hold(result):
            if not taken.called:
                taken.callback(None)
            held = defer.Deferred()
            gate.addCallback(lambda _: held.callback(result))
            return held

        return d.addCallback(hold)

    store.read = read
    taken.addTimeout(10, reactor)
    return taken, lambda: gate.called or gate.callback(None)


async def lookups_counted(daemon, outcome):
    """``iotd_key_lookups_total{outcome=...}`` as /metrics shows it."""
    status, text = await daemon.request("GET", "/metrics")
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith(f'iotd_key_lookups_total{{outcome="{outcome}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- item 1: keys honoured at once, never resurrected ---------------------------------


@pytest_twisted.ensureDeferred
async def test_key_created_by_the_cli_works_on_the_very_next_request(daemon):
    found_before = await lookups_counted(daemon, "found")
    for round in range(5):  # each round would race the 0.5 s poll without the lookup
        key = await cli(daemon, "key", "create", "--role", "read_only", "--name", f"script-{round}")
        assert len(key) == 64
        status, body = await daemon.request("GET", "/api/v1/devices", key=key)
        assert status == 200, (round, body)
        assert body == {"items": []}
        status, body = await daemon.request("PUT", "/api/v1/devices/nope", {}, key=key)
        assert status == 403  # the key is the CLI's read_only key, not something else
    assert await lookups_counted(daemon, "found") <= found_before + 5  # once per key at most


@pytest_twisted.ensureDeferred
async def test_key_created_by_the_cli_opens_both_socket_kinds_at_once(daemon):
    await daemon.put_device("gate")
    for round in range(3):
        key = await cli(daemon, "key", "create", "--role", "read_only")
        element = await Client.open(ws_url(daemon, "/api/v1/devices/gate/readings/socket", auth=key))
        status, body = await daemon.request("POST", "/api/v1/devices/gate/readings", {"data": {"round": round}})
        assert status == 201
        events = await element.events(1)
        assert events[0]["body"]["data"] == {"round": round}
        await element.close()
        key = await cli(daemon, "key", "create", "--role", "read_only")
        subscribe = await Client.open(ws_url(daemon, "/api/v1/system/common/websocket/connect", token=key))
        assert (await subscribe.recv_json())["code"] == 200
        await subscribe.close()


@pytest_twisted.ensureDeferred
async def test_many_unknown_keys_at_once_are_all_401_and_a_real_key_still_works(daemon):
    requests = [daemon.request("GET", "/api/v1/devices", key=os.urandom(32).hex()) for _ in range(100)]
    answers = await defer.gatherResults([defer.ensureDeferred(r) for r in requests])
    assert {status for status, _ in answers} == {401}
    assert all(body["error"]["code"] == "unauthorized" for _, body in answers)
    key = await cli(daemon, "key", "create", "--role", "admin")
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_reload_read_before_a_revoke_cannot_bring_the_key_back(daemon):
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "victim", "role": "admin"})
    key, key_id = body["key"], body["id"]
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 200
    ring = daemon.ctx.keys
    taken, release = hold_reads(daemon.ctx.store, keysql.all_keys)
    reload = defer.ensureDeferred(ring.reload())
    await taken  # the snapshot (with the key in it) is read, not yet applied
    assert (await daemon.request("DELETE", f"/api/v1/api-keys/{key_id}"))[0] == 204
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 401
    release()
    await reload  # the stale snapshot arrives after the revoke
    status, body = await daemon.request("GET", "/api/v1/devices", key=key)
    assert status == 401, body
    await sleep(1.2)  # and the polls after it do not bring it back either
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 401
    status, body = await daemon.request("GET", "/api/v1/api-keys")
    assert key_id not in [k["id"] for k in body["items"]]


@pytest_twisted.ensureDeferred
async def test_a_lookup_read_before_a_revoke_cannot_let_the_key_in(daemon):
    daemon.ctx.keys.stop()  # no poll: the key reaches the daemon only through the lookup
    key = await cli(daemon, "key", "create", "--role", "admin", "--name", "fresh")
    key_id = next(line.split("\t")[0] for line in (await cli(daemon, "key", "list")).splitlines()
                  if "\tfresh\t" in line)
    taken, release = hold_reads(daemon.ctx.store, keysql.by_hashes)
    first = defer.ensureDeferred(daemon.request("GET", "/api/v1/devices", key=key))
    await taken  # the lookup found the key in a snapshot read before the revoke
    assert (await daemon.request("DELETE", f"/api/v1/api-keys/{key_id}"))[0] == 204
    release()
    status, body = await first
    assert status == 401, body
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 401


# -- item 8: a key's lifetime and rights bound what it creates and revokes ------------


@pytest_twisted.ensureDeferred
async def test_a_key_that_expires_cannot_mint_a_key_that_outlives_it(daemon):
    status, body = await daemon.request("POST", "/api/v1/api-keys",
                                        {"name": "temp", "role": "admin", "expiresAt": in_seconds(3600)})
    assert status == 201
    temp, temp_expires = body["key"], body["expiresAt"]
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "forever", "role": "admin"}, key=temp)
    assert status == 403 and "expiresAt" in body["error"]["message"], body
    status, body = await daemon.request("POST", "/api/v1/api-keys",
                                        {"name": "later", "role": "admin", "expiresAt": in_seconds(7200)}, key=temp)
    assert status == 403 and "expiresAt" in body["error"]["message"], body
    status, body = await daemon.request("POST", "/api/v1/api-keys",
                                        {"name": "same", "role": "admin", "expiresAt": temp_expires}, key=temp)
    assert status == 201 and body["expiresAt"] == temp_expires
    status, body = await daemon.request("POST", "/api/v1/api-keys",
                                        {"name": "sooner", "role": "read_only", "expiresAt": in_seconds(60)}, key=temp)
    assert status == 201
    assert parse_iso(body["expiresAt"]) < parse_iso(temp_expires)
    status, body = await daemon.request("GET", "/api/v1/api-keys")
    assert sorted(k["name"] for k in body["items"]) == ["admin", "same", "sooner", "temp"]


@pytest_twisted.ensureDeferred
async def test_api_keys_delete_revokes_only_keys_within_the_revokers_rights(daemon):
    revoker = await daemon.new_key("read_only", permissions=["apiKeys:delete"])
    admin_id = await key_id_of_role(daemon, "admin")
    status, body = await daemon.request("DELETE", f"/api/v1/api-keys/{admin_id}", key=revoker)
    assert status == 403 and "rights" in body["error"]["message"], body
    assert (await daemon.request("GET", "/api/v1/devices"))[0] == 200  # the admin key still works
    status, body = await daemon.request("POST", "/api/v1/api-keys",
                                        {"name": "writer", "role": "read_only", "permissions": ["devices:create"]})
    writer, writer_id = body["key"], body["id"]
    assert (await daemon.request("DELETE", f"/api/v1/api-keys/{writer_id}", key=revoker))[0] == 403
    assert (await daemon.request("GET", "/api/v1/devices", key=writer))[0] == 200
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "reader", "role": "read_only"})
    reader, reader_id = body["key"], body["id"]
    assert (await daemon.request("DELETE", f"/api/v1/api-keys/{reader_id}", key=revoker))[0] == 204
    assert (await daemon.request("GET", "/api/v1/devices", key=reader))[0] == 401
    other = await daemon.new_key("admin", tenant="other")
    assert (await daemon.request("DELETE", f"/api/v1/api-keys/{writer_id}", key=other))[0] == 404


@pytest_twisted.ensureDeferred
async def test_a_key_revoking_a_cli_key_not_yet_loaded_still_needs_covering_rights(daemon):
    revoker = await daemon.new_key("read_only", permissions=["apiKeys:delete"])
    await cli(daemon, "key", "create", "--role", "admin", "--name", "cli-admin")
    key_id = next(line.split("\t")[0] for line in (await cli(daemon, "key", "list")).splitlines()
                  if "\tcli-admin\t" in line)
    status, body = await daemon.request("DELETE", f"/api/v1/api-keys/{key_id}", key=revoker)
    assert status == 403, body


@pytest_twisted.ensureDeferred
async def test_an_expiring_key_closes_its_packet_socket_with_4401_and_then_gets_401(daemon):
    await daemon.put_device("gate")
    expires = in_seconds(1.5)
    status, body = await daemon.request("POST", "/api/v1/api-keys",
                                        {"name": "screen", "role": "read_only", "expiresAt": expires})
    assert status == 201
    key = body["key"]
    sock = await Client.open(ws_url(daemon, "/api/v1/devices/gate/packets/socket", auth=key))
    code, reason = await sock.closed(timeout=10)
    closed_at = time.time()
    assert code == 4401, (code, reason)
    assert closed_at >= parse_iso(expires) / 1_000_000 - 0.05  # at its expiry, not before
    status, body = await daemon.request("GET", "/api/v1/devices", key=key)
    assert status == 401 and body["error"]["code"] == "unauthorized"


# -- lastUsedAt: listed, stored, at most once a minute ----------------------------------


def stored_last_used(daemon, key_id):
    conn = dbutil.connect(daemon.ctx.config)
    try:
        row = conn.execute("SELECT last_used_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    finally:
        conn.close()
    return row[0]


@pytest_twisted.ensureDeferred
async def test_last_used_at_is_listed_and_stored_once_a_key_is_used(daemon):
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "probe", "role": "read_only"})
    key, key_id = body["key"], body["id"]

    async def listed():
        status, body = await daemon.request("GET", "/api/v1/api-keys")
        return next(k for k in body["items"] if k["id"] == key_id)

    assert "lastUsedAt" not in await listed()
    before = time.time()
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 200
    after = time.time()
    used = (await listed())["lastUsedAt"]
    assert before - 0.01 <= parse_iso(used) / 1_000_000 <= after + 0.01
    await eventually(lambda: stored_last_used(daemon, key_id) == parse_iso(used), timeout=10)
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 200
    assert (await listed())["lastUsedAt"] == used  # not rewritten within the minute
    listing = await cli(daemon, "key", "list")
    assert f"last_used={used}" in next(line for line in listing.splitlines() if line.startswith(key_id))


@pytest_twisted.ensureDeferred
async def test_last_used_at_is_written_at_most_once_a_minute(tmp_path):
    store = dbutil.new_store(tmp_path / "keys.sqlite", reactor)
    await store.start()
    clock = task.Clock()
    clock.advance(1_700_000_000)
    ring = KeyRing(store, clock)
    try:
        await ring.start()
        key, secret = await ring.create("t", "probe", "read_only")

        def stored():
            conn = dbutil.connect(store)
            try:
                return conn.execute("SELECT last_used_at FROM api_keys").fetchone()[0]
            finally:
                conn.close()

        def use_at(now):
            clock.advance(now - clock.seconds())
            assert ring.authenticate(secret) == key

        def polled_until(value):
            clock.advance(ring.POLL)  # the poll writes what was used
            return stored() == value

        use_at(1_700_000_010)
        await eventually(lambda: polled_until(1_700_000_010_000_000))
        use_at(1_700_000_069)  # 59 s later: not written
        for _ in range(4):
            clock.advance(ring.POLL)
            await sleep(0.1)
        assert stored() == 1_700_000_010_000_000
        use_at(1_700_000_071)  # 61 s later: written
        await eventually(lambda: polled_until(1_700_000_071_000_000))
        assert ring.last_used(key.id) == 1_700_000_071_000_000
    finally:
        ring.stop()
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_keys_waiting_for_a_lookup_are_bounded_and_beyond_it_get_503(daemon):
    ring = daemon.ctx.keys
    ring.MAX_WAITING = 5  # the daemon's bound is 10,000 distinct keys
    refused_before = await lookups_counted(daemon, "refused")
    taken, release = hold_reads(daemon.ctx.store, keysql.by_hashes)
    answers: list = []

    def send():
        d = defer.ensureDeferred(daemon.request("GET", "/api/v1/devices", key=os.urandom(32).hex()))
        return d.addCallback(answers.append)

    first = send()
    await taken  # one lookup read in flight (held); the next keys wait for the next read
    rest = [send() for _ in range(9)]
    await eventually(lambda: len(answers) == 5, timeout=10)
    assert [status for status, _ in answers] == [503] * 5
    assert all(body["error"]["code"] == "unavailable" for _, body in answers)
    release()
    await defer.gatherResults([first, *rest])
    assert sorted(status for status, _ in answers) == [401] * 5 + [503] * 5
    assert await lookups_counted(daemon, "refused") == refused_before + 5
    key = await cli(daemon, "key", "create", "--role", "admin")
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 200

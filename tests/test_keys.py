"""API keys: roles, grants, groups, tenants, revocation, the CLI."""

import os
import stat
import subprocess
import sys

import pytest_twisted
from twisted.internet import reactor, task

import dbutil
from iotd.auth import hash_key


def cli(daemon, *args):
    ini = os.path.join(os.path.dirname(daemon.ctx.config.database_path), "cli.ini")
    with open(ini, "w") as f:
        f.write(dbutil.cli_ini(daemon.ctx.config))
    return subprocess.run([sys.executable, "-m", "iotd.admin", "-c", ini, *args],
                          capture_output=True, text=True, timeout=60)


@pytest_twisted.ensureDeferred
async def test_bootstrap_admin_key_file_is_private_and_works(daemon):
    path = daemon.ctx.config.admin_key_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    status, body = await daemon.request("GET", "/api/v1/api-keys")
    assert status == 200
    assert [k["role"] for k in body["items"]] == ["admin"]
    assert "key" not in body["items"][0] and "key_hash" not in body["items"][0]


@pytest_twisted.ensureDeferred
async def test_store_keeps_only_the_hash(daemon):
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "ops", "role": "read_only"})
    assert status == 201 and len(body["key"]) == 64
    raw = dbutil.everything_stored(daemon.ctx.config)
    assert body["key"].encode() not in raw
    assert hash_key(body["key"]).encode() in raw


@pytest_twisted.ensureDeferred
async def test_missing_and_wrong_keys_are_401_json(daemon):
    status, body = await daemon.request("GET", "/api/v1/devices", key="0" * 64)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = await daemon.request("GET", "/api/v1/devices", headers={b"Authorization": [b""]})
    assert status == 401
    status, body = await daemon.request("GET", f"/api/v1/devices?auth={daemon.admin_key}",
                                        headers={b"Authorization": [b""]})
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_read_only_key_reads_but_cannot_write(daemon):
    ro = await daemon.new_key("read_only")
    await daemon.put_device("d1")
    assert (await daemon.request("GET", "/api/v1/devices/d1", key=ro))[0] == 200
    status, body = await daemon.request("PUT", "/api/v1/devices/d2", {}, key=ro)
    assert status == 403 and "devices:create" in body["error"]["message"]
    status, _ = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"t": 1}}, key=ro)
    assert status == 403


@pytest_twisted.ensureDeferred
async def test_extra_grant_allows_that_action_only(daemon):
    key = await daemon.new_key("read_only", permissions=["readings:create"])
    await daemon.put_device("d1")
    status, _ = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"t": 1}}, key=key)
    assert status == 201
    status, _ = await daemon.request("POST", "/api/v1/devices/d1/packets", {"payload": "x"}, key=key)
    assert status == 403


@pytest_twisted.ensureDeferred
async def test_group_key_sees_only_its_groups(daemon):
    await daemon.put_device("in-1", tags=["north"])
    await daemon.put_device("out-1", tags=["south"])
    key = await daemon.new_key("group", groups=["north"])
    status, body = await daemon.request("GET", "/api/v1/devices", key=key)
    assert [d["identifier"] for d in body["items"]] == ["IN-1"]
    assert (await daemon.request("GET", "/api/v1/devices/out-1", key=key))[0] == 404
    assert (await daemon.request("GET", "/api/v1/devices/in-1", key=key))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_key_cannot_mint_more_than_it_has(daemon):
    minter = await daemon.new_key("read_only", permissions=["apiKeys:create"])
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "x", "role": "admin"}, key=minter)
    assert status == 403
    status, body = await daemon.request("POST", "/api/v1/api-keys",
                                        {"name": "x", "role": "read_only", "permissions": ["devices:delete"]},
                                        key=minter)
    assert status == 403
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "x", "role": "read_only"}, key=minter)
    assert status == 201
    grp = await daemon.new_key("group", groups=["a"], permissions=["apiKeys:create"])
    status, _ = await daemon.request("POST", "/api/v1/api-keys",
                                     {"name": "x", "role": "group", "groups": ["b"]}, key=grp)
    assert status == 403
    status, _ = await daemon.request("POST", "/api/v1/api-keys",
                                     {"name": "x", "role": "group", "groups": ["a"]}, key=grp)
    assert status == 201


@pytest_twisted.ensureDeferred
async def test_bad_key_requests_are_422(daemon):
    for body, word in [({"name": "x", "role": "root"}, "role"),
                       ({"name": "x", "role": "group"}, "groups"),
                       ({"name": "x", "role": "admin", "permissions": ["devices:fly"]}, "permissions"),
                       ({"role": "admin"}, "name")]:
        status, out = await daemon.request("POST", "/api/v1/api-keys", body)
        assert status == 422 and word in out["error"]["message"], out


@pytest_twisted.ensureDeferred
async def test_revoked_key_stops_at_once(daemon):
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "tmp", "role": "admin"})
    key, key_id = body["key"], body["id"]
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 200
    assert (await daemon.request("DELETE", f"/api/v1/api-keys/{key_id}"))[0] == 204
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 401
    assert (await daemon.request("DELETE", f"/api/v1/api-keys/{key_id}"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_expired_key_is_401(daemon):
    status, body = await daemon.request("POST", "/api/v1/api-keys",
                                        {"name": "old", "role": "admin", "expiresAt": "2000-01-01T00:00:00Z"})
    assert status == 201
    assert (await daemon.request("GET", "/api/v1/devices", key=body["key"]))[0] == 401


@pytest_twisted.ensureDeferred
async def test_tenants_never_see_each_other(daemon):
    await daemon.put_device("shared-name", name="default's")
    other = await daemon.new_key("admin", tenant="other")
    status, body = await daemon.request("GET", "/api/v1/devices", key=other)
    assert body["items"] == []
    assert (await daemon.request("GET", "/api/v1/devices/shared-name", key=other))[0] == 404
    await daemon.put_device("shared-name", key=other, name="other's")
    status, body = await daemon.request("GET", "/api/v1/devices/shared-name")
    assert body["name"] == "default's"
    status, body = await daemon.request("GET", "/api/v1/api-keys", key=other)
    assert all(k["tenant"] == "other" for k in body["items"])


@pytest_twisted.ensureDeferred
async def test_cli_key_for_other_tenant_works_and_is_isolated(daemon):
    await daemon.put_device("gate-01")
    out = await task.deferLater(reactor, 0, cli, daemon, "key", "create", "--role", "admin", "--tenant", "other")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert len(key) == 64
    status, body = await daemon.request("GET", "/api/v1/devices", key=key)  # at once: looked up
    assert status == 200 and body["items"] == []
    assert (await daemon.request("GET", "/api/v1/devices/gate-01", key=key))[0] == 404


@pytest_twisted.ensureDeferred
async def test_cli_list_and_revoke_reach_the_running_daemon(daemon):
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "victim", "role": "admin"})
    listing = cli(daemon, "key", "list")
    assert body["id"] in listing.stdout and body["key"] not in listing.stdout
    revoked = []
    daemon.ctx.keys.add_revoke_listener(revoked.append)
    out = cli(daemon, "key", "revoke", body["id"])
    assert out.returncode == 0
    start = reactor.seconds()
    while reactor.seconds() - start < 1.0 and not revoked:
        await task.deferLater(reactor, 0.05, lambda: None)
    assert revoked == [body["id"]]
    assert (await daemon.request("GET", "/api/v1/devices", key=body["key"]))[0] == 401

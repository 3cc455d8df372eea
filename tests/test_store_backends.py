"""What the two store backends promise alike: event ids in commit order without holes across
stores sharing one database, migrations that run once when two start together, the SQL layer
(``?``, ``RETURNING``, ``FOR UPDATE``), ``[store]`` config errors, a lost PostgreSQL connection."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import dbutil
from conftest import repo_root
from daemon_process import ROOT, TWISTD, free_port
from iotd import config as configmod
from iotd import errors
from iotd.store import events as evsql
from test_store_health import health, until_health


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_database_allocate_event_ids_in_commit_order_without_holes(tmp_path):
    """Two nodes on one database: ids are 1..N in commit order, stamps rise with ids, a failed
    insert takes no id."""
    target = dbutil.target(tmp_path / "shared.sqlite3")
    a = dbutil.new_store(tmp_path / "shared.sqlite3", reactor)
    b = dbutil.new_store(tmp_path / "shared.sqlite3", reactor)
    await a.start()
    await b.start()
    assert a.path == b.path == target
    try:
        writes, refused = [], []
        for n in range(150):
            store = a if n % 2 else b
            writes.append(store.write(evsql.insert, [("t", "reading", "D", {"n": n}), ("t", "packet", "D", {"n": n})]))
            if n % 10 == 0:  # a reading naming no packet: the whole call is refused, it takes no id
                refused.append(store.write(evsql.insert, [("t", "reading", "D", {"packet_id": 10**9})]))
        rows = [row for batch in await defer.gatherResults(writes) for row in batch]
        for d in refused:
            with pytest.raises(errors.ItemInvalid):
                await d
        stored = await a.read(evsql.read, "t", ["reading", "packet"], 0, 1000)
        assert [r[0] for r in stored] == list(range(1, 301))  # no hole, none twice
        assert sorted(r[0] for r in rows) == list(range(1, 301))  # what the writers were told
        stamps = [r[4] for r in stored]
        assert all(later > earlier for earlier, later in zip(stamps, stamps[1:]))
        assert await b.read(evsql.last_id) == 300
    finally:
        await a.stop()
        await b.stop()


def test_two_processes_starting_at_once_migrate_once(tmp_path):
    target = dbutil.fresh_target(tmp_path / "fresh.sqlite3")
    code = "import sys; from iotd.store import open_sync; open_sync(sys.argv[1]).close()"
    env = dict(os.environ, PYTHONPATH=repo_root())
    procs = [subprocess.Popen([sys.executable, "-c", code, target], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outcomes = [(p.wait(60), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in outcomes), outcomes
    conn = dbutil.connect(target)
    try:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
        keys_revision = conn.execute("SELECT value FROM meta WHERE name = 'keys_revision'").fetchall()
    finally:
        conn.close()
    assert versions == [1, 2, 3, 4, 5, 6, 7]  # every migration of iotd/store/schema/<dialect>/, once
    assert keys_revision == [("0",)]  # migration 1 ran once


def _interface(conn):
    """What the push code relies on inside one write."""
    conn.execute("INSERT INTO meta (name, value) VALUES (?, ?)", ("probe-1", "100% sure"))
    conn.execute("INSERT INTO meta (name, value) VALUES (?, ?)", ("probe-2", "50%"))
    lock = " FOR UPDATE" if conn.dialect == "postgresql" else ""
    locked = conn.execute("SELECT name, value FROM meta WHERE name LIKE 'probe-%' ORDER BY name" + lock).fetchall()
    (command_id,) = conn.execute(
        "INSERT INTO commands (tenant, device, status, endpoint, attempts, created_us) "
        "VALUES (?, ?, 'queued', ?, 0, ?) RETURNING id", ("t", "D", "e?'x'", 1)).fetchone()
    changed = conn.execute("UPDATE commands SET status = 'sent' WHERE id = ? AND status = 'queued'",
                           (command_id,)).rowcount
    return conn.dialect, locked, command_id, changed


@pytest_twisted.ensureDeferred
async def test_a_write_speaks_the_same_sql_on_both_backends(tmp_path, backend):
    store = dbutil.new_store(tmp_path / "sql.sqlite3", reactor)
    await store.start()
    try:
        dialect, locked, command_id, changed = await store.write(_interface)
        assert dialect == store.dialect == backend
        assert locked == [("probe-1", "100% sure"), ("probe-2", "50%")]  # a literal % survives
        assert command_id == 1 and changed == 1
        row = await store.read(lambda c: c.execute("SELECT endpoint, status FROM commands WHERE id = ?",
                                                   (command_id,)).fetchone())
        assert tuple(row) == ("e?'x'", "sent")  # a ? inside a value is a value
    finally:
        await store.stop()


# -- [store] in the config ----------------------------------------------------------------


def test_store_url_and_pool_size_are_checked_like_every_key():
    assert configmod.parse_text("").store == configmod.StoreSection(url="", pool_size=8)
    cfg = configmod.parse_text("[store]\nurl = postgresql://u@db:5432/iotd?sslmode=require\npool_size = 4\n")
    assert cfg.store_target == "postgresql://u@db:5432/iotd?sslmode=require" and cfg.store.pool_size == 4
    with pytest.raises(configmod.ConfigError, match=r"^iotd: config error: \[store\] url: expected empty"):
        configmod.parse_text("[store]\nurl = mysql://u:pw@db/iotd\n")
    with pytest.raises(configmod.ConfigError, match=r"^iotd: config error: \[store\] pool_size: must be at least 2"):
        configmod.parse_text("[store]\npool_size = 1\n")


def test_an_unreachable_postgresql_stops_twistd_with_one_line_and_no_password(tmp_path):
    url = f"postgresql://iotd:s3cr%21t-pw@127.0.0.1:{free_port()}/iotd?connect_timeout=3"
    ini = tmp_path / "iotd.ini"
    ini.write_text(f"[iotd]\ndata_dir = data\n[http]\nlisten = tcp:{free_port()}:interface=127.0.0.1\n"
                   f"[store]\nurl = {url}\n")
    out = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "iotd", "-c", str(ini)], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "iotd: config error: [store] url: cannot connect: " in text
    assert "s3cr" not in text and "Traceback" not in text
    admin = subprocess.run([sys.executable, "-m", "iotd.admin", "-c", str(ini), "key", "list"], cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert admin.returncode == 1 and "[store] url: cannot connect: " in admin.stderr
    assert "s3cr" not in admin.stdout + admin.stderr


# -- PostgreSQL: the connection lost and found again --------------------------------------------


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_lost_postgresql_connections_answer_503_then_the_store_reconnects_by_itself(daemon):
    await daemon.put_device("d1")
    status, first = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"n": 1}})
    assert status == 201
    assert dbutil.cut_connections(daemon.ctx.config.store.url) >= 2  # the writer's and a reader's
    status, body = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"n": 2}})
    assert status == 503 and body["error"]["code"] == "unavailable"
    status, body = await health(daemon)
    assert status == 503 and body["store"] == "unreachable"
    body = await until_health(daemon, 200)  # reconnected: no restart
    assert body["store"] == "ok"
    status, third = await daemon.request("POST", "/api/v1/devices/d1/readings", {"data": {"n": 3}})
    assert status == 201 and third["id"] == first["id"] + 1  # the refused write took no id
    status, listing = await daemon.request("GET", "/api/v1/devices")
    assert status == 200 and [d["identifier"] for d in listing["items"]] == ["D1"]


@pytest_twisted.ensureDeferred
async def test_text_with_a_nul_character_is_422_on_both_backends_and_nothing_is_stored(daemon):
    """PostgreSQL text cannot hold U+0000; both backends refuse it alike instead of failing inside."""
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "a\u0000b", "role": "read_only"})
    assert status == 422 and "NUL" in body["error"]["message"]
    status, listing = await daemon.request("GET", "/api/v1/api-keys")
    assert status == 200 and all("\u0000" not in k["name"] for k in listing["items"])
    status, _ = await daemon.request("POST", "/api/v1/api-keys", {"name": "fine", "role": "read_only"})
    assert status == 201
    status, _ = await daemon.request("PUT", "/api/v1/devices/d1", {"name": "x\u0000y"})  # JSON docs keep it
    assert status in (200, 201)
    status, device = await daemon.request("GET", "/api/v1/devices/d1")
    assert status == 200 and device["name"] == "x\u0000y"

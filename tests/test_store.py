"""The store on both backends: group commit, isolation of a failing write, migrations, follow without gaps."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import dbutil
from iotd.events import EventLog
from iotd.store import events as evsql


@pytest_twisted.async_yield_fixture
async def store(tmp_path):
    s = dbutil.new_store(tmp_path / "s.sqlite3", reactor)
    await s.start()
    yield s
    await s.stop()


def _boom(conn):
    conn.execute("INSERT INTO meta (name, value) VALUES ('half', 'written')")
    raise ValueError("boom")


@pytest_twisted.ensureDeferred
async def test_concurrent_writes_share_transactions(store):
    commits = store.commits
    ds = [store.write(evsql.insert, [("t", "reading", "D", {"i": i})]) for i in range(300)]
    rows = await defer.gatherResults(ds)
    assert [r[0][5]["i"] for r in rows] == list(range(300))
    assert store.commits - commits < 300  # many writes rode on one commit


@pytest_twisted.ensureDeferred
async def test_a_failing_write_is_rolled_back_alone(store):
    good = store.write(evsql.insert, [("t", "reading", "D", {"ok": 1})])
    bad = store.write(_boom)
    good2 = store.write(evsql.insert, [("t", "reading", "D", {"ok": 2})])
    await good
    with pytest.raises(ValueError):
        await bad
    await good2
    rows = await store.read(evsql.read, "t", ["reading"], 0, 10)
    assert [r[5]["ok"] for r in rows] == [1, 2]
    assert [r[0] for r in rows] == [1, 2]  # the failed write left no hole in the ids
    assert await store.read(lambda c: c.execute("SELECT count(*) FROM meta WHERE name='half'").fetchone()[0]) == 0


def _duplicate_key(conn):
    conn.execute("INSERT INTO meta (name, value) VALUES ('dup', 'first')")
    conn.execute("INSERT INTO meta (name, value) VALUES ('dup', 'again')")  # the statement itself fails


@pytest_twisted.ensureDeferred
async def test_a_failing_statement_spoils_only_its_own_write(store):
    """On PostgreSQL a failed statement aborts the transaction: only its savepoint may be rolled back."""
    commits = store.commits
    ds = [store.write(evsql.insert, [("t", "reading", "D", {"n": 1})]), store.write(_duplicate_key),
          store.write(evsql.insert, [("t", "reading", "D", {"n": 2})])]
    results = await defer.DeferredList(ds, consumeErrors=True)
    assert [ok for ok, _ in results] == [True, False, True]
    assert "dup" in str(results[1][1].value).lower() or "unique" in str(results[1][1].value).lower()
    assert store.commits - commits == 1  # the three rode on one transaction
    rows = await store.read(evsql.read, "t", ["reading"], 0, 10)
    assert [(r[0], r[5]["n"]) for r in rows] == [(1, 1), (2, 2)]
    assert await store.read(lambda c: c.execute("SELECT count(*) FROM meta WHERE name = 'dup'").fetchone()[0]) == 0
    await store.write(_noop)  # the connection is fine afterwards
    assert store.health == "ok"


def _noop(conn):
    return None


@pytest_twisted.ensureDeferred
async def test_a_failing_write_taken_alone_leaves_nothing_and_the_next_write_commits(store):
    """A write the writer takes on its own runs without a savepoint: its failure must still undo it."""
    for fn in (_boom, _duplicate_key):
        with pytest.raises(Exception):
            await store.write(fn)  # awaited one at a time: each batch holds this write alone
    rows = await store.write(evsql.insert, [("t", "reading", "D", {"after": True})])
    assert rows[0][0] == 1  # no hole in the ids
    assert await store.read(lambda c: c.execute(
        "SELECT count(*) FROM meta WHERE name IN ('half', 'dup')").fetchone()[0]) == 0
    assert store.health == "ok"


@pytest_twisted.ensureDeferred
async def test_schema_version_recorded(store):
    versions = await store.read(lambda c: [r[0] for r in c.execute("SELECT version FROM schema_version ORDER BY 1")])
    assert versions == [1, 2, 3, 4, 5, 6, 7]  # every migration of iotd/store/schema/<dialect>/, once
    if store.dialect == "sqlite":
        mode = await store.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
        assert mode == "wal"


@pytest_twisted.ensureDeferred
async def test_inserted_at_strictly_increases(store):
    rows = []
    for _ in range(5):
        rows += await store.write(evsql.insert, [("t", "packet", "D", {}) for _ in range(100)])
    stamps = [r[4] for r in rows]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))


@pytest_twisted.ensureDeferred
async def test_follow_has_no_gap_and_no_duplicate_while_writing(store):
    log = EventLog(store)
    await log.append([("t", "reading", "D", {"n": n}) for n in range(200)])
    got = []
    follower = log.follow("t", ["reading"], 0, got.append, page=50)
    writers = [log.append([("t", "reading", "D", {"n": 200 + n})]) for n in range(200)]
    while True:
        page = await follower.replay_page()
        if not page:
            break
        got.extend(page)
    follower.go_live()
    await defer.gatherResults([defer.ensureDeferred(w) for w in writers])
    more = [log.append([("t", "reading", "D", {"n": 400 + n})]) for n in range(10)]
    await defer.gatherResults([defer.ensureDeferred(w) for w in more])
    follower.cancel()
    assert [e.data["n"] for e in got] == list(range(410))


@pytest_twisted.ensureDeferred
async def test_prune_removes_only_old_events(store):
    log = EventLog(store)
    old = await log.append([("t", "reading", "D", {"n": 1})])
    cutoff = old[0].inserted_us + 1
    new = await log.append([("t", "reading", "D", {"n": 2})])
    assert new[0].inserted_us >= cutoff
    assert await log.prune(cutoff) == 1
    left = await log.read("t", ["reading"], 0, 10)
    assert [e.data["n"] for e in left] == [2]


@pytest_twisted.ensureDeferred
async def test_a_dead_writer_fails_writes_instead_of_hanging(tmp_path):
    from iotd.store import StoreUnavailable

    s = dbutil.new_store(tmp_path / "dead.sqlite3", reactor)
    await s.start()

    def broken(work):  # the writer's own machinery fails (not a user function)
        raise MemoryError("simulated")

    s._run_batch = broken
    with pytest.raises(StoreUnavailable):
        await s.write(evsql.insert, [("t", "reading", "D", {})])
    with pytest.raises(StoreUnavailable):
        await s.write(evsql.insert, [("t", "reading", "D", {})])
    await s.stop()  # returns instead of waiting for the dead thread

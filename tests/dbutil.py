"""The store backend a test runs on: SQLite files in ``tmp_path`` or a PostgreSQL database of its own.

``conftest.py`` runs every test once per selected backend (ids ``[sqlite]``
and ``[postgresql]``; select with ``IOTD_TEST_BACKENDS=sqlite,postgresql``).
On PostgreSQL each SQLite path a test would have used (a daemon's
``data_dir``, a ``Store(path)``) gets a database of its own, created on first
use from a template migrated once per run (``CREATE DATABASE ... TEMPLATE``)
and dropped when the test (or the module fixture that made it) ends.  A copy
costs the server about a second (it syncs the new files), so a few threads
keep :data:`READY` copies made ahead and drop finished ones in the
background: a test waits for neither.  Names
hold the pid and a random part, so concurrent runs never collide; databases
left by a run that was killed are dropped by the next run.

Helpers for tests: :func:`target` (what a store opens for a path),
:func:`new_store`, :func:`connect` (a synchronous connection, ``?``
placeholders on both), :func:`store_ini` (the ``[store]`` lines of an ini).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import re
import secrets
from typing import Any, Iterator

from iotd.store import Store, open_sync

ALL = ("sqlite", "postgresql")
SELECTED = tuple(name.strip() for name in os.environ.get("IOTD_TEST_BACKENDS", ",".join(ALL)).split(",")
                 if name.strip())
for _name in SELECTED:
    if _name not in ALL:
        raise SystemExit(f"IOTD_TEST_BACKENDS: unknown backend {_name!r} (known: {', '.join(ALL)})")
# The server the PostgreSQL tests use (a database the tests may connect to for CREATE/DROP DATABASE).
ADMIN_URL = os.environ.get("IOTD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
_RUN = f"{os.getpid()}_{secrets.token_hex(3)}"
READY = 2  # databases copied ahead of the tests that will take them
_NAME = re.compile(r"^iotd_(?:t|tpl)_(\d+)_[0-9a-f]+")


class _State:
    backend: str = "sqlite"
    template: str | None = None
    counter = 0
    owners: list[list[str]] = [[]]  # databases to drop, by the scope that made them
    by_path: dict[str, str] = {}  # SQLite path -> its database in this test
    workers: concurrent.futures.ThreadPoolExecutor | None = None
    ahead: collections.deque = collections.deque()  # futures of (name) copies being made


def current() -> str:
    """The backend of the running test: ``"sqlite"`` or ``"postgresql"``."""
    return _State.backend


def _url(dbname: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def run_is_gone(pid: int) -> bool:
    """Whether the test run of process ``pid`` has ended (what it left may be removed)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False  # that run is still going


def _drop_leftovers() -> None:
    """Drop the databases of earlier runs whose process is gone (a run that was killed)."""
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'iotd\\_%'")]
        for name in names:
            match = _NAME.match(name)
            if match is None or not run_is_gone(int(match.group(1))):
                continue
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _template() -> str:
    if _State.template is None:
        _drop_leftovers()
        name = f"iotd_tpl_{_RUN}"
        _admin(f'CREATE DATABASE "{name}"')
        _State.template = name
        open_sync(_url(name)).close()  # migrated once; every test database is a copy
    return _State.template


def _copy(name: str, template: str) -> str:
    _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def _drop(name: str) -> None:
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _order_copy() -> None:
    _State.counter += 1
    name = f"iotd_t_{_RUN}_{_State.counter}"
    _State.ahead.append(_State.workers.submit(_copy, name, _template()))


def _new_database() -> str:
    if _State.workers is None:
        _State.workers = concurrent.futures.ThreadPoolExecutor(max_workers=3, thread_name_prefix="test-db")
    while len(_State.ahead) < READY + 1:
        _order_copy()
    name = _State.ahead.popleft().result()
    _State.owners[-1].append(name)
    return _url(name)


def target(sqlite_path: Any) -> str:
    """What a store opens on the current backend for a test's SQLite ``sqlite_path``."""
    path = os.path.abspath(str(sqlite_path))
    if _State.backend == "sqlite":
        return path
    if path not in _State.by_path:
        _State.by_path[path] = _new_database()
    return _State.by_path[path]


def fresh_target(sqlite_path: Any) -> str:
    """Like :func:`target`, but an empty database (not migrated) on PostgreSQL."""
    path = os.path.abspath(str(sqlite_path))
    if _State.backend == "sqlite":
        return path
    _State.counter += 1
    name = f"iotd_t_{_RUN}_{_State.counter}"
    _template()  # leftovers of killed runs are gone first
    _admin(f'CREATE DATABASE "{name}"')
    _State.owners[-1].append(name)
    _State.by_path[path] = _url(name)
    return _State.by_path[path]


def backend_pids(url: str) -> list[int]:
    """The server processes of every connection to ``url``'s database (to cut them in a test)."""
    import psycopg

    dbname = url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))]


def cut_connections(url: str) -> int:
    """End every connection to ``url``'s database, as a server restart would; how many there were."""
    import psycopg

    pids = backend_pids(url)
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


def store_url(sqlite_path: Any) -> str:
    """The ``[store] url`` value for a daemon whose SQLite file would be ``sqlite_path`` ('' = SQLite)."""
    return "" if _State.backend == "sqlite" else target(sqlite_path)


def store_ini(data_dir: Any) -> str:
    """The ``[store]`` section for an ini whose ``[iotd] data_dir`` is ``data_dir`` (may be empty)."""
    url = store_url(os.path.join(str(data_dir), "iotd.sqlite3"))
    return f"\n[store]\nurl = {url}\n" if url else ""


def cli_ini(config: Any) -> str:
    """An ini for ``iotd-admin`` on the same store as a daemon's ``config``."""
    return f"[iotd]\ndata_dir = {config.iotd.data_dir}\n" + (
        f"\n[store]\nurl = {config.store.url}\n" if config.store.url else "")


def new_store(sqlite_path: Any, reactor: Any, **kwargs: Any) -> Store:
    """A :class:`Store` on the current backend (not started) for a test's SQLite path."""
    return Store(target(sqlite_path), reactor, **kwargs)


def connect(where: Any) -> Any:
    """A synchronous connection to a store: a Config, a Store, or a path/URL it opened."""
    if isinstance(where, Store):
        where = where.path
    return open_sync(where)


def everything_stored(config: Any) -> bytes:
    """Every byte the store holds (SQLite: the file and its WAL; PostgreSQL: every row as text)."""
    if not config.store.url:
        path = config.database_path
        raw = open(path, "rb").read()
        if os.path.exists(path + "-wal"):
            raw += open(path + "-wal", "rb").read()
        return raw
    conn = connect(config)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
        out = []
        for table in tables:
            out += [repr(row) for row in conn.execute(f'SELECT * FROM "{table}"')]
        return "\n".join(out).encode()
    finally:
        conn.close()


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Databases made inside are dropped when it ends (a test; a backend's whole run)."""
    _State.owners.append([])
    saved = dict(_State.by_path)
    try:
        yield
    finally:
        names = _State.owners.pop()
        _State.by_path = saved
        for name in names:  # in the background: the next test need not wait
            if _State.workers is not None:
                _State.workers.submit(_drop, name)
            else:
                _drop(name)


@contextlib.contextmanager
def using(backend: str) -> Iterator[None]:
    """Run on ``backend`` inside; at the end drop what was made, the template too."""
    _State.backend = backend
    try:
        with scope():
            yield
    finally:
        if _State.workers is not None:  # copies nobody took, then wait for every drop
            while _State.ahead:
                _State.workers.submit(_drop, _State.ahead.popleft().result())
            _State.workers.shutdown(wait=True)
            _State.workers = None
        if backend == "postgresql" and _State.template is not None:
            _drop(_State.template)
            _State.template = None
        _State.backend = "sqlite"

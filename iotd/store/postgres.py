"""The PostgreSQL backend (psycopg 3, its sync API on the store's own threads).

:class:`PgConnection` is the thin layer that lets the store's SQL be written
once: ``conn.execute(sql, params)`` with ``?`` placeholders (turned into
``%s``; a literal ``%`` is doubled), results with ``fetchone``/``fetchall``/
``rowcount``, ``conn.dialect == "postgresql"``, ``conn.IntegrityError``; a
string holding U+0000 is refused on both backends (:mod:`iotd.store.textcheck`).
Connections run in autocommit mode, so ``BEGIN``/``COMMIT``/``SAVEPOINT``
are explicit, as on SQLite.

Reader connections are read-only and ``REPEATABLE READ``: a read that opens
``BEGIN`` sees one snapshot, as on SQLite.  The writer stays on ``READ
COMMITTED`` (``SELECT ... FOR UPDATE`` inside a write locks the rows it
returns until the group transaction commits).

Health: ``"ok"`` or ``"unreachable"``.  A write whose connection was lost
fails with :class:`~iotd.store.engine.StoreUnavailable` (503), as does every
write while PostgreSQL is unreachable; the periodic check reconnects (readers
and the writer) once the server answers again.  A reader that cannot
connect makes reads fail at once too (``fails_reads_fast``, see
:mod:`iotd.store.readers`) until that check reaches the server.

A dead server must not hold a store thread for long: every connection is
opened with a short ``connect_timeout`` (:data:`CONNECT_TIMEOUT`), TCP
keepalives and ``tcp_user_timeout`` (:data:`TCP_DEFAULTS`: a server that
vanished without closing the connection -- a host down, a cable pulled --
fails the statement waiting on it within about 20 s instead of the kernel's
15 minutes).  A key the URL sets itself wins.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from typing import Any, Iterable

from iotd.store import migrate
from iotd.store.textcheck import refuse_nul, refuse_nul_many

CONNECT_TIMEOUT = 3  # seconds, unless the URL says otherwise
TCP_DEFAULTS = {  # libpq keys, unless the URL says otherwise
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
    "tcp_user_timeout": 20_000,  # ms unacknowledged data may wait before the connection is dropped
}


def _psycopg():
    import psycopg  # imported when a PostgreSQL store is used: SQLite needs nothing beyond the package

    return psycopg


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """``?`` placeholders (outside quotes) to ``%s``; every literal ``%`` doubled."""
    out = []
    quote = ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


def redact(url: str) -> str:
    """``url`` with its password (in the user part or as ``password=``) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "postgresql://***"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, url: str) -> str:
    """An error text of the driver as one line, without the password of ``url``."""
    line = " ".join(str(text).split())
    try:
        parts = urllib.parse.urlsplit(url)
        secrets = [parts.password] if parts.password else []
        secrets += [v for k, v in urllib.parse.parse_qsl(parts.query) if k.lower() == "password" and v]
    except ValueError:
        secrets = []
    for secret in secrets:
        for form in {secret, urllib.parse.unquote(secret)}:
            line = line.replace(form, "***")
    return line


class PgConnection:
    """A psycopg connection that speaks the store's SQL (see the module docstring)."""

    dialect = "postgresql"

    def __init__(self, raw: Any):
        self.raw = raw
        self.IntegrityError = _psycopg().errors.IntegrityError

    def execute(self, sql: str, params: Iterable[Any] | None = None) -> Any:
        if params is None:
            return self.raw.execute(sql)
        params = tuple(params)
        refuse_nul(params)  # PostgreSQL text cannot hold U+0000: a 422 on both backends
        return self.raw.execute(translate(sql), params)

    def executemany(self, sql: str, seq: Iterable[Iterable[Any]]) -> Any:
        cur = self.raw.cursor()
        cur.executemany(translate(sql), refuse_nul_many(seq))
        return cur

    @property
    def in_transaction(self) -> bool:
        status = self.raw.info.transaction_status
        tx = _psycopg().pq.TransactionStatus
        return status in (tx.INTRANS, tx.INERROR, tx.ACTIVE)

    @property
    def closed(self) -> bool:
        return self.raw.closed or self.raw.broken

    def close(self) -> None:
        self.raw.close()


def connect(url: str, reader: bool = False) -> PgConnection:
    psycopg = _psycopg()
    kwargs: dict[str, Any] = {"autocommit": True}
    given = _url_keys(url)
    for key, value in {"connect_timeout": CONNECT_TIMEOUT, **TCP_DEFAULTS}.items():
        if key not in given:
            kwargs[key] = value
    raw = psycopg.connect(url, **kwargs)
    conn = PgConnection(raw)
    if reader:
        conn.execute("SET default_transaction_isolation = 'repeatable read'")
        conn.execute("SET default_transaction_read_only = on")
    return conn


def _url_keys(url: str) -> set[str]:
    """The libpq keys ``url`` sets (none when it cannot be parsed: psycopg then says why)."""
    try:
        return set(_psycopg().conninfo.conninfo_to_dict(url))
    except _psycopg().ProgrammingError:
        return set()


def open_sync(url: str) -> PgConnection:
    """A connection to a migrated database, for synchronous use (the CLI, tests)."""
    conn = connect(url)
    try:
        migrate.migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


class PostgresBackend:
    """What :class:`iotd.store.engine.Store` needs to know of PostgreSQL."""

    dialect = "postgresql"
    states = ("ok", "unreachable")
    sticky = ()
    fails_reads_fast = True  # see iotd.store.readers
    refused = {"unreachable": "the store (PostgreSQL) is unreachable"}
    begin_sql = "BEGIN"
    messages = {
        "unreachable": "store {where}: PostgreSQL is unreachable; writes answer 503 until it is back",
        "ok": "store {where}: PostgreSQL is reachable again; writes are accepted again",
    }

    def __init__(self, url: str):
        self.url = url
        self.where = redact(url)
        psycopg = _psycopg()
        self.read_errors = (psycopg.OperationalError, psycopg.InterfaceError)

    def open_writer(self) -> PgConnection:
        return open_sync(self.url)

    def open_reader(self) -> PgConnection:
        return connect(self.url, reader=True)

    def _connection_error(self, error: BaseException) -> bool:
        psycopg = _psycopg()
        return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) and not isinstance(
            error, psycopg.errors.QueryCanceled)

    def state_of(self, error: BaseException) -> str | None:
        """``None`` for an error of the statement; ``"unreachable"`` when the server went away."""
        if self._connection_error(error):
            return "unreachable"
        psycopg = _psycopg()
        if isinstance(error, (psycopg.errors.DiskFull, psycopg.errors.OutOfMemory,
                              psycopg.errors.TooManyConnections)):
            return ""
        return None

    def batch_error_state(self, error: BaseException) -> str:
        return "unreachable" if self._connection_error(error) else ""

    def lost(self, conn: PgConnection) -> bool:
        return conn.closed or not conn.in_transaction

    def broken(self, conn: PgConnection) -> bool:
        return conn.closed

    def before_commit(self) -> str | None:
        return None

    def inspect(self, conn: PgConnection | None) -> str:
        """``"ok"`` when the reader connection answers (a reader thread)."""
        if conn is None:
            return "unreachable"
        conn.execute("SELECT 1").fetchone()
        return "ok"

    @staticmethod
    def probe(conn: PgConnection) -> None:
        conn.execute("SELECT 1").fetchone()

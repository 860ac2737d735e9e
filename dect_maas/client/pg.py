"""The PostgreSQL backend of the ledger and the response cache (psycopg 3 + psycopg_pool).

Chosen by a ``postgresql://`` URL (see ``storage.py`` for the URL rules). The tables live in one
PostgreSQL schema (``dect_maas`` unless the URL says ``?schema=...``), created and versioned by the
library under an advisory lock, so processes opening a new database together create it once.

Semantics match the SQLite ledger statement for statement: the ledger's SQL is shared, and every
write transaction first takes a transaction-scoped advisory lock on the schema's ledger, which
serialises writers the way SQLite's ``BEGIN IMMEDIATE`` does, across every machine that reaches
the server. A reservation is therefore checked against the totals of all machines. Reads run as
``REPEATABLE READ READ ONLY`` snapshots. Commits are durable before they return (PostgreSQL's
default ``synchronous_commit = on``; a server configured otherwise weakens the write-ahead rule).

Each process holds a small connection pool (opened again after a fork). Errors leave as one
``LedgerError`` or ``CacheError`` line naming the database as it may be shown: unreachable,
read-only, full, no permission.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from hashlib import sha256
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import ConnectionPool, PoolTimeout

from dect_maas._exceptions import CacheError, ConfigError, DectError, LedgerError

from .ledger import _pid_start, _same_process_alive
from .storage import DatabaseUrl, SqlCursor, connect_kwargs, parse_database_url

__all__ = ["Claimant", "PgCacheStore", "PgLedgerStore"]

#: A claim on an example in flight is taken over after this long even if its holder looks alive
#: (a process on another host cannot be checked): a request to a busy model server may take
#: minutes, a claim held longer is most likely a machine that died.
CLAIM_TTL_S = 600.0

CONNECT_TIMEOUT_S = 10
POOL_MAX = 4
# A pool that cannot hand out a connection within this many seconds reports the database down.
POOL_TIMEOUT_S = 30.0
_GET_CHUNK = 2000
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
_ABANDONED: list[Any] = []  # pools inherited through fork: never closed by the child

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id TEXT NOT NULL,
    reservation_id TEXT,
    time TEXT NOT NULL,
    run_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    cache TEXT NOT NULL,
    status TEXT NOT NULL,
    queries BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    attempts BIGINT NOT NULL,
    latency_s DOUBLE PRECISION NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS records_reservation_id ON records (reservation_id);
CREATE INDEX IF NOT EXISTS records_run_id ON records (run_id);
CREATE TABLE IF NOT EXISTS spent (
    run_id TEXT PRIMARY KEY,
    queries BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cost_pico BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    queries BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cost_pico BIGINT NOT NULL,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    pid_start TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0
);
"""
CACHE_DDL = """
CREATE TABLE IF NOT EXISTS cache_meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS cache_entries (
    key TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL,
    stored TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS cache_claims (
    key TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    pid_start TEXT NOT NULL,
    claimed DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_claims_owner ON cache_claims (owner);
"""


@functools.lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    """The ledger's ``?`` placeholders as psycopg's ``%s`` (its SQL holds no other ? or %)."""
    return sql.replace("?", "%s")


class _PgConnection:
    """A psycopg connection that takes the ledger's ``?`` SQL."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> SqlCursor:
        return self._conn.execute(_pg_sql(sql), params)


class _Database:
    """One process's pool for one URL, with errors turned into one line naming the store."""

    def __init__(self, url: DatabaseUrl, error: type[DectError], store: str) -> None:
        self.url = url
        self.location = url.display
        self._error = error
        self._store = store
        self._kwargs = {**connect_kwargs(url, os.environ), "autocommit": True}
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        self._pid = -1

    def pool(self) -> ConnectionPool[Any]:
        if self._pool is None or self._pid != os.getpid():
            with self._lock:
                if self._pool is not None and self._pid != os.getpid():
                    _ABANDONED.append(self._pool)  # the parent's: closing it here would end it
                    self._pool = None
                if self._pool is None:
                    self._pool = ConnectionPool(
                        self.url.conninfo,
                        kwargs={**self._kwargs, "connect_timeout": CONNECT_TIMEOUT_S},
                        min_size=1,
                        max_size=POOL_MAX,
                        timeout=POOL_TIMEOUT_S,
                        open=True,
                        name=f"dect-maas {self._store}",
                    )
                    self._pid = os.getpid()
        return self._pool

    def check_reachable(self) -> None:
        """Connect once, directly, so that a wrong URL or a stopped server fails at once."""
        with self.errors():
            psycopg.connect(
                self.url.conninfo, **self._kwargs, connect_timeout=CONNECT_TIMEOUT_S
            ).close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self.errors(), self.pool().connection() as conn:
            yield conn

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            raise self.error(exc) from exc

    def error(self, exc: BaseException) -> DectError:
        text = " ".join(str(exc).split()) or type(exc).__name__
        where = f"the {self._store} database {self.location}"
        if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
            what = f"cannot write {where}: it is read-only ({text})"
        elif isinstance(exc, (pgerrors.DiskFull, pgerrors.OutOfMemory)):
            what = f"cannot write {where}: the database server's disk is full ({text})"
        elif isinstance(exc, pgerrors.InsufficientPrivilege):
            what = f"{where}: the database role lacks a privilege ({text})"
        elif isinstance(exc, PoolTimeout) or (
            isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None
        ):
            what = f"cannot reach {where} ({text}); is the server running and the URL right?"
        else:
            what = f"{where}: {type(exc).__name__}: {text}"
        if self._error is LedgerError and "cannot write" in what:
            what += "; nothing sent"
        return self._error(what)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None

    def create_schema(self, ddl: str, meta: str, lock: str) -> None:
        """Create the schema and tables unless they exist, under a lock every opener takes."""
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock,))
            found = conn.execute(
                "SELECT to_regclass(%s)", (f"{self.url.schema}.{meta}",)
            ).fetchone()
            if found is None or found[0] is None:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.url.schema}"')
                for statement in ddl.split(";"):
                    if statement.strip():
                        conn.execute(statement)


class PgLedgerStore:
    """The ledger's tables in PostgreSQL; see the module docstring."""

    def __init__(self, url: str, schema_version: int) -> None:
        self.url = parse_database_url(url, "the ledger URL")
        self._db = _Database(self.url, LedgerError, "ledger")
        self.location = self._db.location
        self._version = schema_version
        self._lock_name = f"dect_maas.ledger:{self.url.schema}"
        key = int.from_bytes(sha256(self._lock_name.encode()).digest()[:8], "big", signed=True)
        self._begin_write = f"BEGIN; SELECT pg_advisory_xact_lock({key})"
        self._begin_write_async = (
            f"BEGIN; SET LOCAL synchronous_commit = off; SELECT pg_advisory_xact_lock({key})"
        )

    def prepare(self) -> None:
        self._db.check_reachable()
        self._db.create_schema(LEDGER_DDL, "meta", self._lock_name)
        with self.transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(self._version),)
                )
            elif row[0] != str(self._version):
                raise ConfigError(
                    f"the ledger at {self.location} has schema version {row[0]}, this dect-maas "
                    f"uses {self._version}; use a newer dect-maas, or another schema "
                    "(?schema=...) for a new ledger (keep the old one: it is the record of what "
                    "was paid)"
                )

    @contextmanager
    def transaction(self, write: bool = True, durable: bool = True) -> Iterator[_PgConnection]:
        # BEGIN and the lock travel as one message: each round trip to the server counts.
        # Not durable: synchronous_commit off for this transaction only; the next durable
        # commit (a mark_sent) flushes the WAL up to and including it.
        if not write:
            begin = _BEGIN_READ
        else:
            begin = self._begin_write if durable else self._begin_write_async
        with self._db.connection() as conn, self._db.errors():
            conn.execute(begin)
            try:
                yield _PgConnection(conn)
            except BaseException:
                with suppress(psycopg.Error):  # a broken connection has no transaction left
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class Claimant:
    """Who holds a claim: one cache in one process (host, pid and its start time, as the
    ledger's reservations keep them)."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = _pid_start(self.pid)

    def row(self) -> tuple[str, str, int, str, float]:
        return (self.id, self.host, self.pid, self.pid_start, time.time())

    def live(self, host: str, pid: int, pid_start: str, claimed: float) -> bool:
        if time.time() - claimed > CLAIM_TTL_S:
            return False
        return host != self.host or _same_process_alive(pid, pid_start)


class PgCacheStore:
    """Response-cache entries in PostgreSQL: one row per example, never evicted."""

    def __init__(self, url: str) -> None:
        self.url = parse_database_url(url, "the cache URL")
        self._db = _Database(self.url, CacheError, "response cache")
        self.location = self._db.location
        self._db.check_reachable()
        try:
            self._db.create_schema(CACHE_DDL, "cache_claims", f"dect_maas.cache:{self.url.schema}")
        except BaseException:
            self._db.close()
            raise

    def stamp(self, value: bytes) -> bytes | None:
        with self._db.connection() as conn, conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))",
                (f"dect_maas.cache:{self.url.schema}",),
            )
            row = conn.execute("SELECT value FROM cache_meta WHERE key = 'schema'").fetchone()
            if row is not None:
                return bytes(row[0])
            if conn.execute("SELECT 1 FROM cache_entries LIMIT 1").fetchone() is not None:
                return None  # entries without a stamp: not ours
            conn.execute("INSERT INTO cache_meta (key, value) VALUES ('schema', %s)", (value,))
            return value

    def get(self, key: str) -> bytes | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        with self._db.connection() as conn:
            cur = conn.cursor(binary=True)
            for start in range(0, len(keys), _GET_CHUNK):
                cur.execute(
                    "SELECT key, value FROM cache_entries WHERE key = ANY(%s)",
                    (keys[start : start + _GET_CHUNK],),
                )
                out.update(cur.fetchall())
        return out

    def claim(
        self, keys: list[str], owner: Claimant, take_over: bool = False
    ) -> tuple[dict[str, bytes], list[str]]:
        """In one transaction: the stored values of ``keys``; a claim for ``owner`` on each
        missing key that no live process holds (or on all of them, ``take_over``); and the
        keys another live process holds, whose answers are on their way."""
        with self._db.connection() as conn, conn.transaction():
            cur = conn.cursor(binary=True)  # bytea as bytes, not hex text
            found: dict[str, bytes] = {}
            for start in range(0, len(keys), _GET_CHUNK):
                cur.execute(
                    "SELECT key, value FROM cache_entries WHERE key = ANY(%s)",
                    (keys[start : start + _GET_CHUNK],),
                )
                found.update(cur.fetchall())
            missing = [k for k in keys if k not in found]
            if not missing:
                return found, []
            conn.execute(
                "INSERT INTO cache_claims (key, owner, host, pid, pid_start, claimed) "
                "SELECT k, %s, %s, %s, %s, %s FROM unnest(%s::text[]) AS k "
                "ON CONFLICT (key) DO NOTHING",
                (*owner.row(), missing),
            )
            held = conn.execute(
                "SELECT key, owner, host, pid, pid_start, claimed FROM cache_claims "
                "WHERE key = ANY(%s) AND owner <> %s",
                (missing, owner.id),
            ).fetchall()
            stale = [r[0] for r in held if take_over or not owner.live(*r[2:])]
            if stale:
                conn.execute(
                    "UPDATE cache_claims SET owner = %s, host = %s, pid = %s, pid_start = %s, "
                    "claimed = %s WHERE key = ANY(%s)",
                    (*owner.row(), stale),
                )
            return found, sorted({r[0] for r in held} - set(stale))

    def release_claims(self, owner: Claimant) -> None:
        with self._db.connection() as conn:
            conn.execute("DELETE FROM cache_claims WHERE owner = %s", (owner.id,))

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        with self._db.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("DELETE FROM cache_claims WHERE key = ANY(%s)", ([k for k, _ in items],))
            # durable before it returns (default synchronous_commit): the ledger may live on
            # another server, so its commits cannot be relied on to flush this one
            cur.executemany(
                "INSERT INTO cache_entries (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, stored = now()",
                items,
            )

    def contains(self, key: str) -> bool:
        with self._db.connection() as conn:
            row = conn.execute("SELECT 1 FROM cache_entries WHERE key = %s", (key,)).fetchone()
        return row is not None

    def count(self) -> int:
        with self._db.connection() as conn:
            row = conn.execute("SELECT count(*) FROM cache_entries").fetchone()
        return int(row[0]) if row else 0

    def keys(self) -> Iterator[str]:
        with self._db.connection() as conn:
            rows = conn.execute("SELECT key FROM cache_entries ORDER BY key").fetchall()
        return iter([r[0] for r in rows])

    def close(self) -> None:
        self._db.close()

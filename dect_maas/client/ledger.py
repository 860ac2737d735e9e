"""The ledger: every request on record, and the budget enforced before a request leaves.

One SQLite file (``ledger.sqlite3``) per ledger folder, in WAL mode. Each operation is one short
``BEGIN IMMEDIATE`` transaction, so reserving is atomic across threads, asyncio tasks (through
threads) and processes that share the folder:

- ``reserve`` checks ``spent + reserved + asked`` against every limit and inserts a reservation,
  or raises ``BudgetExceeded`` and changes nothing;
- ``settle`` deletes the reservation, adds the actual usage to the spent totals, appends a record;
- ``refund`` deletes the reservation and appends a record of the failed request; only what the
  provider billed for it (the record's tokens and cost, normally zero) counts as spent.

Budgets are per folder (all runs, all processes); totals are also kept per run. Money is summed in
integer pico-dollars, so totals are exact. The SQLite engine is used directly rather than through
diskcache (which is also SQLite with ``BEGIN IMMEDIATE`` inside ``transact``): a ledger is rows to
append, sum and export, which a key-value store makes awkward.

Write ahead. ``mark_sent`` records, in its own short transaction, that a reservation's request
is about to leave; the client calls it before the first byte is sent. A reservation whose
process died is *stale*. Reservations carry the host name, the pid and the pid's start time;
opening a ledger, a reservation about to be refused, and ``release_stale()`` close those of dead
processes on this host: one never marked sent never left and is released (record ``abandoned``,
nothing spent); one marked sent may have been answered and billed, so it is settled at its
reserved worst case (record ``unknown``). Spend is therefore never smaller than what providers
answered, whatever happens to the client. Reservations of other hosts are closed only with
``release_stale(older_than_s=...)``.

Durability: WAL with ``synchronous=NORMAL`` survives the process being killed (``kill -9``) at
any point; a power loss may lose the last transactions (SQLite's documented trade-off).

Storage faults (disk full, a damaged file) raise ``LedgerError`` naming the file, and roll the
transaction back. A ledger file that exists but is empty or damaged is refused, never silently
replaced: ``reset_ledger`` (``dect-maas ledger reset``) moves it aside and starts a new one. New
ledger files are built under a temporary name and linked into place, so an empty file is never
a ledger another process is still creating.

Each ``Ledger`` checks the totals against the limits it was opened with: give every process that
shares a folder the same limits.
"""

from __future__ import annotations

import copy
import csv
import errno
import json
import logging
import math
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from dect_maas._exceptions import BudgetExceeded, ConfigError, LedgerError
from dect_maas._secrets import redact

from .budget import BudgetLimits, Usage, check_limits
from .storage import POSTGRES_INSTALL_HINT, LedgerStore, SqlConnection, is_database_url

__all__ = [
    "LEDGER_FILENAME",
    "STATUSES",
    "Balance",
    "BudgetLimits",
    "Ledger",
    "LedgerRecord",
    "LedgerSummary",
    "Reservation",
    "Usage",
    "reset_ledger",
]

logger = logging.getLogger("dect_maas")

LEDGER_FILENAME = "ledger.sqlite3"
LEDGER_SCHEMA_VERSION = 2  # 2: reservations.sent (write ahead)
STATUSES = ("ok", "error", "refunded", "cancelled", "abandoned", "unknown", "lost")
"""Record outcomes: ``ok`` (settled), ``error`` (failed after its attempts), ``refunded``
(released without an answer), ``cancelled`` (the caller gave up before it was sent),
``abandoned`` (its process died before sending it: nothing spent), ``unknown`` (sent, then its
process died or gave up waiting: counted at its reserved worst case), ``lost`` (answered and
paid for, but the answer could not be stored: counted as spent)."""

CacheState = Literal["hit", "miss"]
_MAX_ERROR_CHARS = 300
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    reservation_id TEXT,
    time TEXT NOT NULL,
    run_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    cache TEXT NOT NULL,
    status TEXT NOT NULL,
    queries INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    attempts INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS spent (
    run_id TEXT PRIMARY KEY,
    queries INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cost_pico INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    queries INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cost_pico INTEGER NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    created REAL NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""
_RECORD_COLUMNS = (
    "time",
    "run_id",
    "request_id",
    "provider",
    "model",
    "endpoint",
    "cache",
    "status",
    "queries",
    "input_tokens",
    "cost_usd",
    "attempts",
    "latency_s",
    "error",
)
_NO_LIMITS = BudgetLimits()
_SUMS = "COALESCE(SUM(queries), 0), COALESCE(SUM(requests), 0), "
_SUMS += "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cost_pico), 0)"
_TOTALS = f"SELECT * FROM (SELECT {_SUMS} FROM spent) s, (SELECT {_SUMS} FROM reservations) r"


@dataclass(frozen=True, kw_only=True)
class LedgerRecord:
    """One request (or one batch of cache hits) as the ledger keeps it.

    ``time`` is ISO 8601 in UTC and ``run_id`` the ledger's run when left empty. On ``settle`` the
    usage fields are taken from the actual usage; on ``refund`` ``input_tokens`` and ``cost_usd``
    mean what the provider billed for the failed request (normally 0). ``endpoint`` and ``error``
    go through :func:`~dect_maas._secrets.redact` (URL user info and query values, credential-named
    pairs, bearer tokens masked), so a key passed in a URL or quoted back is never kept.
    """

    provider: str
    model: str
    endpoint: str
    queries: int = 0
    input_tokens: int = 0
    cost_usd: float = 0.0
    cache: CacheState = "miss"
    attempts: int = 1
    status: str = "ok"
    latency_s: float = 0.0
    error: str | None = None
    time: str = ""
    run_id: str = ""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        for name in ("provider", "model", "endpoint", "time", "run_id", "request_id"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"LedgerRecord.{name} must be a str")
        if self.cache not in ("hit", "miss"):
            raise ConfigError(f"LedgerRecord.cache must be 'hit' or 'miss', got {self.cache!r}")
        if self.status not in STATUSES:
            raise ConfigError(f"LedgerRecord.status must be one of {STATUSES}, got {self.status!r}")
        for name in ("queries", "input_tokens", "attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"LedgerRecord.{name} must be a non-negative int, got {value!r}")
        for name in ("cost_usd", "latency_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"LedgerRecord.{name} must be a non-negative number")
            object.__setattr__(self, name, float(value))
        if self.time:
            object.__setattr__(self, "time", _normalise_time(self.time))
        object.__setattr__(self, "endpoint", redact(self.endpoint))
        if self.error is not None:
            text = redact(str(self.error))
            if len(text) > _MAX_ERROR_CHARS:
                text = text[: _MAX_ERROR_CHARS - 3] + "..."
            object.__setattr__(self, "error", text)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON types, in export column order."""
        return {name: getattr(self, name) for name in _RECORD_COLUMNS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerRecord:
        """Build a record from ``to_dict`` output or from a CSV row (all strings)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in ("queries", "input_tokens", "attempts"):
                value = int(value)
            elif f.name in ("cost_usd", "latency_s"):
                value = float(value)
            elif f.name == "error":
                value = None if value in (None, "") else str(value)
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class Reservation:
    """Usage reserved by ``Ledger.reserve``; hand it back to ``settle`` or ``refund``."""

    id: str
    usage: Usage
    run_id: str


@dataclass(frozen=True)
class Balance:
    """Spent and reserved totals read in one snapshot."""

    spent: Usage
    reserved: Usage

    @property
    def committed(self) -> Usage:
        return self.spent + self.reserved


@dataclass(frozen=True)
class LedgerSummary:
    """What one run (or, with ``run_id`` None, the whole folder) asked of its providers.

    ``requests`` counts requests sent (cache misses, whatever their outcome), ``queries_paid``
    the examples answered by settled requests, ``queries_unknown`` those of requests sent whose
    outcome is unknown or whose answer was lost (counted at their worst case, never as zero),
    ``cache_hits`` the examples answered from the cache. Latency percentiles are over requests
    sent; ``wall_s`` spans first to last record.
    """

    run_id: str | None
    requests: int
    queries_paid: int
    cache_hits: int
    input_tokens: int
    cost_usd: float
    attempts: int
    errors: int
    queries_unknown: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    first_time: str | None
    last_time: str | None
    wall_s: float

    @property
    def hit_rate(self) -> float:
        total = self.queries_paid + self.cache_hits
        return self.cache_hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hit_rate"] = self.hit_rate
        return data


class Ledger:
    """The persistent record of requests and the budget they are reserved against.

    Open one ``Ledger`` per process (it reconnects by itself after a fork); any number of
    processes may share the folder. Threads may share one instance.
    """

    def __init__(
        self,
        directory: Path | str,
        limits: BudgetLimits = BudgetLimits(),  # noqa: B008 - frozen, so sharing is safe
        *,
        run_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(limits, BudgetLimits):
            raise ConfigError(f"limits must be a BudgetLimits, got {type(limits).__name__}")
        self.limits = limits
        self._clock = clock
        self.run_id = _check_run_id(run_id) if run_id is not None else self._new_run_id()
        self._host = socket.gethostname()
        self._lock = threading.RLock()
        self._pid = -1
        self._pid_start = ""
        self.directory: Path | None = None
        self.path: Path | None = None
        self._store: LedgerStore
        if is_database_url(directory):
            self._store = _postgres_store(str(directory))
        else:
            self.directory = Path(os.path.expanduser(directory))
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(
                    f"cannot create the ledger folder {self.directory}: {exc}"
                ) from exc
            self.path = self.directory / LEDGER_FILENAME
            self._store = SqliteLedgerStore(self.path)
        self.location = self._store.location
        """The ledger file, or its database URL as it may be shown (never with a password)."""
        try:
            self._store.prepare()
            self.release_stale()
        except BaseException:
            self._store.close()
            raise

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, write: bool = True, durable: bool = True) -> Iterator[SqlConnection]:
        """``durable=False``: the commit may reach the server's disk a moment later (a store
        whose commits are each flushed on their own may batch it). Only ``mark_sent`` must be on
        disk before it returns: a store's log is written in order, so flushing it flushes every
        commit before it, and a commit lost with the server at most brings a reservation back,
        which then counts at its worst case. Never an undercount."""
        if self._pid != os.getpid():
            if self._pid != -1:
                self._lock = threading.RLock()  # forked: a copied lock may be held by a lost thread
            self._pid, self._pid_start = os.getpid(), _pid_start(os.getpid())
        with self._lock, self._store.transaction(write, durable) as conn:
            yield conn

    def close(self) -> None:
        with self._lock:
            self._store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"directory={str(self.directory)!r}" if self.directory else f"url={self.location!r}"
        return f"Ledger({where}, run_id={self.run_id!r}, {self.limits!r})"

    # -- budget ----------------------------------------------------------------------------

    def reserve(
        self, usage: Usage, *, provider: str = "", model: str = "", endpoint: str = ""
    ) -> Reservation:
        """Reserve ``usage`` (a request's worst case) before sending, or raise BudgetExceeded.

        Atomic across threads and processes sharing the folder: either the reservation fits
        every limit together with everything spent and reserved, or nothing is reserved.
        ``provider``/``model``/``endpoint`` are kept only to describe the request if its
        process dies before settling.
        """
        outcome = self.try_reserve(usage, provider=provider, model=model, endpoint=endpoint)
        if isinstance(outcome, BudgetExceeded):
            raise outcome
        return outcome

    def try_reserve(
        self, usage: Usage, *, provider: str = "", model: str = "", endpoint: str = ""
    ) -> Reservation | BudgetExceeded:
        """``reserve``, with the refusal returned instead of raised: for a caller that reserves
        ahead and asks again later (a refusal beside requests still in flight may not last)."""
        usage.validate("reserved usage")
        with self._transaction(durable=False) as conn:
            return self._reserve_in(conn, usage, provider, model, endpoint)

    def _reserve_in(
        self, conn: SqlConnection, usage: Usage, provider: str, model: str, endpoint: str
    ) -> Reservation | BudgetExceeded:
        """Reserve inside an open transaction; the refusal is returned, nothing reserved."""
        asked = usage.as_ints()
        try:
            if self.limits != _NO_LIMITS:  # no limit: nothing to check, no totals to sum
                check_limits(self.limits, *_totals(conn), asked)
        except BudgetExceeded as exc:
            # Before refusing, free what dead processes on this host still hold.
            if not (exc.reserved and self._release_stale_in(conn, None)):
                return exc
            try:
                check_limits(self.limits, *_totals(conn), asked)
            except BudgetExceeded as again:
                return again
        reservation = Reservation(id=uuid.uuid4().hex, usage=usage, run_id=self.run_id)
        conn.execute(
            "INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (
                reservation.id,
                self.run_id,
                *asked,
                self._host,
                os.getpid(),
                self._pid_start,
                self._clock(),
                provider,
                model,
                redact(endpoint),
            ),
        )
        return reservation

    def settle(self, reservation: Reservation, actual: Usage, record: LedgerRecord) -> None:
        """Replace the reservation by the actual usage and append ``record`` (a cache miss).

        The record's queries, input tokens and cost are taken from ``actual``. Actual usage
        above the reservation is recorded as it is (it was spent) and logged as a warning.
        """
        actual.validate("actual usage")
        if record.cache != "miss":
            raise ConfigError("settle records a request sent to the provider: cache must be 'miss'")
        record = self._complete(
            record,
            reservation.run_id,
            queries=actual.queries,
            input_tokens=actual.input_tokens,
            cost_usd=actual.cost_usd,
        )
        with self._transaction(durable=False) as conn:
            self._close_in(conn, reservation, actual, record)
        over = [
            name
            for name, a, r in zip(
                ("queries", "requests", "input_tokens", "cost_usd"),
                actual.as_ints(),
                reservation.usage.as_ints(),
                strict=True,
            )
            if a > r
        ]
        if over:
            logger.warning(
                "request %s used more than it reserved (%s); recorded as spent",
                record.request_id,
                ", ".join(over),
            )

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation whose request was never sent: no record, nothing spent.

        For a client that reserved for a request and then stopped before sending it (another
        request failed, or it was cancelled). A request that left must be settled or refunded
        instead. Releasing twice, or after a release as stale, does nothing.
        """
        with self._transaction(durable=False) as conn:
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))

    def mark_sent(self, reservation: Reservation) -> None:
        """Record, durably and before it leaves, that the reservation's request is being sent.

        From here on a crash cannot make the request look unpaid: if its process dies before
        settling or refunding, ``release_stale`` settles it at its reserved worst case (record
        ``unknown``). A storage fault raises ``LedgerError``: then do not send.
        """
        with self._transaction() as conn:
            marked = conn.execute(
                "UPDATE reservations SET sent = 1 WHERE id = ?", (reservation.id,)
            ).rowcount
        if marked != 1:
            raise ConfigError(
                f"reservation {reservation.id} is not open in the ledger at {self.location}: "
                "it was closed already or released as stale"
            )

    def refund(self, reservation: Reservation, record: LedgerRecord) -> None:
        """Release the reservation of a request that did not succeed, and record it.

        Only the record's ``input_tokens`` and ``cost_usd`` (what the provider billed for the
        failed request, normally 0) count as spent; its queries and the request do not.
        """
        if record.status == "ok":
            raise ConfigError("a refunded request's record needs a status other than 'ok'")
        if record.cache != "miss":
            raise ConfigError("refund records a request sent to the provider: cache must be 'miss'")
        billed = Usage(input_tokens=record.input_tokens, cost_usd=record.cost_usd)
        self._close_reservation(reservation, billed, record)

    def _close_reservation(
        self, reservation: Reservation, spent: Usage, record: LedgerRecord
    ) -> None:
        if not record.time or not record.run_id:
            record = self._complete(record, reservation.run_id)
        with self._transaction(durable=False) as conn:
            self._close_in(conn, reservation, spent, record)

    def _close_in(
        self, conn: SqlConnection, reservation: Reservation, spent: Usage, record: LedgerRecord
    ) -> None:
        """Inside an open transaction: the reservation goes, ``spent`` and ``record`` stay."""
        deleted = conn.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))
        if deleted.rowcount != 1:
            # Rare path (a scan): closed before, released as stale, or from another folder.
            statuses = {
                row[0]
                for row in conn.execute(
                    "SELECT status FROM records WHERE reservation_id = ?", (reservation.id,)
                )
            }
            if not statuses:
                raise ConfigError(
                    f"reservation {reservation.id} is not in the ledger at {self.location}"
                )
            if statuses == {"unknown"}:
                # settled at its worst case already: count only what the actual usage exceeds
                spent = _excess(spent, reservation.usage)
            elif statuses != {"abandoned"}:
                raise ConfigError(f"reservation {reservation.id} was already settled or refunded")
            logger.warning(
                "reservation %s was released as stale before it closed; recording it now",
                reservation.id,
            )
        _add_spent(conn, reservation.run_id, spent)
        _insert_record(conn, record, reservation.id)

    def record_hits(self, n: int, *, provider: str, model: str, endpoint: str) -> None:
        """Count ``n`` examples answered from the cache: one record, zero cost, no budget use."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"record_hits needs a non-negative int, got {n!r}")
        if n == 0:
            return
        record = LedgerRecord(
            provider=provider,
            model=model,
            endpoint=endpoint,
            queries=n,
            cache="hit",
            attempts=0,
        )
        record = self._complete(record, self.run_id)
        with self._transaction(durable=False) as conn:
            _insert_record(conn, record, None)

    def release_stale(self, *, older_than_s: float | None = None) -> int:
        """Release reservations whose process is gone; return how many were released.

        Without arguments: reservations made on this host by a process that no longer runs (its
        pid is gone, or now belongs to a process started later). With ``older_than_s``: also
        every reservation older than that, from any host, live or not - use it only when you
        know those processes have stopped. A reservation never marked sent is released (record
        ``abandoned``, nothing spent); one marked sent may have been answered and billed, so it
        is settled at its reserved worst case (record ``unknown``).
        """
        with self._transaction() as conn:
            released = self._release_stale_in(conn, older_than_s)
        return released

    def _release_stale_in(self, conn: SqlConnection, older_than_s: float | None) -> int:
        now = self._clock()
        rows = conn.execute(
            "SELECT id, run_id, host, pid, pid_start, created, provider, model, endpoint, "
            "queries, requests, input_tokens, cost_pico, sent FROM reservations"
        ).fetchall()
        released = 0
        for row in rows:
            rid, run_id, host, pid, pid_start, created, provider, model, endpoint = row[:9]
            worst = Usage.from_ints(_ints(row[9:13]))
            sent = bool(row[13])
            dead_here = host == self._host and not _same_process_alive(pid, pid_start)
            too_old = older_than_s is not None and now - created > older_than_s
            if not (dead_here or too_old):
                continue
            why = f"process {pid} on {host} " + (
                "ended" if dead_here else f"held it for {now - created:.0f} s"
            )
            if sent:
                record = LedgerRecord(
                    provider=provider,
                    model=model,
                    endpoint=endpoint,
                    queries=worst.queries,
                    input_tokens=worst.input_tokens,
                    cost_usd=worst.cost_usd,
                    attempts=1,
                    status="unknown",
                    error=f"sent, then {why} before its outcome was recorded; counted at its "
                    "reserved worst case",
                    time=_iso(now),
                    run_id=run_id,
                )
                _add_spent(conn, run_id, worst)
            else:
                record = LedgerRecord(
                    provider=provider,
                    model=model,
                    endpoint=endpoint,
                    queries=worst.queries,
                    attempts=0,
                    status="abandoned",
                    error=f"reservation released as stale: {why}; never sent, nothing spent",
                    time=_iso(now),
                    run_id=run_id,
                )
            conn.execute("DELETE FROM reservations WHERE id = ?", (rid,))
            _insert_record(conn, record, rid)
            released += 1
        if released:
            logger.warning("released %d stale budget reservation(s) in %s", released, self.location)
        return released

    # -- reading ---------------------------------------------------------------------------

    def balance(self, run_id: str | None = None) -> Balance:
        """Spent and reserved totals in one consistent snapshot (``run_id`` None: all runs)."""
        where, args = ("", ()) if run_id is None else (" WHERE run_id = ?", (run_id,))
        with self._transaction(write=False) as conn:
            spent = _ints(conn.execute(f"SELECT {_SUMS} FROM spent{where}", args).fetchone())
            reserved = _ints(
                conn.execute(f"SELECT {_SUMS} FROM reservations{where}", args).fetchone()
            )
        return Balance(Usage.from_ints(spent), Usage.from_ints(reserved))

    def spent(self, run_id: str | None = None) -> Usage:
        """Usage spent by the whole folder (the budget's scope), or by one run."""
        return self.balance(run_id).spent

    def reserved(self, run_id: str | None = None) -> Usage:
        """Usage reserved by requests in flight in the whole folder, or in one run."""
        return self.balance(run_id).reserved

    def runs(self) -> list[str]:
        """Run ids with records in this folder, oldest first."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT run_id FROM records GROUP BY run_id ORDER BY MIN(seq)"
            ).fetchall()
        return [r[0] for r in rows]

    def records(self, run_id: str | None = None) -> list[LedgerRecord]:
        """Records in the order they were written (``run_id`` None: all runs)."""
        where, args = ("", ()) if run_id is None else (" WHERE run_id = ?", (run_id,))
        columns = ", ".join(_RECORD_COLUMNS)
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {columns} FROM records{where} ORDER BY seq", args
            ).fetchall()
        return [LedgerRecord(**dict(zip(_RECORD_COLUMNS, row, strict=True))) for row in rows]

    def summary(self, run_id: str | None = None) -> LedgerSummary:
        """Totals for one run (``run_id`` None: the whole folder)."""
        return _summarise(run_id, self.records(run_id))

    def export_jsonl(self, path: Path | str, run_id: str | None = None) -> Path:
        """Write the records as JSON lines (one object per record) and return the path."""
        lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in self.records(run_id)]
        return _write_atomic(Path(path), "".join(line + "\n" for line in lines))

    def export_csv(self, path: Path | str, run_id: str | None = None) -> Path:
        """Write the records as CSV with a header row and return the path."""
        records = self.records(run_id)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=_RECORD_COLUMNS)
            writer.writeheader()
            for record in records:
                row = record.to_dict()
                row["error"] = row["error"] or ""
                writer.writerow(row)
        os.replace(tmp, target)
        return target

    # -- helpers ---------------------------------------------------------------------------

    def _complete(self, record: LedgerRecord, run_id: str, **changes: Any) -> LedgerRecord:
        """Apply ``changes`` (one ``replace``, which re-validates) and fill in the time and run
        id when left empty (values made here, set on a copy without validating them again)."""
        changes = {k: v for k, v in changes.items() if getattr(record, k) != v}
        if changes:
            record = replace(record, **changes)
        filled = {}
        if not record.time:
            filled["time"] = _iso(self._clock())
        if not record.run_id:
            filled["run_id"] = run_id  # checked when the ledger was opened, or a record's own
        if filled:
            record = copy.copy(record)
            for name, value in filled.items():
                object.__setattr__(record, name, value)
        return record

    def _new_run_id(self) -> str:
        stamp = datetime.fromtimestamp(self._clock(), timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return f"{stamp}-{secrets.token_hex(3)}"


def _totals(
    conn: SqlConnection,
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Spent and reserved over the whole folder, as exact integer vectors."""
    row = conn.execute(_TOTALS).fetchone()  # one statement: one round trip to a server
    return _ints(row[:4]), _ints(row[4:])


def _excess(actual: Usage, reserved: Usage) -> Usage:
    """What ``actual`` uses beyond ``reserved``, field by field (never negative)."""
    a, r = actual.as_ints(), reserved.as_ints()
    return Usage.from_ints(_ints(tuple(max(0, x - y) for x, y in zip(a, r, strict=True))))


def _ints(row: tuple[Any, ...]) -> tuple[int, int, int, int]:
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def _add_spent(conn: SqlConnection, run_id: str, usage: Usage) -> None:
    conn.execute(
        "INSERT INTO spent VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
        "queries = spent.queries + excluded.queries, "
        "requests = spent.requests + excluded.requests, "
        "input_tokens = spent.input_tokens + excluded.input_tokens, "
        "cost_pico = spent.cost_pico + excluded.cost_pico",
        (run_id, *usage.as_ints()),
    )


def _insert_record(conn: SqlConnection, record: LedgerRecord, reservation_id: str | None) -> None:
    data = record.to_dict()
    columns = ", ".join(_RECORD_COLUMNS)
    marks = ", ".join("?" * len(_RECORD_COLUMNS))
    conn.execute(
        f"INSERT INTO records (reservation_id, {columns}) VALUES (?, {marks})",
        (reservation_id, *(data[c] for c in _RECORD_COLUMNS)),
    )


def _summarise(run_id: str | None, records: list[LedgerRecord]) -> LedgerSummary:
    sent = [r for r in records if r.cache == "miss" and r.status != "abandoned"]
    latencies = sorted(r.latency_s for r in sent)
    times = sorted(r.time for r in records)
    wall = 0.0
    if times:
        wall = (
            datetime.fromisoformat(times[-1]) - datetime.fromisoformat(times[0])
        ).total_seconds()
    return LedgerSummary(
        run_id=run_id,
        requests=len(sent),
        queries_paid=sum(r.queries for r in sent if r.status == "ok"),
        queries_unknown=sum(r.queries for r in sent if r.status in ("unknown", "lost")),
        cache_hits=sum(r.queries for r in records if r.cache == "hit"),
        input_tokens=sum(r.input_tokens for r in records),
        cost_usd=sum(r.cost_usd for r in records),
        attempts=sum(r.attempts for r in sent),
        errors=sum(1 for r in records if r.status != "ok"),
        latency_p50_s=_percentile(latencies, 0.50),
        latency_p95_s=_percentile(latencies, 0.95),
        first_time=times[0] if times else None,
        last_time=times[-1] if times else None,
        wall_s=wall,
    )


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _write_atomic(target: Path, text: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="microseconds")


def _normalise_time(text: str) -> str:
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError as exc:
        raise ConfigError(f"LedgerRecord.time must be ISO 8601, got {text!r}") from exc
    if moment.tzinfo is None:
        raise ConfigError(f"LedgerRecord.time must carry a time zone, got {text!r}")
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9._:+-]{1,100}", run_id):
        raise ConfigError(
            f"run_id must be 1-100 characters from letters, digits and . _ : + -, got {run_id!r}"
        )
    return run_id


def _pid_start(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot, from /proc), or "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    rest = stat[stat.rfind(")") + 2 :].split()
    return rest[19] if len(rest) > 19 else ""


def _same_process_alive(pid: int, pid_start: str) -> bool:
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone else
    if pid_start:
        now_start = _pid_start(pid)
        if now_start and now_start != pid_start:
            return False  # the pid was reused by a later process
    return True


# -- opening, storage faults and reset ---------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    """Open an existing ledger file (``mode=rw``: a vanished file is an error, not a new
    ledger), refusing an empty one."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LedgerError(f"the ledger {path} disappeared while in use") from None
    if size == 0:
        raise LedgerError(
            f"the ledger {path} is an empty file (0 bytes): refusing to start a new budget "
            f"over it; inspect it, or move it aside with `dect-maas ledger reset {path}`"
        )
    try:
        conn = sqlite3.connect(
            f"file:{path}?mode=rw",
            uri=True,
            timeout=60.0,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as exc:
        raise _ledger_error(path, exc) from exc
    return conn


def _create_if_absent(path: Path) -> None:
    """Build a new ledger under a temporary name and link it into place, so that ``path``
    exists only once it is a complete ledger (an empty file is then always damage)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
    try:
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(LEDGER_SCHEMA_VERSION),)
            )
        finally:
            conn.close()
        with suppress(FileExistsError):  # another process created it meanwhile: use theirs
            os.link(tmp, path)
    except (OSError, sqlite3.Error) as exc:
        raise _ledger_error(path, exc) from exc
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def _schema_row(conn: SqlConnection, path: Path) -> str:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        row = None
    if row is None:
        raise LedgerError(
            f"{path} is not a dect-maas ledger (no schema stamp): refusing to use it; move it "
            f"aside with `dect-maas ledger reset {path}`"
        )
    return str(row[0])


@contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """SQLite and OS errors become one ``LedgerError`` naming the file."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise _ledger_error(path, exc) from exc


def _ledger_error(path: Path, exc: BaseException) -> LedgerError:
    text = str(exc)
    if "malformed" in text or "not a database" in text:
        return LedgerError(
            f"the ledger {path} is damaged ({text}): refusing to use it; keep it as the record "
            f"of what was paid, and start a new one with `dect-maas ledger reset {path}`"
        )
    if "full" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return LedgerError(f"cannot write the ledger {path}: disk full ({text}); nothing sent")
    return LedgerError(f"ledger {path}: {type(exc).__name__}: {text}")


class SqliteLedgerStore:
    """The embedded backend: one SQLite file in WAL mode, one connection per process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def prepare(self) -> None:
        _create_if_absent(self.path)
        with self.transaction() as conn:
            row = _schema_row(conn, self.path)
            if row == "1":  # before write ahead: whether a request left is unknown, so "sent"
                conn.execute("ALTER TABLE reservations ADD COLUMN sent INTEGER NOT NULL DEFAULT 1")
                conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema'",
                    (str(LEDGER_SCHEMA_VERSION),),
                )
            elif row != str(LEDGER_SCHEMA_VERSION):
                raise ConfigError(
                    f"the ledger at {self.path.parent} has schema version {row}, this dect-maas "
                    f"uses {LEDGER_SCHEMA_VERSION}; use a new ledger folder (keep the old one: "
                    "it is the record of what was paid)"
                )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            # A connection must not cross a fork: the child opens its own.
            self._conn, self._pid = _connect(self.path), os.getpid()
        return self._conn

    @contextmanager
    def transaction(self, write: bool = True, durable: bool = True) -> Iterator[sqlite3.Connection]:
        # ``durable`` is moot here: WAL with synchronous=NORMAL, every commit alike (docstring)
        with _storage_errors(self.path):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


def _postgres_store(url: str) -> LedgerStore:
    try:
        from .pg import PgLedgerStore
    except ImportError:
        raise ConfigError(POSTGRES_INSTALL_HINT) from None
    return PgLedgerStore(url, LEDGER_SCHEMA_VERSION)


def reset_ledger(directory: Path | str) -> Path | None:
    """Move a (damaged or emptied) ledger file aside and return where it went; the next
    ``Ledger`` on ``directory`` starts a new, empty budget. None if there was no ledger.

    Never called implicitly: losing a ledger loses the record of what was paid.
    """
    folder = Path(os.path.expanduser(directory))
    path = folder / LEDGER_FILENAME if folder.is_dir() else folder
    if not path.exists():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.{stamp}.bad")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        extra = Path(f"{path}{suffix}")
        if extra.exists():
            os.replace(extra, Path(f"{aside}{suffix}"))
    return aside

"""Copy a ledger and a response cache from one store to another (``dect-maas storage copy``).

The usual move is from a machine's folders into the PostgreSQL database a team shares; any
direction works, since both sides go through the storage seam.

- The ledger is copied whole, in one transaction on the destination: every record in order,
  the spent totals per run and any reservation still open (so what was in flight stays counted
  at its worst case). A destination that already holds a ledger is refused: merging two records
  of spend is not something to do by accident.
- The cache is copied entry by entry, as stored (the encoded bytes, checked to decode), in
  batches. Entries are content-addressed, so copying into a cache that already holds some is
  safe, and running the copy again copies nothing new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dect_maas._exceptions import ConfigError

from .cache import ResponseCache
from .ledger import Ledger

__all__ = ["CopyReport", "copy_cache", "copy_ledger"]

_TABLES = {
    "records": (
        "request_id, reservation_id, time, run_id, provider, model, endpoint, cache, status, "
        "queries, input_tokens, cost_usd, attempts, latency_s, error"
    ),
    "spent": "run_id, queries, requests, input_tokens, cost_pico",
    "reservations": (
        "id, run_id, queries, requests, input_tokens, cost_pico, host, pid, pid_start, created, "
        "provider, model, endpoint, sent"
    ),
}
_BATCH = 1000


@dataclass(frozen=True)
class CopyReport:
    """How many rows of each kind were copied."""

    records: int = 0
    spent_runs: int = 0
    reservations: int = 0
    cache_entries: int = 0
    cache_already_there: int = 0


def copy_ledger(source: Ledger, destination: Ledger) -> CopyReport:
    """Copy every record, total and open reservation of ``source`` into an empty
    ``destination``, all in one transaction (all of it lands, or nothing)."""
    rows: dict[str, list[tuple[object, ...]]] = {}
    with source._transaction(write=False) as conn:
        for table, columns in _TABLES.items():
            order = " ORDER BY seq" if table == "records" else ""
            rows[table] = [tuple(r) for r in conn.execute(f"SELECT {columns} FROM {table}{order}")]
    with destination._transaction() as conn:
        for table in _TABLES:
            if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                raise ConfigError(
                    f"the ledger at {destination.location} is not empty (its {table} table has "
                    "rows): refusing to merge two records of spend; copy into a new one "
                    "(e.g. another ?schema=...)"
                )
        for table, columns in _TABLES.items():
            marks = ", ".join("?" * len(columns.split(",")))
            for row in rows[table]:
                conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", row)
    return CopyReport(
        records=len(rows["records"]),
        spent_runs=len(rows["spent"]),
        reservations=len(rows["reservations"]),
    )


def copy_cache(
    source: ResponseCache,
    destination: ResponseCache,
    progress: Callable[[int], None] | None = None,
) -> CopyReport:
    """Copy every entry of ``source`` that ``destination`` lacks, in batches."""
    copied = present = 0
    keys = list(source.keys())
    for start in range(0, len(keys), _BATCH):
        batch = keys[start : start + _BATCH]
        have = destination.get_raw_many(batch)
        missing = [k for k in batch if k not in have]
        present += len(batch) - len(missing)
        if missing:
            raw = source.get_raw_many(missing)
            destination.set_raw_many(list(raw.items()))
            copied += len(raw)
        if progress is not None:
            progress(start + len(batch))
    return CopyReport(cache_entries=copied, cache_already_there=present)

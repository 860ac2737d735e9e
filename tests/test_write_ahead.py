"""Write ahead and storage faults: spend is never undercounted after a crash, paid answers are
stored before they are settled, and a full disk or a damaged ledger is named, never papered over.

Reaches inside for the ledger's file name and ``reset_ledger`` (behind ``dect-maas ledger
reset``), to damage and reset a real ledger file.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from faultserver import MockProvider

from dect_maas import (
    BudgetLimits,
    CacheConfig,
    CacheError,
    Client,
    Ledger,
    LedgerError,
    LedgerRecord,
    ResponseCache,
    Task,
    Usage,
)
from dect_maas.adapters import LocalAdapter
from dect_maas.client.ledger import LEDGER_FILENAME, reset_ledger

TASK = Task("{text} Overall, it was {mask}", {"neg": ["bad", "awful"], "pos": "great"})
TEXTS = [f"review number {i}" for i in range(10)]

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from dect_maas.client.budget import BudgetLimits, Usage
    from dect_maas.client.ledger import Ledger
    ledger = Ledger(sys.argv[1], BudgetLimits(max_queries=100))
    sent = ledger.reserve(Usage(queries=7, requests=1, input_tokens=70, cost_usd=0.5))
    ledger.mark_sent(sent)          # the request left: its outcome is unknown from here on
    ledger.reserve(Usage(queries=3, requests=1))  # reserved, never sent
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_killed_process_s_sent_request_counts_at_its_worst_case(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    child.stdout.close()
    with Ledger(tmp_path, BudgetLimits(max_queries=100)) as ledger:
        spent, reserved = ledger.spent(), ledger.reserved()
        records = ledger.records()
        summary = ledger.summary()
    assert reserved == Usage()  # no stale reservation left
    assert spent == Usage(queries=7, requests=1, input_tokens=70, cost_usd=0.5)
    assert sorted((r.status, r.queries) for r in records) == [("abandoned", 3), ("unknown", 7)]
    assert summary.queries_unknown == 7
    assert summary.queries_paid == 0
    assert summary.cost_usd == pytest.approx(0.5)


def test_a_limit_counts_unknown_requests(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    child.stdout.close()
    with Ledger(tmp_path, BudgetLimits(max_queries=10)) as ledger:
        ledger.reserve(Usage(queries=3))  # 7 unknown + 3 = 10 fits
        with pytest.raises(Exception, match="queries"):
            ledger.reserve(Usage(queries=1))


def test_a_version_1_ledger_is_migrated_and_its_reservations_count_as_sent(
    tmp_path: Path,
) -> None:
    with Ledger(tmp_path) as ledger:
        pass
    conn = sqlite3.connect(tmp_path / LEDGER_FILENAME)
    conn.execute("ALTER TABLE reservations DROP COLUMN sent")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    row = ("r", "run", 4, 1, 0, 0, "host", 999_999_999, "", 0.0, "p", "m", "e")
    conn.execute("INSERT INTO reservations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
    conn.commit()
    conn.close()
    with Ledger(tmp_path) as ledger:
        assert ledger.release_stale(older_than_s=1) == 1
        assert ledger.spent().queries == 4
        assert [r.status for r in ledger.records()] == ["unknown"]


def test_an_empty_ledger_file_is_refused_and_reset_moves_it_aside(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        ledger.settle(
            ledger.reserve(Usage(queries=2, requests=1)),
            Usage(queries=2, requests=1),
            _record(2),
        )
    (tmp_path / LEDGER_FILENAME).write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"{LEDGER_FILENAME}{suffix}").unlink(missing_ok=True)
    with pytest.raises(LedgerError, match=f"{tmp_path / LEDGER_FILENAME}.*empty"):
        Ledger(tmp_path)
    aside = reset_ledger(tmp_path)
    assert aside is not None
    assert aside.stat().st_size == 0
    with Ledger(tmp_path) as ledger:
        assert ledger.spent() == Usage()


def test_a_damaged_ledger_is_refused_with_its_path(tmp_path: Path) -> None:
    with Ledger(tmp_path):
        pass
    path = tmp_path / LEDGER_FILENAME
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema page
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match=f"{path}.*(damaged|not a dect-maas)"):
        Ledger(tmp_path)
    assert path.read_bytes() == bytes(data)  # untouched, never reset


class FullLedger(Ledger):
    """A real ledger on a disk that fills after ``room`` more write transactions."""

    room = 10**9

    def mark_sent(self, reservation: Any) -> None:
        FullLedger.room -= 1
        if FullLedger.room < 0:
            with self._transaction():
                raise sqlite3.OperationalError("database or disk is full")
        super().mark_sent(reservation)


def test_a_full_ledger_stops_sending_names_its_file_and_undercounts_nothing(
    tmp_path: Path,
) -> None:
    provider = MockProvider()
    FullLedger.room = 2
    ledger = FullLedger(tmp_path / "ledger")
    adapter = LocalAdapter("http://fake", max_inputs_per_request=1)
    client = Client(
        adapter,
        cache=CacheConfig(tmp_path / "cache"),
        ledger=ledger,
        transport=provider.transport(),
        max_concurrency=1,
    )
    with client, pytest.raises(LedgerError, match=f"{ledger.path}.*disk full"):
        client.features(TASK, TEXTS)
    with Ledger(tmp_path / "ledger") as fresh:
        counted = fresh.spent().queries
        assert fresh.reserved() == Usage()
    assert counted == 2  # the two requests that were recorded as sent, and only they left


def test_a_cache_write_error_records_the_answers_as_lost_and_names_the_cache(
    tmp_path: Path,
) -> None:
    class FullCache(ResponseCache):
        def set_many(self, items: Any) -> None:
            raise sqlite3.OperationalError("database or disk is full")

    provider = MockProvider()
    cache = FullCache(CacheConfig(tmp_path / "cache"))
    client = Client(
        LocalAdapter("http://fake", max_inputs_per_request=1),
        cache=cache,
        ledger=tmp_path / "ledger",
        transport=provider.transport(),
        max_concurrency=1,
    )
    with client, pytest.raises(CacheError, match=f"{tmp_path / 'cache'}.*disk full"):
        client.features(TASK, TEXTS)
    with Ledger(tmp_path / "ledger") as ledger:
        records = [r for r in ledger.records() if r.cache == "miss"]
        summary = ledger.summary()
        assert ledger.reserved() == Usage()
    assert records
    assert {r.status for r in records} == {"lost"}  # never "ok"
    assert summary.queries_unknown == sum(r.queries for r in records) >= 1
    assert ledger_spent(tmp_path) == summary.queries_unknown
    assert len(records) <= 3  # sending stopped at once (a commit behind plus the window)
    cache.close()


def ledger_spent(tmp_path: Path) -> int:
    with Ledger(tmp_path / "ledger") as ledger:
        return ledger.spent().queries


def _record(queries: int) -> Any:
    return LedgerRecord(provider="p", model="m", endpoint="e", queries=queries)


def test_the_cli_refuses_an_empty_ledger_and_resets_it_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dect_maas.cli import main

    with Ledger(tmp_path):
        pass
    (tmp_path / LEDGER_FILENAME).write_bytes(b"")
    assert main(["ledger", "summary", "--ledger-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{tmp_path / LEDGER_FILENAME} is an empty file" in err
    assert main(["ledger", "reset", str(tmp_path)]) == 0
    assert "moved the old ledger" in capsys.readouterr().err
    assert main(["ledger", "summary", "--ledger-dir", str(tmp_path)]) == 0
    assert "queries_unknown: 0" in capsys.readouterr().out


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    """A real 256 KiB tmpfs (needs root and mount; skipped otherwise)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_ledger_on_a_full_disk_names_its_file_and_keeps_what_it_holds(tiny_disk: Path) -> None:
    ledger = Ledger(tiny_disk / "ledger")
    first = ledger.reserve(Usage(queries=1, requests=1))
    ledger.mark_sent(first)
    fd = os.open(tiny_disk / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space"):
        _fill(fd)
    os.close(fd)
    with pytest.raises(LedgerError, match=f"{ledger.path}.*disk full"):
        _use(ledger)
    settled_before = ledger.spent().queries
    os.remove(tiny_disk / "filler")
    ledger.close()
    with Ledger(tiny_disk / "ledger") as again:
        assert again.spent().queries == settled_before  # nothing stored was lost
        assert again.reserved().queries >= 1  # the sent request still counts (its process lives)
        assert again.spent().queries + again.reserved().queries >= settled_before + 1


def _fill(fd: int) -> None:
    while True:
        os.write(fd, b"x" * 1024)


def _use(ledger: Ledger) -> None:
    for _ in range(1000):  # the WAL may have a little room left: fill it
        nxt = ledger.reserve(Usage(queries=1, requests=1))
        ledger.mark_sent(nxt)
        ledger.settle(nxt, Usage(queries=1, requests=1), _record(1))


def test_a_request_settled_as_unknown_then_answered_is_not_counted_twice(tmp_path: Path) -> None:
    now = [1000.0]
    with Ledger(tmp_path, clock=lambda: now[0]) as ledger:
        worst = Usage(queries=5, requests=1, input_tokens=50)
        sent = ledger.reserve(worst)
        ledger.mark_sent(sent)
        unsent = ledger.reserve(Usage(queries=2, requests=1))
        now[0] += 100
        assert ledger.release_stale(older_than_s=50) == 2  # e.g. another host's, given up on
        assert ledger.spent() == worst  # the sent one at its worst case, the unsent freed
        ledger.settle(sent, Usage(queries=5, requests=1, input_tokens=40), _record(5))
        assert ledger.spent() == worst  # the late answer adds only what exceeds the worst case
        assert ledger.reserved() == Usage()
        statuses = [r.status for r in ledger.records()]
        assert sorted(statuses[:2]) == ["abandoned", "unknown"]
        assert statuses[2] == "ok"
    assert unsent.usage.queries == 2

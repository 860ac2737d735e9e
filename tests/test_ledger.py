"""The ledger on a real SQLite file: records, totals, summaries, exports, stale reservations.

Reaches inside: reservations, settlements, the file name and the pid liveness check are
internals of the ledger.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from dect_maas import (
    BudgetExceeded,
    BudgetLimits,
    ConfigError,
    Ledger,
    LedgerRecord,
    LedgerSummary,
    Usage,
)
from dect_maas.client.ledger import LEDGER_FILENAME, _pid_start


class FakeClock:
    """A clock that advances only when told."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _record(**kw: object) -> LedgerRecord:
    return LedgerRecord(provider="local", model="tiny", endpoint="/v1/features", **kw)  # type: ignore[arg-type]


def test_settle_replaces_the_reservation_by_actual_usage(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, run_id="r1")
    res = ledger.reserve(Usage(queries=8, requests=1, input_tokens=800, cost_usd=0.08))
    assert ledger.reserved() == Usage(8, 1, 800, 0.08)
    assert ledger.spent() == Usage()
    # The record's own usage fields are overwritten by `actual`.
    ledger.settle(res, Usage(8, 1, 612, 0.0612), _record(queries=0, latency_s=0.5, attempts=2))
    assert ledger.reserved() == Usage()
    assert ledger.spent() == Usage(8, 1, 612, 0.0612)
    (rec,) = ledger.records()
    assert (rec.queries, rec.input_tokens, rec.cost_usd) == (8, 612, 0.0612)
    assert (rec.run_id, rec.cache, rec.status, rec.attempts) == ("r1", "miss", "ok", 2)


def test_release_gives_back_an_unsent_reservation_without_a_record(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, BudgetLimits(max_queries=3))
    res = ledger.reserve(Usage(queries=3))
    with pytest.raises(BudgetExceeded):
        ledger.reserve(Usage(queries=1))
    ledger.release(res)
    ledger.release(res)  # twice: nothing more happens
    assert ledger.reserved() == Usage()
    assert ledger.spent() == Usage()
    assert ledger.records() == []
    ledger.reserve(Usage(queries=3))  # the room is back


def test_refund_counts_only_what_the_provider_billed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    a = ledger.reserve(Usage(4, 1, 400, 0.04))
    b = ledger.reserve(Usage(4, 1, 400, 0.04))
    ledger.refund(a, _record(queries=4, status="error", error="ServerError 503", attempts=3))
    ledger.refund(b, _record(queries=4, status="error", input_tokens=400, cost_usd=0.01))
    assert ledger.reserved() == Usage()
    assert ledger.spent() == Usage(0, 0, 400, 0.01)
    statuses = [(r.status, r.queries, r.cost_usd, r.attempts) for r in ledger.records()]
    assert statuses == [("error", 4, 0.0, 3), ("error", 4, 0.01, 1)]


def test_a_reservation_closes_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    res = ledger.reserve(Usage(1, 1))
    ledger.settle(res, Usage(1, 1), _record())
    with pytest.raises(ConfigError, match="already settled"):
        ledger.settle(res, Usage(1, 1), _record())
    with pytest.raises(ConfigError, match="already settled"):
        ledger.refund(res, _record(status="error"))
    assert ledger.spent() == Usage(1, 1)
    assert len(ledger.records()) == 1


def test_settle_and_refund_check_their_records(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    res = ledger.reserve(Usage(1, 1))
    with pytest.raises(ConfigError, match="status other than 'ok'"):
        ledger.refund(res, _record())
    with pytest.raises(ConfigError, match="'miss'"):
        ledger.settle(res, Usage(1, 1), _record(cache="hit"))
    with pytest.raises(ConfigError, match="non-negative"):
        ledger.settle(res, Usage(-1, 1), _record())
    assert ledger.reserved() == Usage(1, 1)  # nothing changed


def test_overspend_is_recorded_and_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(tmp_path, BudgetLimits(max_input_tokens=100))
    res = ledger.reserve(Usage(1, 1, 100))
    with caplog.at_level("WARNING", logger="dect_maas"):
        ledger.settle(res, Usage(1, 1, 130), _record())
    assert ledger.spent().input_tokens == 130
    assert "input_tokens" in caplog.text


def test_cache_hits_are_counted_at_zero_cost(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, BudgetLimits(max_queries=2))
    ledger.record_hits(50, provider="local", model="tiny", endpoint="/v1/features")
    ledger.record_hits(0, provider="local", model="tiny", endpoint="/v1/features")
    assert ledger.spent() == Usage()
    ledger.reserve(Usage(queries=2, requests=1))  # hits never used the budget
    (rec,) = ledger.records()
    assert (rec.cache, rec.queries, rec.cost_usd, rec.attempts) == ("hit", 50, 0.0, 0)
    with pytest.raises(ConfigError):
        ledger.record_hits(-1, provider="p", model="m", endpoint="e")


def test_records_and_totals_persist_across_reopen_and_runs(tmp_path: Path) -> None:
    with Ledger(tmp_path, run_id="first") as ledger:
        ledger.settle(ledger.reserve(Usage(3, 1)), Usage(3, 1, 30, 0.003), _record())
        ledger.record_hits(2, provider="local", model="tiny", endpoint="/v1/features")
        first = ledger.records()
    with Ledger(tmp_path, run_id="second") as ledger:
        ledger.settle(ledger.reserve(Usage(5, 1)), Usage(5, 1, 50, 0.005), _record())
        assert ledger.runs() == ["first", "second"]
        assert ledger.records("first") == first
        assert ledger.spent("first") == Usage(3, 1, 30, 0.003)
        assert ledger.spent("second") == Usage(5, 1, 50, 0.005)
        assert ledger.spent() == Usage(8, 2, 80, 0.008)
        assert len(ledger.records()) == 3


def test_summary_numbers(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = Ledger(tmp_path, clock=clock, run_id="run")
    for i in range(1, 21):  # latencies 0.1 .. 2.0 s
        res = ledger.reserve(Usage(2, 1, 20, 0.002))
        ledger.settle(res, Usage(2, 1, 20, 0.002), _record(latency_s=i / 10, attempts=1 + i % 2))
        clock.now += 1.5
    res = ledger.reserve(Usage(2, 1))
    ledger.refund(res, _record(status="error", latency_s=3.0, attempts=4, error="timeout"))
    ledger.record_hits(7, provider="local", model="tiny", endpoint="/v1/features")
    summary = ledger.summary("run")
    assert isinstance(summary, LedgerSummary)
    assert summary.run_id == "run"
    assert summary.requests == 21
    assert summary.queries_paid == 40
    assert summary.cache_hits == 7
    assert summary.input_tokens == 400
    assert summary.cost_usd == pytest.approx(0.04)
    assert summary.attempts == sum(1 + i % 2 for i in range(1, 21)) + 4
    assert summary.errors == 1
    # numpy-style linear percentiles over 0.1..2.0 and 3.0
    assert summary.latency_p50_s == pytest.approx(1.1)
    assert summary.latency_p95_s == pytest.approx(2.0)
    assert summary.wall_s == pytest.approx(30.0)
    assert summary.hit_rate == pytest.approx(7 / 47)
    assert json.loads(json.dumps(summary.to_dict()))["queries_paid"] == 40
    assert ledger.summary() == LedgerSummary(**{**summary.__dict__, "run_id": None})
    empty = ledger.summary("nothing")
    assert (empty.requests, empty.latency_p50_s, empty.wall_s) == (0, None, 0.0)


def test_times_and_run_ids_come_from_the_clock(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000.25)
    ledger = Ledger(tmp_path, clock=clock)
    assert ledger.run_id.startswith("20270115T080000Z-")
    ledger.record_hits(1, provider="p", model="m", endpoint="e")
    ledger.settle(ledger.reserve(Usage(1)), Usage(1), _record(time="2027-01-15T09:00:00Z"))
    times = [r.time for r in ledger.records()]
    assert times == ["2027-01-15T08:00:00.250000+00:00", "2027-01-15T09:00:00.000000+00:00"]
    assert Ledger(tmp_path, clock=clock).run_id != ledger.run_id


def test_exports_parse_back_to_the_records(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger", run_id="exp")
    ledger.settle(ledger.reserve(Usage(2, 1)), Usage(2, 1, 17, 1e-6), _record(latency_s=0.25))
    ledger.refund(
        ledger.reserve(Usage(1, 1)),
        _record(status="error", error='bad, "quoted"\nline', attempts=3),
    )
    ledger.record_hits(4, provider="local", model="tiny", endpoint="/v1/features")
    records = ledger.records()

    csv_path = ledger.export_csv(tmp_path / "out" / "ledger.csv")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(records[0].to_dict())
    assert [LedgerRecord.from_dict(r) for r in rows] == records

    jsonl_path = ledger.export_jsonl(tmp_path / "out" / "ledger.jsonl")
    lines = jsonl_path.read_text(encoding="utf-8").splitlines()
    assert [LedgerRecord.from_dict(json.loads(line)) for line in lines] == records
    assert json.loads(lines[1])["error"] == 'bad, "quoted"\nline'

    other = ledger.export_jsonl(tmp_path / "other.jsonl", run_id="nobody")
    assert other.read_text() == ""
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_urls_in_records_have_query_values_and_user_info_masked(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    rec = LedgerRecord(
        provider="gemini",
        model="m",
        endpoint="/v1beta/models/m:embedContent?key=AIzaSECRET",
        error="503 from https://user:pw@host/v1/x?key=AIzaSECRET&alt=json after 3 tries",
        status="error",
    )
    ledger.refund(ledger.reserve(Usage(1, 1)), rec)
    (stored,) = ledger.records()
    assert stored.endpoint == "/v1beta/models/m:embedContent?key=***"
    assert stored.error == "503 from https://***@host/v1/x?key=***&alt=*** after 3 tries"
    assert "SECRET" not in (tmp_path / LEDGER_FILENAME).read_bytes().decode("latin-1")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cache": "maybe"},
        {"status": "fine"},
        {"queries": -1},
        {"attempts": 1.5},
        {"cost_usd": float("nan")},
        {"latency_s": -0.1},
        {"time": "yesterday"},
        {"time": "2027-01-01T00:00:00"},  # no time zone
    ],
)
def test_records_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _record(**kwargs)


def test_long_errors_are_shortened() -> None:
    assert len(_record(status="error", error="x" * 5000).error or "") == 300


def test_run_id_is_validated(tmp_path: Path) -> None:
    for bad in ["", "has space", "a/b", "x" * 101]:
        with pytest.raises(ConfigError, match="run_id"):
            Ledger(tmp_path, run_id=bad)


def test_schema_mismatch_is_refused(tmp_path: Path) -> None:
    Ledger(tmp_path).close()
    conn = sqlite3.connect(tmp_path / LEDGER_FILENAME)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        Ledger(tmp_path)


# -- stale reservations --------------------------------------------------------------------

_CRASHER = textwrap.dedent(
    """
    import os, sys
    from dect_maas import Ledger, Usage
    ledger = Ledger(sys.argv[1], run_id="crashed")
    ledger.reserve(Usage(queries=7, requests=1), provider="local", model="tiny",
                   endpoint="/v1/features")
    print(os.getpid(), flush=True)
    os._exit(0)  # dies holding the reservation
    """
)


def test_reservations_of_dead_processes_are_released_on_open(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CRASHER, str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip().isdigit()
    ledger = Ledger(tmp_path, BudgetLimits(max_queries=10))
    assert ledger.reserved() == Usage()
    (rec,) = ledger.records()
    assert (rec.status, rec.run_id, rec.queries, rec.provider) == (
        "abandoned",
        "crashed",
        7,
        "local",
    )
    assert rec.error is not None
    assert f"process {out.stdout.strip()}" in rec.error
    ledger.reserve(Usage(queries=10))  # the whole budget is free again


def test_live_reservations_are_kept_and_old_ones_released_on_request(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = Ledger(tmp_path, clock=clock)
    ledger.reserve(Usage(queries=3))
    assert ledger.release_stale() == 0  # this process is alive
    assert Ledger(tmp_path, clock=clock).reserved() == Usage(queries=3)
    clock.now += 100
    assert ledger.release_stale(older_than_s=200) == 0
    assert ledger.release_stale(older_than_s=50) == 1
    assert ledger.reserved() == Usage()
    assert ledger.records()[0].status == "abandoned"


def test_a_reused_pid_does_not_keep_a_reservation_alive(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    other = subprocess.Popen(["sleep", "60"])  # a live process that is not us
    try:
        start = _pid_start(other.pid)
        assert start  # /proc is there, as on any Linux
        host = socket.gethostname()
        rows = [
            ("r-old", "run", 5, 1, 0, 0, host, other.pid, "1", 0.0, "p", "m", "e"),  # pid reused
            ("r-live", "run", 2, 1, 0, 0, host, other.pid, start, 0.0, "p", "m", "e"),
            ("r-far", "run", 1, 1, 0, 0, "elsewhere", 999_999_999, "", 0.0, "p", "m", "e"),
        ]
        conn = sqlite3.connect(tmp_path / LEDGER_FILENAME)
        conn.executemany("INSERT INTO reservations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,0)", rows)
        conn.commit()
        conn.close()
        assert ledger.release_stale() == 1  # r-old: same pid, later start
        assert ledger.reserved() == Usage(queries=3, requests=2)
    finally:
        other.kill()
        other.wait()


def test_a_forked_child_uses_its_own_connection(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, run_id="parent")
    ledger.record_hits(1, provider="p", model="m", endpoint="e")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            ledger.settle(ledger.reserve(Usage(1, 1)), Usage(1, 1), _record())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ledger.record_hits(1, provider="p", model="m", endpoint="e")
    assert ledger.spent() == Usage(1, 1)
    assert [r.cache for r in ledger.records()] == ["hit", "miss", "hit"]


def test_settling_after_a_stale_release_still_records_the_spend(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = Ledger(tmp_path, clock=clock)
    res = ledger.reserve(Usage(2, 1, 0, 0.5))
    clock.now += 3600
    assert ledger.release_stale(older_than_s=60) == 1
    ledger.settle(res, Usage(2, 1, 0, 0.5), _record())  # it was paid, so it counts
    assert ledger.spent() == Usage(2, 1, 0, 0.5)
    assert [r.status for r in ledger.records()] == ["abandoned", "ok"]
    with pytest.raises(ConfigError, match="already settled"):
        ledger.refund(res, _record(status="error"))


def test_a_reservation_from_another_folder_is_refused(tmp_path: Path) -> None:
    other = Ledger(tmp_path / "other").reserve(Usage(1))
    ledger = Ledger(tmp_path / "mine")
    with pytest.raises(ConfigError, match="not in the ledger"):
        ledger.settle(other, Usage(1), _record())
    assert ledger.spent() == Usage()
    assert ledger.records() == []


def test_a_refused_reservation_first_frees_what_dead_processes_hold(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, BudgetLimits(max_queries=10))  # open before the crash
    subprocess.run(
        [sys.executable, "-c", _CRASHER, str(tmp_path)], check=True, capture_output=True, timeout=60
    )
    assert ledger.reserved() == Usage(queries=7, requests=1)
    ledger.reserve(Usage(queries=10))  # fits once the dead process's 7 are released
    assert [r.status for r in ledger.records()] == ["abandoned"]
    with pytest.raises(BudgetExceeded, match="reserved by requests in flight 10"):
        ledger.reserve(Usage(queries=1))  # a live reservation is never taken away


def test_our_own_pid_with_another_start_time_is_a_dead_process(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    conn = sqlite3.connect(tmp_path / LEDGER_FILENAME)
    row = ("r", "run", 5, 1, 0, 0, socket.gethostname(), os.getpid(), "1", 0.0, "p", "m", "e")
    conn.execute("INSERT INTO reservations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,0)", row)
    conn.commit()
    conn.close()
    assert ledger.release_stale() == 1

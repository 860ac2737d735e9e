"""One suite, both storage backends: the embedded default (SQLite + diskcache) and PostgreSQL.

Every test here runs twice, on a real SQLite file and diskcache folder, and on a real PostgreSQL
server (``postgres_url`` in conftest.py: one started by the pgserver wheel, or
$DECT_MAAS_TEST_POSTGRES_URL). Nothing is mocked but the model provider.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from faultserver import MockProvider

from dect_maas import BudgetExceeded, BudgetLimits, ConfigError, Ledger, LedgerRecord, Task, Usage
from dect_maas.adapters import LocalAdapter
from dect_maas.client.cache import CacheConfig, ResponseCache, cache_key
from dect_maas.client.client import Client


@dataclass(frozen=True)
class Target:
    """Where one backend keeps a ledger and a cache: folders, or one database URL."""

    name: str
    ledger: str
    cache: str


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "sqlite":
        return Target("sqlite", str(tmp_path / "ledger"), str(tmp_path / "cache"))
    url = request.getfixturevalue("pg_schema_url")
    return Target("postgresql", url, url)


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def _record(n: int = 0, **kw: object) -> LedgerRecord:
    return LedgerRecord(
        provider="local", model="tiny", endpoint="/v1/features", request_id=f"req-{n}", **kw
    )  # type: ignore[arg-type]


# -- the ledger --------------------------------------------------------------------------------


def test_reserve_settle_refund_keep_exact_totals(target: Target) -> None:
    with Ledger(target.ledger, BudgetLimits(max_queries=10, max_cost_usd=1.0)) as ledger:
        a = ledger.reserve(Usage(4, 1, 100, 0.3))
        b = ledger.reserve(Usage(4, 1, 100, 0.3))
        assert ledger.reserved() == Usage(8, 2, 200, 0.6)
        with pytest.raises(BudgetExceeded):
            ledger.reserve(Usage(3, 1))  # 8 reserved + 3 > 10: nothing reserved
        ledger.settle(a, Usage(4, 1, 90, 0.1), _record(1))
        ledger.refund(b, _record(2, status="error", cost_usd=0.05))
        assert ledger.spent() == Usage(4, 1, 90, 0.15)
        assert ledger.reserved() == Usage()
        assert [r.status for r in ledger.records()] == ["ok", "error"]
        with pytest.raises(ConfigError, match="already settled"):
            ledger.settle(a, Usage(4, 1), _record(3))


_WORKER = textwrap.dedent(
    """
    import sys
    from dect_maas import BudgetExceeded, BudgetLimits, Ledger, LedgerRecord, Usage
    ledger = Ledger(sys.argv[1], BudgetLimits(max_queries=int(sys.argv[2])))
    got = 0
    while True:
        try:
            res = ledger.reserve(Usage(queries=3, requests=1))
        except BudgetExceeded:
            break
        ledger.mark_sent(res)
        ledger.settle(res, Usage(queries=3, requests=1),
                      LedgerRecord(provider="p", model="m", endpoint="e"))
        got += 3
    print(got)
    """
)


def test_a_limit_holds_across_processes(target: Target) -> None:
    Ledger(target.ledger).close()  # created once, before the race
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, target.ledger, "100"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    got = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    with Ledger(target.ledger) as ledger:
        assert ledger.spent().queries == sum(got) == 99  # 33 requests of 3: never above 100
        assert ledger.summary().queries_paid == 99


_CRASHER = textwrap.dedent(
    """
    import os, sys
    from dect_maas import Ledger, Usage
    ledger = Ledger(sys.argv[1], run_id="crashed")
    sent = ledger.reserve(Usage(queries=5, requests=1, cost_usd=0.5), provider="p", model="m",
                          endpoint="/v1/features")
    ledger.mark_sent(sent)
    ledger.reserve(Usage(queries=7, requests=1), provider="p", model="m", endpoint="/v1/features")
    os._exit(0)  # dies holding both
    """
)


def test_a_crash_counts_sent_requests_at_their_worst_case(target: Target) -> None:
    subprocess.run([sys.executable, "-c", _CRASHER, target.ledger], check=True, timeout=120)
    with Ledger(target.ledger) as ledger:  # opening releases what the dead process held
        assert ledger.reserved() == Usage()
        assert ledger.spent() == Usage(5, 1, 0, 0.5)  # sent: counted, never zero
        statuses = sorted((r.status, r.queries) for r in ledger.records())
        assert statuses == [("abandoned", 7), ("unknown", 5)]
        assert ledger.summary().queries_unknown == 5


def test_a_newer_schema_is_refused(target: Target) -> None:
    Ledger(target.ledger).close()
    if target.name == "sqlite":
        import sqlite3

        conn = sqlite3.connect(Path(target.ledger) / "ledger.sqlite3")
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
        conn.commit()
        conn.close()
    else:
        _sql(target.ledger, "UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(ConfigError, match="schema version 99"):
        Ledger(target.ledger)


def _script(ledger: Ledger) -> None:
    """The same operations, for the identical-exports test."""
    a = ledger.reserve(Usage(2, 1, 40, 0.002), provider="p", model="m", endpoint="/v1/f")
    ledger.mark_sent(a)
    ledger.settle(a, Usage(2, 1, 38, 0.0019), _record(1, latency_s=0.5, attempts=2))
    ledger.record_hits(3, provider="p", model="m", endpoint="/v1/f")
    b = ledger.reserve(Usage(1, 1, 10, 0.001))
    ledger.refund(b, _record(2, status="error", error="HTTP 500 from http://h/x?key=s3cret"))
    ledger.release(ledger.reserve(Usage(1, 1)))


def _ids(text: str) -> str:
    return re.sub("[0-9a-f]{32}", "<random id>", text)  # a cache-hit record's own request id


def test_exports_and_summaries_are_identical_on_both_backends(
    tmp_path: Path, pg_schema_url: str
) -> None:
    out = {}
    for name, where in (("sqlite", str(tmp_path / "l")), ("postgresql", pg_schema_url)):
        with Ledger(where, run_id="run-1", clock=FakeClock()) as ledger:
            _script(ledger)
            jsonl = _ids(ledger.export_jsonl(tmp_path / f"{name}.jsonl").read_text())
            csv = _ids(ledger.export_csv(tmp_path / f"{name}.csv").read_text())
            out[name] = (jsonl, csv, ledger.summary().to_dict(), ledger.runs(), ledger.spent())
    assert out["sqlite"] == out["postgresql"]
    assert "s3cret" not in out["postgresql"][0]
    assert out["postgresql"][2]["queries_paid"] == 2
    assert out["postgresql"][2]["cache_hits"] == 3


# -- the cache ---------------------------------------------------------------------------------


def test_cache_entries_round_trip_per_example(target: Target) -> None:
    hidden = np.arange(576, dtype=np.float32) / 7
    keys = [cache_key({"i": i}) for i in range(50)]
    with ResponseCache(CacheConfig(target.cache)) as cache:
        cache.set(keys[0], {"scores": [0.5, -1.0], "hidden": hidden, "t": 12})
        cache.set_many({k: {"scores": [float(i)], "t": i} for i, k in enumerate(keys[1:], 1)})
        assert len(cache) == 50
        assert keys[3] in cache
        assert cache_key({"i": -1}) not in cache
        got = cache.get_many([*keys, cache_key({"i": -1})])
        assert len(got) == 50
        assert got[keys[7]] == {"scores": [7.0], "t": 7}
        np.testing.assert_array_equal(got[keys[0]]["hidden"], hidden)
        assert got[keys[0]]["hidden"].dtype == np.float32
        assert cache.get(cache_key({"i": -1})) is None
    with ResponseCache(CacheConfig(target.cache)) as again:  # durable, nothing evicted
        assert len(again) == 50
        assert sorted(again.keys()) == sorted(keys)


def test_a_cache_of_another_schema_version_is_refused(target: Target) -> None:
    import dect_maas.client.cache as cache_module

    ResponseCache(CacheConfig(target.cache)).close()
    old = cache_module.SCHEMA_VERSION
    cache_module.SCHEMA_VERSION = old + 1
    try:
        with pytest.raises(Exception, match=f"schema version {old}"):
            ResponseCache(CacheConfig(target.cache))
    finally:
        cache_module.SCHEMA_VERSION = old


# -- the client on each backend ------------------------------------------------------------------

TASK = Task("{text} Overall, it was {mask}", {"neg": "bad", "pos": "great"})


def test_the_client_pays_each_example_once_on_a_shared_store(target: Target) -> None:
    provider = MockProvider()
    texts = [f"review {i}" for i in range(12)]

    def client() -> Client:
        return Client(
            LocalAdapter("http://fake", max_inputs_per_request=4),
            cache=CacheConfig(target.cache),
            ledger=target.ledger,
            budget=BudgetLimits(max_queries=100),
            transport=provider.transport(),
        )

    with client() as first:
        a = first.features(TASK, texts[:8])
    with client() as second:  # another "machine" on the same store: 8 hits, 4 paid
        b = second.features(TASK, texts)
        summary = second.ledger.summary()
    np.testing.assert_array_equal(a.scores, b.scores[:8])
    sent = [t for body in provider.sent() for t in body["inputs"]]
    assert sorted(sent) == sorted(set(sent))  # no example paid twice
    assert summary.queries_paid == 12 + 1  # every example once, and the content-free input
    assert summary.cache_hits == 8 + 1


def _sql(url: str, statement: str) -> None:
    """Run one statement in the URL's schema (test set-up on the real server)."""
    import psycopg

    from dect_maas.client.storage import connect_kwargs, parse_database_url

    parsed = parse_database_url(url)
    with psycopg.connect(parsed.conninfo, **connect_kwargs(parsed, {}), autocommit=True) as c:
        c.execute(statement)  # type: ignore[arg-type]


def test_summary_json_is_plain(target: Target) -> None:
    with Ledger(target.ledger) as ledger:
        ledger.record_hits(2, provider="p", model="m", endpoint="e")
        assert json.loads(json.dumps(ledger.summary().to_dict()))["cache_hits"] == 2

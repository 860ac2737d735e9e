"""Budget limits hold under concurrency: asyncio tasks, threads and two real processes.

Reaches inside for ``LIMIT_NAMES`` only, to run one case per limit.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dect_maas import BudgetExceeded, BudgetLimits, ConfigError, Ledger, LedgerRecord, Usage
from dect_maas.client.budget import LIMIT_NAMES

FAKE_KEY = "sk-test-9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a"


def _record(**kw: object) -> LedgerRecord:
    return LedgerRecord(provider="local", model="tiny", endpoint="/v1/features", **kw)  # type: ignore[arg-type]


def _within(usage: Usage, limits: BudgetLimits) -> bool:
    checks = [
        (usage.queries, limits.max_queries),
        (usage.requests, limits.max_requests),
        (usage.input_tokens, limits.max_input_tokens),
    ]
    ok = all(limit is None or value <= limit for value, limit in checks)
    cost_limit = limits.max_cost_usd
    return ok and (cost_limit is None or usage.cost_usd <= cost_limit + 1e-12)


# -- values --------------------------------------------------------------------------------


def test_usage_arithmetic() -> None:
    a, b = Usage(3, 1, 100, 0.25), Usage(1, 1, 40, 0.05)
    assert a + b == Usage(4, 2, 140, 0.3)
    assert a - b == Usage(2, 0, 60, 0.2)
    assert b - a == Usage(-2, 0, -60, pytest.approx(-0.2))  # type: ignore[arg-type]
    assert Usage.from_ints(a.as_ints()) == a
    with pytest.raises(ConfigError):
        (b - a).validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_queries": -1},
        {"max_requests": -5},
        {"max_input_tokens": 1.5},
        {"max_cost_usd": -0.01},
        {"max_cost_usd": float("nan")},
        {"max_cost_usd": float("inf")},
        {"max_queries": True},
        {"max_cost_usd": "1"},
    ],
)
def test_limits_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="BudgetLimits"):
        BudgetLimits(**kwargs)  # type: ignore[arg-type]


def test_budget_exceeded_names_the_limit_and_the_amounts(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, BudgetLimits(max_queries=1000, max_cost_usd=1.0))
    ledger.settle(ledger.reserve(Usage(10, 1, 0, 0.6)), Usage(10, 1, 0, 0.6), _record())
    ledger.reserve(Usage(10, 1, 0, 0.3))
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve(Usage(10, 1, 0, 0.2))
    err = info.value
    assert (err.limit, err.allowed) == ("cost_usd", 1.0)
    assert (err.spent, err.reserved, err.asked) == pytest.approx((0.6, 0.3, 0.2))
    message = str(err)
    for part in [
        "cost_usd",
        "spent 0.6",
        "reserved by requests in flight 0.3",
        "asks 0.2",
        "limit 1",
    ]:
        assert part in message
    assert ledger.reserved() == Usage(10, 1, 0, 0.3)  # the refused request reserved nothing


@pytest.mark.parametrize("name", LIMIT_NAMES)
def test_each_limit_refuses_on_its_own(tmp_path: Path, name: str) -> None:
    limits = BudgetLimits(**{f"max_{name}": 10})
    ledger = Ledger(tmp_path, limits)
    unit = Usage(**{name: 4})
    ledger.reserve(unit)
    ledger.reserve(unit)
    with pytest.raises(BudgetExceeded, match=f"limit on {name}"):
        ledger.reserve(unit)
    ledger.reserve(Usage(**{name: 2}))  # exactly up to the limit is allowed
    other = next(n for n in LIMIT_NAMES if n != name)
    ledger.reserve(Usage(**{other: 10**6}))  # unlimited quantities are not checked


def test_money_adds_up_exactly_to_the_limit(tmp_path: Path) -> None:
    """0.1 + 0.2 != 0.3 in floats; the ledger sums pico-dollars so ten dimes fit in a dollar."""
    ledger = Ledger(tmp_path, BudgetLimits(max_cost_usd=1.0))
    for _ in range(10):
        ledger.settle(ledger.reserve(Usage(cost_usd=0.1)), Usage(cost_usd=0.1), _record())
    assert ledger.spent().cost_usd == 1.0
    with pytest.raises(BudgetExceeded):
        ledger.reserve(Usage(cost_usd=1e-9))
    ledger.reserve(Usage(queries=1))  # zero cost still fits


def test_zero_limit_refuses_everything_that_costs(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, BudgetLimits(max_queries=0))
    with pytest.raises(BudgetExceeded, match="limit 0"):
        ledger.reserve(Usage(queries=1))
    ledger.record_hits(5, provider="p", model="m", endpoint="e")  # hits are free


# -- concurrency: the property -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One concurrent request: what it reserves, what it really uses, and whether it fails."""

    asked: Usage
    actual: Usage
    fails: bool
    billed_on_failure: float


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    queries = draw(st.integers(0, 16))
    tokens = draw(st.integers(0, 2000))
    cost = draw(st.integers(0, 5000)) / 100_000  # up to $0.05 in 1e-5 steps
    asked = Usage(queries, 1, tokens, cost)
    actual = Usage(
        draw(st.integers(0, queries)),
        1,
        draw(st.integers(0, tokens)),
        cost * draw(st.sampled_from([0, 0.5, 1])),
    )
    fails = draw(st.booleans())
    billed = draw(st.sampled_from([0.0, cost])) if fails else 0.0
    return Plan(asked, actual, fails, billed)


limit_values = st.one_of(st.none(), st.integers(0, 400))


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    limits=st.builds(
        BudgetLimits,
        max_queries=limit_values,
        max_requests=st.one_of(st.none(), st.integers(0, 64)),
        max_input_tokens=st.one_of(st.none(), st.integers(0, 40_000)),
        max_cost_usd=st.one_of(st.none(), st.integers(0, 100).map(lambda c: c / 100)),
    ),
    requests=st.lists(plans(), min_size=64, max_size=64),
    seed=st.integers(0, 2**16),
)
def test_64_concurrent_tasks_never_exceed_the_limits(
    limits: BudgetLimits, requests: list[Plan], seed: int
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(folder, limits)
        violations: list[str] = []
        settled: list[Usage] = []

        async def one(plan: Plan) -> bool:
            await asyncio.sleep(rng.random() / 1000)
            try:
                res = await asyncio.to_thread(ledger.reserve, plan.asked)
            except BudgetExceeded:
                return False
            balance = await asyncio.to_thread(ledger.balance)
            if not _within(balance.committed, limits):
                violations.append(f"{balance} over {limits}")
            await asyncio.sleep(rng.random() / 1000)  # the request is in flight
            if plan.fails:
                record = _record(status="error", cost_usd=plan.billed_on_failure)
                await asyncio.to_thread(ledger.refund, res, record)
                settled.append(Usage(cost_usd=plan.billed_on_failure))
            else:
                await asyncio.to_thread(ledger.settle, res, plan.actual, _record())
                settled.append(plan.actual)
            balance = await asyncio.to_thread(ledger.balance)
            if not _within(balance.committed, limits):
                violations.append(f"{balance} over {limits}")
            return True

        async def main() -> list[bool]:
            return await asyncio.gather(*(one(p) for p in requests))

        accepted = asyncio.run(main())
        final = ledger.balance()
        records = ledger.records()
        summary = ledger.summary()
        ledger.close()

    assert violations == []
    assert final.reserved == Usage()
    expected = sum(settled, Usage())
    assert final.spent.as_ints() == expected.as_ints()
    assert _within(final.spent, limits)
    assert len(records) == sum(accepted) == len(settled)
    # The records tell the same story as the totals.
    assert summary.queries_paid == final.spent.queries
    assert summary.input_tokens == final.spent.input_tokens
    assert summary.cost_usd == pytest.approx(final.spent.cost_usd, abs=1e-9)
    assert summary.requests == sum(accepted)
    if limits == BudgetLimits():
        assert all(accepted)
    # The first request to arrive found an empty ledger: if every request fits alone, one won.
    if all(_within(p.asked, limits) for p in requests):
        assert any(accepted)


def test_threads_never_exceed_the_limit(tmp_path: Path) -> None:
    limits = BudgetLimits(max_queries=300, max_cost_usd=0.5)
    ledger = Ledger(tmp_path, limits)

    def worker(seed: int) -> tuple[int, int]:
        rng = random.Random(seed)
        paid = refused = 0
        for _ in range(40):
            asked = Usage(rng.randint(1, 8), 1, 0, rng.randint(1, 10) / 1000)
            try:
                res = ledger.reserve(asked)
            except BudgetExceeded:
                refused += 1
                continue
            assert _within(ledger.balance().committed, limits)
            if rng.random() < 0.2:
                ledger.refund(res, _record(status="error"))
            else:
                ledger.settle(res, asked, _record())
                paid += asked.queries
        return paid, refused

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(worker, range(16)))
    spent = ledger.spent()
    assert spent.queries == sum(paid for paid, _ in results)
    assert _within(spent, limits)
    assert ledger.reserved() == Usage()
    # 640 requests of ~4.5 queries and ~$0.0055 ask far more than allowed: the limits bound.
    assert sum(refused for _, refused in results) > 0


# -- two processes -------------------------------------------------------------------------

_SPENDER = textwrap.dedent(
    """
    import json, sys, time
    from dect_maas import BudgetExceeded, BudgetLimits, Ledger, LedgerRecord, Usage
    folder, name = sys.argv[1], sys.argv[2]
    ledger = Ledger(folder, BudgetLimits(max_queries=250, max_requests=1000), run_id=name)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    record = LedgerRecord(provider="local", model="tiny", endpoint="/v1/features")
    ok, window = 0, []
    while True:  # up to 4 requests in flight, until the whole budget is committed
        try:
            window.append(ledger.reserve(Usage(queries=1, requests=1)))
            if len(window) < 4:
                continue
        except BudgetExceeded:
            if not window:
                if ledger.balance().committed.queries >= 250:
                    break
                time.sleep(0.001)
                continue
        ledger.settle(window.pop(0), Usage(queries=1, requests=1), record)
        ok += 1
    print(json.dumps({"ok": ok}))
    """
)


def test_two_processes_sharing_a_ledger_stay_within_the_limit(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SPENDER, str(tmp_path), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("proc-a", "proc-b")
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    oks = []
    for proc in procs:
        out, err = proc.communicate("go\n", timeout=120)
        assert proc.returncode == 0, err
        oks.append(json.loads(out)["ok"])
    ledger = Ledger(tmp_path)
    assert sum(oks) == 250  # together exactly the limit, never more
    assert ledger.spent() == Usage(queries=250, requests=250)
    assert ledger.spent("proc-a").queries == oks[0]
    assert ledger.spent("proc-b").queries == oks[1]
    assert len(ledger.records()) == 250
    assert ledger.reserved() == Usage()


# -- secrets -------------------------------------------------------------------------------


def test_a_known_key_never_reaches_the_ledger(tmp_path: Path) -> None:
    """The key is held by a fake client only; nothing it records or raises may carry it."""

    @dataclass
    class FakeClient:
        api_key: str
        base_url: str = "https://api.example/v1"

        def __repr__(self) -> str:
            return f"FakeClient(base_url={self.base_url!r}, api_key='***')"

    client = FakeClient(api_key=FAKE_KEY)
    folder = tmp_path / "ledger"
    ledger = Ledger(folder, BudgetLimits(max_queries=10, max_cost_usd=0.01))
    res = ledger.reserve(
        Usage(4, 1, 10, 0.001), provider="openai", model="m", endpoint=client.base_url
    )
    ledger.settle(
        res,
        Usage(4, 1, 10, 0.001),
        LedgerRecord(provider="openai", model="m", endpoint="/completions"),
    )
    res = ledger.reserve(Usage(4, 1), provider="openai", model="m", endpoint="/completions")
    ledger.refund(
        res,
        LedgerRecord(
            provider="openai",
            model="m",
            endpoint=f"{client.base_url}/completions?api_key={client.api_key}",
            status="error",
            error=f"401 from {client.base_url}/completions?key={client.api_key}",
        ),
    )
    ledger.record_hits(3, provider="openai", model="m", endpoint="/completions")
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve(Usage(queries=7))
    exports = [ledger.export_csv(tmp_path / "l.csv"), ledger.export_jsonl(tmp_path / "l.jsonl")]
    texts = [
        repr(ledger),
        repr(client),
        str(info.value),
        repr(ledger.records()),
        repr(ledger.summary()),
        repr(ledger.balance()),
        repr(res),
    ]
    ledger.close()
    assert all(FAKE_KEY not in t for t in texts)
    files = [p for p in folder.rglob("*") if p.is_file()] + exports
    assert len(files) >= 2
    assert [p for p in files if FAKE_KEY.encode() in p.read_bytes()] == []

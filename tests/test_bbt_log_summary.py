"""benchmarks/bbt_log_summary.py: a BBT run cut short and resumed, put back on one clock."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bbt_log_summary.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bbt_log_summary", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(calls: int, seconds: float, test: float | None = None) -> str:
    point: dict[str, object] = {"calls": calls, "train_loss": 1.0 / calls, "train_acc": 1.0}
    if test is not None:
        point["test_accuracy"] = test
    point["seconds"] = seconds
    stamp = f"2026-12-05 10:00:{int(seconds) % 60:02d},000"
    return f"{stamp} dect_maas.experiments.bbt bbt {json.dumps(point)}"


def _paid(queries: int, seconds: float) -> str:
    return (
        "2026-12-05 10:00:00,000 dect_maas local POST http://127.0.0.1:1/v1/features for "
        f"example(s) 0, 1: {queries} queries, {queries * 80} tokens, 1 attempt(s), {seconds:.3f}s"
    )


def test_a_resumed_run_counts_each_paid_call_once_and_leaves_out_the_replay(
    tmp_path: Path,
) -> None:
    start = "2026-12-05 10:00:00,000 dect_maas.experiment bbt: 4 shots, seed 0"
    # leg 1: DecT's batched queries before BBT (not calls), 4 calls of 9 queries, one curve
    # evaluation (a 5-row request), then killed
    leg1 = [_paid(64, 9.0), start]
    leg1 += [_paid(9, 1.0), _paid(9, 1.0), _point(2, 2.0), _paid(5, 0.5)]
    leg1 += [_paid(9, 1.0), _paid(9, 1.0), _point(4, 4.5, test=0.7)]
    # leg 2 replays calls 1-4 from the cache in 0.2 s (nothing paid), then pays 2 more
    leg2 = [start, _point(2, 0.1), _point(4, 0.2, test=0.7)]
    leg2 += [_paid(9, 2.0), _paid(9, 2.0), _point(6, 4.2, test=0.8)]
    logs = []
    for i, lines in enumerate([leg1, leg2]):
        logs.append(tmp_path / f"leg{i}.log")
        # an abandoned start the day before in the same file: left out by --since
        older = [start.replace("12-05", "12-04"), _paid(9, 50.0).replace("12-05", "12-04")]
        logs[-1].write_text("\n".join([*older, *lines]) + "\n")
    bench = _bench()
    out = bench.combine([bench.read_leg(p, "2026-12-05T00:00") for p in logs])
    assert out["call_size_queries"] == 9
    assert out["calls"] == 6
    assert out["paid_training_calls"] == 6
    assert out["paid_training_call_seconds"] == pytest.approx(8.0)
    assert out["seconds_per_call"] == pytest.approx(8.0 / 6, abs=1e-3)
    assert [leg["paid_training_calls"] for leg in out["legs"]] == [4, 2]
    assert out["legs"][1]["replayed_to_calls"] == 4
    assert out["legs"][1]["replay_seconds"] == pytest.approx(0.2)
    # the curve: each point once; leg 2's point sits after leg 1's 4.5 s, its replay left out
    assert [(p["calls"], p["test_accuracy"]) for p in out["curve"]] == [(4, 0.7), (6, 0.8)]
    assert [p["seconds"] for p in out["curve"]] == pytest.approx([4.5, 4.5 + 4.0])
    table = bench.markdown(out, every=2)
    assert "| 6 | 0.1667 | 1.000 | 80 % | 8 |" in table


def test_logs_without_a_paid_call_are_an_error_that_says_so(tmp_path: Path) -> None:
    log = tmp_path / "empty.log"
    log.write_text("2026-12-05 10:00:00,000 dect_maas local /v1/models: free\n")
    bench = _bench()
    with pytest.raises(SystemExit, match="no paid BBT request"):
        bench.combine([bench.read_leg(log, None)])

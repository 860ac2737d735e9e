"""Reports: JSON parses back to the numbers, Markdown has mean ± std, plots are PNGs.

Reaches inside: the report writers and the runner's per-method records are under test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dect_maas import ExperimentConfig, ExperimentResult
from dect_maas.experiments.report import PLOTS_MISSING, format_table, write_report
from dect_maas.experiments.runner import MethodRun, QueryPlan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result(tmp_path: Path, *, cost: float = 0.0, queries: int = 13) -> ExperimentResult:
    cfg = ExperimentConfig.from_dict(
        {
            "name": "toy",
            "provider": {
                "kind": "openai",
                "model": "m",
                "base_url": "http://127.0.0.1:9",
                "api_key_env": "K",
            },
            "task": {
                "template": "{text} It was {mask}",
                "label_words": {"neg": "bad", "pos": "good"},
            },
            "data": {"train": {"path": "tr.jsonl"}, "test": {"path": "te.jsonl"}},
            "shots": [1, 4],
            "seeds": [0, 1],
            "methods": ["dect", "zero_shot"],
        },
        base_dir=tmp_path,
    )
    accs = {
        ("dect", 1): [0.6, 0.7],
        ("dect", 4): [0.8, 0.9],
        ("zero_shot", 1): [0.55, 0.55],
        ("zero_shot", 4): [0.55, 0.55],
    }
    runs = [
        MethodRun(
            method=m,
            shots=k,
            seed=s,
            accuracy=a,
            macro_f1=a - 0.01,
            fit_seconds=0.02 * (s + 1),
            predict_seconds=0.001,
            n_train=2 * k,
        )
        for (m, k), values in accs.items()
        for s, a in enumerate(values)
    ]
    plan = QueryPlan(
        n_test=4,
        n_train_pool=10,
        n_train_union=8,
        train_indices={(1, 0): (0, 1), (1, 1): (2, 3), (4, 0): tuple(range(8)), (4, 1): (0,)},
        union=tuple(range(8)),
    )
    return ExperimentResult(
        run_id="toy-1",
        config=cfg,
        runs=runs,
        plan=plan,
        usage={
            "queries_paid": queries,
            "cache_hits": 2,
            "requests": 5,
            "input_tokens": 99,
            "cost_usd": cost,
        },
        model="tiny",
        model_fingerprint="fp-123",
        classes=("neg", "pos"),
        wall_seconds=3.5,
        query_seconds=1.25,
        started_at="2026-11-27T20:00:00+00:00",
        versions={"python": "3.11"},
    )


def test_json_report_round_trips_the_numbers(tmp_path: Path) -> None:
    result = make_result(tmp_path)
    files = write_report(result, tmp_path / "run")
    data = json.loads(files["json"].read_text())
    assert data["run_id"] == "toy-1"
    assert data["model_fingerprint"] == "fp-123"
    assert data["config"]["provider"]["api_key_env"] == "K"
    assert data["usage"]["queries_paid"] == 13
    assert len(data["runs"]) == 8
    summary = {(s["method"], s["shots"]): s for s in data["summary"]}
    assert summary[("dect", 1)]["accuracy_mean"] == pytest.approx(0.65)
    assert summary[("dect", 1)]["accuracy_std"] == pytest.approx(0.0707107)  # sample std
    assert summary[("dect", 4)]["accuracy_mean"] == pytest.approx(0.85)
    assert summary[("zero_shot", 4)]["accuracy_std"] == pytest.approx(0.0)
    assert summary[("dect", 4)]["fit_seconds_mean"] == pytest.approx(0.03)
    assert data["plan"]["train_indices"]["1shot-seed1"] == [2, 3]


def test_markdown_table_has_mean_and_std_per_method_and_shot(tmp_path: Path) -> None:
    result = make_result(tmp_path)
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0] == "| method | 1-shot | 4-shot | fit time (mean) |"
    assert lines[2] == "| DecT | 65.0 ± 7.1 | 85.0 ± 7.1 | 30.0 ms |"
    assert lines[3].startswith("| zero-shot | 55.0 ± 0.0 | 55.0 ± 0.0 |")
    md = write_report(result, tmp_path / "run")["markdown"].read_text()
    assert table in md
    assert "queries paid this run: 13; cache hits: 2; requests: 5; input tokens: 99" in md
    assert "4 test + 8 training" in md
    plain = format_table(result, markdown=False).splitlines()
    assert plain[2].split() == ["DecT", "65.0", "±", "7.1", "85.0", "±", "7.1", "30.0", "ms"]


def test_zero_paid_queries_are_said_in_words(tmp_path: Path) -> None:
    md = write_report(make_result(tmp_path, queries=0), tmp_path / "run")["markdown"].read_text()
    assert "this run paid zero queries" in md


def test_plots_are_pngs_including_money_axis_when_priced(tmp_path: Path) -> None:
    files = write_report(make_result(tmp_path, cost=0.013), tmp_path / "run")
    for name in ("accuracy_vs_shots", "accuracy_vs_queries"):
        assert files[name].read_bytes()[:8] == PNG_MAGIC
        assert files[name].stat().st_size > 5000
    md = files["markdown"].read_text()
    assert "![accuracy_vs_shots](accuracy_vs_shots.png)" in md
    assert "cost: $0.0130" in md


def test_without_matplotlib_the_report_says_how_to_get_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    files = write_report(make_result(tmp_path), tmp_path / "run")
    assert "accuracy_vs_shots" not in files
    assert not (tmp_path / "run" / "accuracy_vs_shots.png").exists()
    assert PLOTS_MISSING in files["markdown"].read_text()
    assert "pip install 'dect-maas[plots]'" in PLOTS_MISSING
    assert json.loads(files["json"].read_text())["notes"] == [PLOTS_MISSING]


def test_censored_share_per_class_is_in_the_report_and_the_summary(tmp_path: Path) -> None:
    from dataclasses import replace

    from dect_maas import Features
    from dect_maas.experiments.report import usage_lines, write_report
    from dect_maas.experiments.runner import censored_share

    feats = Features(
        [[-1.0, -2.0], [-1.5, -3.0], [-2.0, -3.0], [-1.0, -2.5]],
        censored=[[False, True], [False, True], [True, True], [False, False]],
    )
    share = censored_share(feats, ["neg", "pos"])
    assert share == {"neg": 0.25, "pos": 0.75}
    assert censored_share(Features([[0.0, 1.0]]), ["neg", "pos"]) == {}  # exact scores
    result = replace(make_result(tmp_path), censored=share)
    line = next(x for x in usage_lines(result) if x.startswith("censored"))
    assert "50.0% (neg 25%, pos 75%)" in line
    assert "affects dect, zero_shot" in line
    files = write_report(result, tmp_path / "out")
    data = json.loads(files["json"].read_text())
    assert data["censored"] == {
        "per_class": {"neg": 0.25, "pos": 0.75},
        "overall": 0.5,
        "methods_affected": ["dect", "zero_shot"],
    }
    assert "pos 75%" in files["markdown"].read_text()
    exact = make_result(tmp_path)
    assert not any(x.startswith("censored") for x in usage_lines(exact))


def test_dollars_print_as_plain_decimals(tmp_path: Path) -> None:
    from dect_maas.experiments.report import usage_lines

    line = next(x for x in usage_lines(make_result(tmp_path, cost=0.000514)) if "cost" in x)
    assert line == "cost: $0.000514"

"""The experiment runner through its public surface: ``Experiment`` against a real local server.

A tiny random model scores at chance, so these tests check what the runner promises about queries,
plans, budgets and results, not accuracy.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dect_maas import (
    BudgetExceeded,
    ConfigError,
    Experiment,
    ExperimentResult,
    Ledger,
    MultiTokenLabelWarning,
)

server_testing = pytest.importorskip("dect_maas_server.testing")
pytestmark = pytest.mark.slow  # starts a server process

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
N_TEST = 24
METHODS = ["dect", "zero_shot", "calibrated_zero_shot", "prototype", "linear_probe"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = server_testing.make_tiny_model("causal", tmp_path_factory.mktemp("tiny") / "causal")
    with server_testing.run_server(model) as url:
        yield url


@pytest.fixture(autouse=True)
def _multi_token_labels_are_expected() -> Iterator[None]:
    with warnings.catch_warnings():
        # the tiny model's tokenizer splits the label words into several tokens
        warnings.simplefilter("ignore", MultiTokenLabelWarning)
        yield


def config(folder: Path, url: str, **more: Any) -> dict[str, Any]:
    return {
        "name": "runner-test",
        "shots": [1, 4],
        "seeds": [0, 1],
        "methods": METHODS,
        "cache_dir": str(folder / "cache"),
        "ledger_dir": str(folder / "ledger"),
        "output_dir": str(folder / "runs"),
        "provider": {"kind": "local", "base_url": url},
        "task": {
            "template": "{text} In summary, it was {mask}",
            "label_words": {"negative": "terrible", "positive": "great"},
        },
        "data": {
            "train": {"path": str(DATA / "movies_train.jsonl")},
            "test": {"path": str(DATA / "movies_test.jsonl"), "limit": N_TEST},
        },
        **more,
    }


def paid(folder: Path, run_id: str) -> int:
    with Ledger(folder / "ledger") as ledger:
        return ledger.summary(run_id).queries_paid


def test_plan_draws_every_shot_set_first_and_queries_their_union_once() -> None:
    exp = Experiment.from_config(config(Path("unused"), "http://127.0.0.1:1"))
    plan = exp.plan()
    assert plan.n_test == N_TEST
    assert plan.n_train_pool == 400
    assert set(plan.train_indices) == {(1, 0), (1, 1), (4, 0), (4, 1)}
    drawn = {i for idx in plan.train_indices.values() for i in idx}
    assert plan.union == tuple(sorted(drawn))
    assert plan.n_train_union == len(drawn) <= 2 * (1 + 4) * 2
    assert all(len(idx) == 2 * k for (k, _), idx in plan.train_indices.items())
    assert plan.n_examples == N_TEST + len(drawn)
    # the same config draws the same sets: a rerun finds its answers in the cache
    assert Experiment.from_config(config(Path("unused"), "http://127.0.0.1:1")).plan() == plan


def test_run_pays_each_example_once_and_a_rerun_pays_nothing(
    tmp_path: Path, server_url: str
) -> None:
    exp = Experiment.from_config(config(tmp_path, server_url))
    plan = exp.plan()
    to_pay = plan.n_examples + 1  # + the content-free prompt
    before = exp.estimate()
    assert (before.queries, before.cached_queries) == (to_pay, 0)

    events: list[str] = []
    result = exp.run(on_event=events.append)
    assert isinstance(result, ExperimentResult)
    assert paid(tmp_path, exp.run_id) == result.queries_paid == to_pay
    assert result.methods == METHODS
    assert result.shots == [1, 4]
    assert len(result.runs) == len(METHODS) * 2 * 2
    for run in result.runs:
        assert run.n_train == 2 * run.shots
        assert 0.0 <= run.accuracy <= 1.0
    mean, _ = result.accuracy("dect", 4)
    assert mean == pytest.approx(sum(r.accuracy for r in result.select("dect", 4)) / 2)
    assert "| dect |" in result.table(markdown=True).replace("DecT", "dect")
    assert f"queries paid this run: {to_pay}" in result.cost_summary()
    assert result.output_dir is not None
    report = json.loads((result.output_dir / "report.json").read_text())
    assert report["run_id"] == exp.run_id == result.run_id

    again = Experiment.from_config(config(tmp_path, server_url))
    assert again.estimate().cached_queries == to_pay
    second = again.run(write_report=False)
    assert second.queries_paid == 0
    assert second.cache_hits == to_pay
    assert second.output_dir is None
    assert [r.accuracy for r in second.runs if r.method == "zero_shot"] == [
        r.accuracy for r in result.runs if r.method == "zero_shot"
    ]


def test_a_budget_stops_the_run_before_sending_and_a_larger_one_resumes(
    tmp_path: Path, server_url: str
) -> None:
    tight = config(tmp_path, server_url, budget={"max_queries": 10})
    exp = Experiment.from_config(tight)
    to_pay = exp.plan().n_examples + 1
    with pytest.raises(BudgetExceeded) as caught:
        exp.run(write_report=False)
    assert caught.value.limit == "queries"
    first = paid(tmp_path, exp.run_id)
    assert first <= 10  # nothing past the limit was sent
    resumed = Experiment.from_config(tight, overrides={"budget": {"max_queries": 10 + to_pay}}).run(
        write_report=False
    )
    assert resumed.queries_paid == to_pay - first  # only what the cache lacked
    assert resumed.cache_hits == first


def test_overrides_merge_before_validation_and_bad_settings_name_the_key(tmp_path: Path) -> None:
    base = config(tmp_path, "http://127.0.0.1:1")
    exp = Experiment.from_config(base, overrides={"shots": [2], "seeds": [7]})
    assert set(exp.plan().train_indices) == {(2, 7)}
    with pytest.raises(ConfigError, match="colour: unknown key"):
        Experiment.from_config(base, overrides={"colour": 3})
    with pytest.raises(ConfigError, match=r"^data\.train \(.*missing\.jsonl\): file not found$"):
        Experiment.from_config(
            base, overrides={"data": {"train": {"path": str(tmp_path / "missing.jsonl")}}}
        ).plan()

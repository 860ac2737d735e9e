"""Input-side methods (ICL, BBT) through the same client, cache, budget and ledger.

The pure parts (demonstrations, their order and cut, BBT's loss and projection) are checked on
small values; the runs go through a real local server (tiny causal model, loopback) and are
checked against the ledger: queries, tokens, calls.

Reaches inside: the pure parts of ICL and BBT and the cost rows are checked alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from dect_maas import Experiment, Ledger, Task, UnsupportedCapability
from dect_maas.experiments.bbt import bbt_loss, random_projection
from dect_maas.experiments.icl import (
    ICLTask,
    demonstration,
    demonstration_order,
    demonstrations_kept,
)

dect_maas_server = pytest.importorskip("dect_maas_server")
from dect_maas_server.testing import make_tiny_model, run_server  # noqa: E402

TEMPLATE = "{text} In summary, it was {mask}"
WORDS = {"negative": "terrible", "positive": "great"}


# -- demonstrations -------------------------------------------------------------------------------


def test_demonstration_puts_the_label_word_at_the_scoring_position() -> None:
    causal = Task(TEMPLATE, WORDS)
    assert demonstration(causal, "A {dull} film.", None, "negative") == (
        "A {dull} film. In summary, it was terrible"
    )
    masked = Task("[ Topic : {mask} ] {text}", {"sport": "sports", "world": "politics"})
    assert demonstration(masked, "Goal!", None, "sport") == "[ Topic : sports ] Goal!"
    no_mask = Task("Review: {text}\nSentiment:", WORDS, label_word_prefix=" ")
    assert demonstration(no_mask, "Fine.", None, "positive") == "Review: Fine.\nSentiment: great"


def test_icl_task_prefixes_every_prompt_including_the_content_free_one() -> None:
    task = ICLTask(TEMPLATE, WORDS, demonstrations="D1\n\nD2\n\n")
    assert task.render("New.") == "D1\n\nD2\n\nNew. In summary, it was"
    assert task.content_free() == "D1\n\nD2\n\n" + Task(TEMPLATE, WORDS).content_free()
    assert task.render("x", mask_token="<mask>").endswith("it was <mask>")


def test_demonstration_order_is_a_seeded_permutation_of_the_shots() -> None:
    shots = [5, 9, 2, 7, 11, 3]
    a, b = demonstration_order(shots, 0), demonstration_order(shots, 0)
    assert a == b
    assert sorted(a) == sorted(shots)
    perm = np.random.RandomState(0).permutation(6)
    assert a == [shots[i] for i in perm]
    assert demonstration_order(shots, 1) != a


def test_demonstrations_are_cut_from_the_front_to_fit() -> None:
    demos = ["a" * 10, "b" * 20, "c" * 30]  # 10, 20, 30 bytes; separator 2 bytes
    prompt = "p" * 40  # 40 + 4 special
    assert demonstrations_kept(demos, "\n\n", prompt, None) == 3
    assert demonstrations_kept(demos, "\n\n", prompt, 44 + 12 + 22 + 32) == 3
    assert demonstrations_kept(demos, "\n\n", prompt, 44 + 22 + 32) == 2  # the first one goes
    assert demonstrations_kept(demos, "\n\n", prompt, 44 + 31) == 0  # the nearest does not fit
    assert demonstrations_kept(demos, "\n\n", prompt, 10) == 0


# -- BBT's pieces ---------------------------------------------------------------------------------


def test_bbt_losses_match_torch() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(7, 3)) * 3
    y = rng.integers(0, 3, size=7)
    ce = torch.nn.functional.cross_entropy(torch.tensor(s), torch.tensor(y))
    hinge = torch.nn.MultiMarginLoss()(torch.tensor(s), torch.tensor(y))
    assert bbt_loss(s, y, "ce") == pytest.approx(float(ce), abs=1e-9)
    assert bbt_loss(s, y, "hinge") == pytest.approx(float(hinge), abs=1e-9)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_random_projection_is_fixed_by_its_seed_with_the_stated_spread(kind: str) -> None:
    a = random_projection(5, 40, 30, std=0.02, kind=kind, seed=3)
    assert a.shape == (200, 30)
    assert a.dtype == np.float32
    assert np.array_equal(a, random_projection(5, 40, 30, std=0.02, kind=kind, seed=3))
    assert float(a.std()) == pytest.approx(0.02, rel=0.05)


# -- runs through a real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("causal", tmp_path_factory.mktemp("tiny") / "causal")


@pytest.fixture(scope="module")
def server_url(causal_model: Path) -> Iterator[str]:
    with run_server(causal_model, max_input_tokens=2048) as url:
        yield url


_POS = ["fun", "great", "loved", "wonderful", "amazing", "enjoyable", "nice", "brilliant"]
_NEG = ["dull", "awful", "hated", "boring", "terrible", "poor", "horrible", "mediocre"]


def short_data(folder: Path) -> tuple[Path, Path]:
    """Short reviews in the tiny tokenizer's words: demonstrations fit its 256 positions."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    train = [(f"a {w} movie", "positive") for w in _POS] + [
        (f"a {w} film", "negative") for w in _NEG
    ]
    test = [(f"the story was {w}", "positive") for w in _POS[:5]] + [
        (f"the acting was {w}", "negative") for w in _NEG[:5]
    ]
    paths = []
    for name, rows in (("train", train), ("test", test)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
        paths.append(path)
    return paths[0], paths[1]


def config(url: str, folder: Path, **extra: Any) -> dict[str, Any]:
    train, test = short_data(folder / "data")
    cfg: dict[str, Any] = {
        "name": "input-side",
        "provider": {"kind": "local", "base_url": url},
        "task": {"template": TEMPLATE, "label_words": WORDS},
        "data": {"train": {"path": str(train)}, "test": {"path": str(test)}},
        "shots": [2],
        "seeds": [0],
        "cache_dir": str(folder / "cache"),
        "ledger_dir": str(folder / "ledger"),
        "output_dir": str(folder / "runs"),
    }
    cfg.update(extra)
    return cfg


def load_benchmark(name: str) -> Any:
    """A script of ``benchmarks/`` as a module, to call its ``main`` with arguments."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paid(folder: Path, run_id: str) -> int:
    ledger = Ledger(folder / "ledger")
    try:
        return ledger.summary(run_id).queries_paid
    finally:
        ledger.close()


def test_icl_costs_what_the_ledger_records(server_url: str, tmp_path: Path) -> None:
    # The tiny model reads 256 tokens; the byte bound keeps every prompt within 250.
    cfg = config(server_url, tmp_path, methods=["dect", "icl", "calibrated_icl"], shots=[2, 4])
    cfg["icl"] = {"max_prompt_tokens": 250}
    result = Experiment.from_config(cfg).run()
    icl = result.select("icl", 4)[0]
    cal = result.select("calibrated_icl", 4)[0]
    assert icl.cost is not None
    assert cal.cost == icl.cost  # one set of queries, two scorings
    assert icl.cost["train_queries"] == 0
    assert icl.cost["demonstrations"] == 8
    # the prompts sent, rebuilt here: demonstrations in the seeded order, cut from the front
    exp = Experiment.from_config(cfg)
    tr, te = exp.data()
    idx = exp.plan().train_indices[(4, 0)]
    demos = [
        demonstration(exp.task, tr.texts[i], None, tr.labels[i])
        for i in demonstration_order(idx, 0)
    ]
    plain = Task(TEMPLATE, WORDS)
    kept = [demonstrations_kept(demos, "\n\n", plain.render(t), 250) for t in te.texts]
    assert icl.cost["demonstrations_kept_min"] == min(kept)
    assert icl.cost["demonstrations_kept_mean"] == pytest.approx(np.mean(kept))
    assert icl.cost["prompts_cut"] == sum(1 for m in kept if m < 8)
    assert min(kept) > 0
    groups = sorted(set(kept))
    # the test prompts + one content-free prompt per number of demonstrations kept, all paid
    assert icl.cost["queries_paid"] == 10 + len(groups)
    prompts = []
    for j, t in enumerate(te.texts):
        used = demos[len(demos) - kept[j] :] if kept[j] else []
        prompts.append(
            ICLTask(TEMPLATE, WORDS, demonstrations="".join(d + "\n\n" for d in used)).render(t)
        )
    for m in groups:
        used = demos[len(demos) - m :] if m else []
        prompts.append(
            ICLTask(
                TEMPLATE, WORDS, demonstrations="".join(d + "\n\n" for d in used)
            ).content_free()
        )
    # the tokens the ledger holds are those of exactly these prompts, as the server counts them
    with httpx.Client(base_url=server_url) as http:
        n_tok = [len(http.post("/v1/tokenize", json={"text": p}).json()["tokens"]) for p in prompts]
    assert max(n_tok) <= 250
    assert icl.cost["input_tokens"] == sum(n_tok)
    assert icl.cost["tokens_per_prediction"] == pytest.approx(sum(n_tok) / len(prompts))
    dect_per_query = result.usage["input_tokens"] / result.queries_paid
    assert icl.cost["tokens_per_prediction"] > 1.5 * dect_per_query
    assert 0.0 <= icl.accuracy <= 1.0
    # a second run is answered from the cache
    again = Experiment.from_config(cfg).run()
    assert again.queries_paid == 0
    assert again.select("icl", 4)[0].accuracy == icl.accuracy


def test_icl_cut_to_max_prompt_tokens_is_reported(server_url: str, tmp_path: Path) -> None:
    cfg = config(server_url, tmp_path, methods=["icl"], icl={"max_prompt_tokens": 100})
    run = Experiment.from_config(cfg).run().select("icl", 2)[0]
    assert run.cost is not None
    assert run.cost["prompts_cut"] > 0
    assert run.cost["demonstrations_kept_min"] < 4
    assert run.cost["demonstrations_kept_mean"] > 0
    full = Experiment.from_config(config(server_url, tmp_path / "full", methods=["icl"])).run()
    full_run = full.select("icl", 2)[0]
    assert full_run.cost is not None
    assert run.cost["tokens_per_prediction"] < full_run.cost["tokens_per_prediction"]


def test_bbt_spends_its_budget_in_calls_and_improves_the_training_loss(
    server_url: str, tmp_path: Path
) -> None:
    bbt = {"intrinsic_dim": 16, "prompt_length": 3, "popsize": 4, "budget": 40, "curve_every": 20}
    cfg = config(server_url, tmp_path, methods=["dect", "bbt"], bbt=bbt)
    result = Experiment.from_config(cfg).run()
    run = result.select("bbt", 2)[0]
    c = run.cost
    assert c is not None
    assert c["calls"] == 40
    assert c["train_requests"] == 40  # one call, one request, carrying the 4 shots + content-free
    assert c["train_queries"] == 40 * (4 + 1)
    # the curve's test evaluations pay 10 test queries per new best prompt (its content-free
    # prompt was paid in training); the final evaluation repeats the last one, from the cache
    assert c["curve_eval_queries"] in (10, 20)
    assert c["queries_paid"] == c["train_queries"] + c["curve_eval_queries"]
    curve = c["curve"]
    assert [p["calls"] for p in curve] == list(range(4, 41, 4))
    losses = [p["train_loss"] for p in curve]
    assert losses == sorted(losses, reverse=True)  # the best so far never gets worse
    assert losses[-1] < losses[0]
    assert [p["calls"] for p in curve if "test_accuracy" in p] == [20, 40]
    # the training tokens at each scored point grow with the calls and end at the total
    scored = [p for p in curve if "test_accuracy" in p]
    assert 0 < scored[0]["train_input_tokens"] < scored[1]["train_input_tokens"]
    assert scored[1]["train_input_tokens"] == c["train_input_tokens"]
    from dect_maas.experiments.cost_report import cost_rows

    row = next(r for r in cost_rows(result) if r["method"] == "bbt")
    assert row["calls"] == 40
    assert row["train_queries"] == 200
    assert row["train_tokens"] == c["train_input_tokens"]
    dect = next(r for r in cost_rows(result) if r["method"] == "dect")
    assert row["train_queries"] / dect["train_queries"] == 40  # 40 calls of the 5 queries
    # the queries are deterministic (seeded CMA-ES): a second run is all cache hits
    again = Experiment.from_config(cfg).run()
    assert again.queries_paid == 0
    assert again.select("bbt", 2)[0].accuracy == run.accuracy


def test_bbt_is_refused_before_any_query_without_a_soft_prompt_input(tmp_path: Path) -> None:
    masked = make_tiny_model("masked", tmp_path / "masked")
    with run_server(masked) as url:
        cfg = config(url, tmp_path, methods=["dect", "bbt"])
        cfg["provider"]["mask_token"] = "<mask>"
        exp = Experiment.from_config(cfg)
        with pytest.raises(UnsupportedCapability, match="declares no soft-prompt input"):
            exp.run()
        assert paid(tmp_path, exp.run_id) == 0
    cfg = config("http://127.0.0.1:1", tmp_path, methods=["bbt"])
    cfg["provider"] = {"kind": "openai", "base_url": "http://127.0.0.1:1", "model": "m"}
    with pytest.raises(UnsupportedCapability, match="openai provider does not declare"):
        Experiment.from_config(cfg).run()


def test_report_puts_every_method_on_one_footing(server_url: str, tmp_path: Path) -> None:
    cfg = config(server_url, tmp_path, methods=["dect", "icl"], predict_n=500)
    cfg["provider"]["price_per_million_input_tokens"] = 2.0
    result = Experiment.from_config(cfg).run()
    from dect_maas.experiments.cost_report import cost_rows

    rows = {r["method"]: r for r in cost_rows(result)}
    per_query = result.usage["input_tokens"] / result.queries_paid
    dect, icl = rows["dect"], rows["icl"]
    assert dect["train_queries"] == 2 * 2 + 1
    assert dect["train_tokens"] == pytest.approx(5 * per_query)
    assert dect["train_usd"] == pytest.approx(result.cost_usd / result.queries_paid * 5)
    assert dect["predict_n_tokens"] == pytest.approx(500 * per_query)
    assert dect["predict_n_usd"] == pytest.approx(500 * per_query * 2.0 / 1e6)
    run = result.select("icl", 2)[0]
    assert run.cost is not None
    assert icl["train_queries"] == 0
    assert icl["train_usd"] == 0.0
    assert icl["tokens_per_prediction"] == pytest.approx(run.cost["tokens_per_prediction"])
    assert icl["predict_n_usd"] == pytest.approx(500 * icl["tokens_per_prediction"] * 2e-6)
    assert icl["predict_n_usd"] > dect["predict_n_usd"]  # the demonstrations, on every one
    out = result.output_dir
    assert out is not None
    md = (out / "report.md").read_text()
    assert "## Cost on one footing" in md
    assert "| icl | 2 |" in md
    assert (out / "accuracy_vs_cost.png").stat().st_size > 0
    import json

    data = json.loads((out / "report.json").read_text())
    assert {r["method"] for r in data["cost_on_one_footing"]} == {"dect", "icl"}
    assert data["runs"][-1]["cost"]["queries_paid"] == run.cost["queries_paid"]


def test_bbt_without_cma_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    from dect_maas import ConfigError
    from dect_maas.experiments.bbt import check_bbt

    monkeypatch.setitem(sys.modules, "cma", None)  # import cma -> ImportError

    def no_client(*_: Any) -> Any:
        raise AssertionError("no client may be built")

    cfg = Experiment.from_config(config("http://127.0.0.1:1", tmp_path, methods=["bbt"]))
    with pytest.raises(ConfigError, match=r"pip install 'dect-maas\[bbt\]'"):
        check_bbt(cfg.config, no_client, "run")


def _recorded(result: Any, method: str) -> dict[str, float]:
    runs = [r for r in result.runs if r.method == method]
    return {
        key: sum(r.cost[key] for r in runs if r.cost is not None)
        for key in ("queries_paid", "requests", "input_tokens")
    }


def test_estimate_covers_icl_and_bbt_within_15_percent_of_what_the_run_records(
    server_url: str, tmp_path: Path
) -> None:
    # DecT first, as a user would: the server's metadata and the plain answers are then cached
    dect = Experiment.from_config(config(server_url, tmp_path, methods=["dect"], shots=[2, 4]))
    first = dect.run()
    icl = config(
        server_url,
        tmp_path,
        methods=["dect", "icl", "calibrated_icl"],
        shots=[2, 4],
        seeds=[0, 1],
        icl={"max_prompt_tokens": 250},
    )
    bbt = {"intrinsic_dim": 16, "prompt_length": 3, "popsize": 4, "budget": 40, "curve_every": 20}
    # one k-shot set: sets drawn with one seed share CMA-ES's draws, and so some answers
    bbt_cfg = config(server_url, tmp_path, methods=["dect", "bbt"], shots=[4], bbt=bbt)
    icl_est = Experiment.from_config(icl).estimate()
    bbt_est = Experiment.from_config(bbt_cfg).estimate()
    assert bbt_est.by_method["bbt"]["calls"] == 40
    assert bbt_est.by_method["bbt"]["train_queries"] == 40 * (8 + 1)
    for cfg, est, method, name in (
        (icl, icl_est, "icl", "icl+calibrated_icl"),
        (bbt_cfg, bbt_est, "bbt", "bbt"),
    ):
        result = Experiment.from_config(cfg).run()
        got, row = _recorded(result, method), est.by_method[name]
        assert row["queries_to_pay"] == pytest.approx(got["queries_paid"], rel=0.15), name
        assert row["requests"] == pytest.approx(got["requests"], rel=0.15), name
        assert row["input_tokens"] == pytest.approx(got["input_tokens"], rel=0.15), name
        # the whole run, DecT's own queries included, as the ledger holds it
        assert est.queries_to_pay == pytest.approx(paid(tmp_path, result.run_id), rel=0.15), name
    # ICL pays its demonstrations on every prediction: more tokens per query than DecT's
    row = icl_est.by_method["icl+calibrated_icl"]
    dect_per_query = first.usage["input_tokens"] / first.queries_paid
    assert row["tokens_per_prediction"] > 1.5 * dect_per_query


# -- the benchmark that puts the paper's ratios on the ledger -------------------------------------


def test_input_side_benchmark_writes_its_json_and_the_papers_ratios(
    server_url: str, tmp_path: Path
) -> None:
    """benchmarks/input_side.py end to end: its --json (Path arguments included) and the ratios,
    DecT's taken from the run that paid its queries, ICL and BBT run apart with --reference."""
    import json
    import shutil

    pytest.importorskip("cma")
    bench = load_benchmark("input_side")
    # a seed answered from the cache reports no tokens per prediction: left out, not a 0
    assert bench.mean_paid([None, 300.0, 250.0]) == pytest.approx(275.0)
    assert bench.mean_paid([None, None]) is None
    train, test = short_data(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(train, data / "movies_binary_train.jsonl")
    shutil.copy(test, data / "movies_binary_test.jsonl")
    common = ["--server-url", server_url, "--data-dir", str(data), "--sets", "movies_binary"]
    common += ["--shots", "2", "--seeds", "0", "--work", str(tmp_path / "work")]
    first, second = tmp_path / "dect.json", tmp_path / "input_side.json"
    assert bench.main([*common, "--methods", "dect", "--json", str(first)]) == 0
    dect = json.loads(first.read_text())["sets"]["movies_binary"]["methods"]["dect@2"]
    assert dect["train_queries"] == 2 * 2 + 1
    assert dect["tokens_per_prediction"] > 0
    assert dect["train_query_seconds"] > 0
    argv = [*common, "--methods", "icl", "--bbt-sets", "movies_binary", "--bbt-budget", "3"]
    argv += ["--bbt-prompt-length", "2", "--reference", str(first), "--json", str(second)]
    assert bench.main(argv) == 0
    out = json.loads(second.read_text())
    assert out["args"]["data_dir"] == str(data)
    icl = out["sets"]["movies_binary"]["methods"]["icl@2"]
    assert icl["ratio_tokens_per_prediction_over_dect"] == pytest.approx(
        icl["tokens_per_prediction"] / dect["tokens_per_prediction"]
    )
    assert icl["ratio_tokens_per_prediction_over_dect"] > 1  # the demonstrations ride along
    bbt = out["sets"]["movies_binary+bbt"]["methods"]["bbt@2"]
    assert bbt["calls"] == 3
    assert bbt["train_queries"] == 3 * 5
    assert bbt["ratio_train_queries_over_dect"] == pytest.approx(3.0)
    assert bbt["ratio_train_wall_over_dect"] == pytest.approx(
        (bbt["train_query_seconds"] + bbt["train_local_seconds"])
        / (dect["train_query_seconds"] + dect["train_local_seconds"])
    )


def test_bbt_curve_takes_dects_time_from_the_run_that_paid_it_and_none_from_a_replay(
    server_url: str, tmp_path: Path
) -> None:
    """benchmarks/bbt_curve.py: DecT's training time is its k·C + 1 queries at the features
    phase's seconds per query plus its fit; run again, everything is replayed from the cache and
    DecT's time is not reported (a fit-only figure would flatter it)."""
    import json

    pytest.importorskip("cma")
    bench = load_benchmark("bbt_curve")
    train, test = short_data(tmp_path / "data")
    argv = ["--server-url", server_url, "--train", str(train), "--test", str(test)]
    argv += ["--shots", "2", "--budget", "3", "--curve-every", "3", "--bbt-test-limit", "4"]
    argv += ["--work", str(tmp_path / "work")]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert bench.main([*argv, "--json", str(first)]) == 0
    out = json.loads(first.read_text())
    assert out["dect_train_queries"] == 2 * 2 + 1
    assert out["dect_train_wall_seconds"] > out["dect_fit_seconds"] > 0
    assert out["ratio_train_queries_bbt_over_dect"] == pytest.approx(3.0)
    assert out["ratio_train_wall_bbt_over_dect"] == pytest.approx(
        out["bbt_train_wall_seconds"] / out["dect_train_wall_seconds"]
    )
    assert out["bbt_calls_replayed_from_cache"] == 0
    assert bench.main([*argv, "--json", str(second)]) == 0
    again = json.loads(second.read_text())
    assert again["usage"]["queries_paid"] == 0
    assert again["dect_train_wall_seconds"] is None
    assert again["ratio_train_wall_bbt_over_dect"] is None
    assert again["bbt_calls_replayed_from_cache"] == 3
    assert again["bbt_accuracy"] == out["bbt_accuracy"]

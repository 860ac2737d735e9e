"""The ``dect-maas`` command end to end against a real local server (tiny causal model, loopback).

Each run is checked in the ledger: a run pays exactly N_test + N_train_union + 1 (content-free)
queries, a second run pays zero, and a run stopped by a budget limit resumes paying only the rest.

Reaches inside for the config reader and the wiring, to build the estimator a run would use.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from movie_config import local_provider, write_movie_config

from dect_maas import ConfigError, DecTClassifier, Ledger
from dect_maas.cli import EXIT_BUDGET, EXIT_CONFIG, EXIT_OK, main

dect_maas_server = pytest.importorskip("dect_maas_server")
from dect_maas_server.testing import make_tiny_model, run_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"
N_TEST = 24
SHOTS = [1, 2]
SEEDS = [0, 1]
METHODS = ["dect", "zero_shot", "calibrated_zero_shot", "prototype", "linear_probe"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = make_tiny_model("causal", tmp_path_factory.mktemp("tiny") / "causal")
    with run_server(model) as url:
        yield url


def write_config(folder: Path, url: str, extra: str = "", provider_extra: str = "") -> Path:
    return write_movie_config(
        folder / "exp.toml",
        local_provider(url) + "\n" + provider_extra,
        name="cli-test",
        shots=SHOTS,
        seeds=SEEDS,
        methods=METHODS,
        n_test=N_TEST,
        extra=extra,
    )


def n_train_union() -> int:
    from dect_maas import Experiment

    exp = Experiment.from_config(
        {
            "provider": {"base_url": "http://127.0.0.1:1"},
            "task": {
                "template": "{text} In summary, it was {mask}",
                "label_words": {"negative": "terrible", "positive": "great"},
            },
            "data": {
                "train": {"path": str(DATA / "movies_train.jsonl")},
                "test": {"path": str(DATA / "movies_test.jsonl"), "limit": N_TEST},
            },
            "shots": SHOTS,
            "seeds": SEEDS,
        }
    )
    return exp.plan().n_train_union


def run_ids(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "runs").iterdir())


def paid(folder: Path, run_id: str) -> int:
    ledger = Ledger(folder / "ledger")
    try:
        return ledger.summary(run_id).queries_paid
    finally:
        ledger.close()


# -- configuration errors: exit 2, one line naming the key and the file ---------------------------


@pytest.mark.parametrize(
    ("extra", "provider_extra", "expected"),
    [
        ("colour = 3", "", "colour: unknown key"),
        ("seeds = 'zero'", "", "seeds: Input should be a valid list"),
        ("", 'api_key = "sk-secret-value-123"', "provider.api_key: inline credentials are refused"),
    ],
)
def test_config_errors_exit_2_naming_key_and_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    provider_extra: str,
    expected: str,
) -> None:
    if extra.startswith("seeds"):
        cfg = write_config(tmp_path, "http://127.0.0.1:1")
        cfg.write_text(cfg.read_text().replace(f"seeds = {SEEDS}", extra))
    else:
        cfg = write_config(tmp_path, "http://127.0.0.1:1", extra, provider_extra)
    assert main(["run", str(cfg)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dect-maas: error: {cfg}: ")
    assert expected in lines[0]
    assert "sk-secret-value-123" not in err
    assert "Traceback" not in err


def test_verbose_adds_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:1", "colour = 3")
    assert main(["run", str(cfg), "--verbose"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("dect-maas: error: ")


def test_the_installed_entry_point_returns_the_exit_code(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:1", "colour = 3")
    proc = subprocess.run(
        [sys.executable, "-m", "dect_maas", "estimate", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_CONFIG
    assert "colour: unknown key" in proc.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "dect_maas", "run"], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 2  # argparse usage error
    assert "the following arguments are required: config" in usage.stderr


# -- runs against the real server ----------------------------------------------------------------


def test_run_writes_a_parseable_report_and_a_second_run_pays_zero(
    tmp_path: Path, server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, server_url)
    union = n_train_union()

    # estimate before anything is cached: every query is to pay; nothing is sent
    assert main(["estimate", str(cfg), "--json"]) == EXIT_OK
    est = json.loads(capsys.readouterr().out)
    assert est["queries"] == N_TEST + union + 1
    assert est["cached_queries"] == 0
    assert est["n_train_union"] == union

    assert main(["run", str(cfg)]) == EXIT_OK
    out = capsys.readouterr().out
    (first,) = run_ids(tmp_path)
    assert paid(tmp_path, first) == N_TEST + union + 1
    assert f"queries paid this run: {N_TEST + union + 1}; cache hits: 0" in out

    run_dir = tmp_path / "runs" / first
    report = json.loads((run_dir / "report.json").read_text())
    assert report["run_id"] == first
    assert report["usage"]["queries_paid"] == N_TEST + union + 1
    assert report["model_fingerprint"]
    assert len(report["runs"]) == len(METHODS) * len(SHOTS) * len(SEEDS)
    for r in report["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["n_train"] == 2 * r["shots"]
    assert {(s["method"], s["shots"]) for s in report["summary"]} == {
        (m, k) for m in METHODS for k in SHOTS
    }
    assert "| DecT |" in (run_dir / "report.md").read_text()
    for png in ("accuracy_vs_shots.png", "accuracy_vs_queries.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    saved = [r for r in report["runs"] if r["model_file"]]
    assert {r["shots"] for r in saved} == set(SHOTS)
    model = DecTClassifier.load(run_dir / saved[0]["model_file"])
    assert list(model.classes_) == ["negative", "positive"]

    # after the run, the estimate finds everything cached
    assert main(["estimate", str(cfg), "--json"]) == EXIT_OK
    est = json.loads(capsys.readouterr().out)
    assert est["queries_to_pay"] == 0
    assert est["cached_queries"] == N_TEST + union + 1

    assert main(["run", str(cfg)]) == EXIT_OK
    out = capsys.readouterr().out
    second = next(r for r in run_ids(tmp_path) if r != first)
    assert paid(tmp_path, second) == 0
    assert "this run paid zero queries" in out
    again = json.loads((tmp_path / "runs" / second / "report.json").read_text())
    assert again["usage"]["cache_hits"] == N_TEST + union + 1
    # same features, same seeds: the same numbers
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in report["runs"]]

    # ledger summary and export see both runs
    ledger_dir = tmp_path / "ledger"
    assert (
        main(["ledger", "summary", "--ledger-dir", str(ledger_dir), "--run", first, "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["queries_paid"] == N_TEST + union + 1
    export = tmp_path / "ledger.csv"
    assert main(["ledger", "export", "--config", str(cfg), "--output", str(export)]) == 0
    with export.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["run_id"] for r in rows} == {first, second}

    # predict: texts already queried are free, a new one costs one query
    inputs = tmp_path / "new.jsonl"
    test_rows = [json.loads(x) for x in (DATA / "movies_test.jsonl").read_text().splitlines()[:2]]
    new_text = "A wonderful, warm and very funny film."
    with inputs.open("w") as fh:
        for row in [*test_rows, {"id": "new-1", "text": new_text}]:
            fh.write(json.dumps(row) + "\n")
    out_file = tmp_path / "pred.jsonl"
    model_path = run_dir / saved[0]["model_file"]
    capsys.readouterr()
    code = main(["predict", str(model_path), "--input", str(inputs), "--output", str(out_file)])
    assert code == EXIT_OK
    preds = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [p["id"] for p in preds] == [test_rows[0]["id"], test_rows[1]["id"], "new-1"]
    assert all(p["label"] in ("negative", "positive") for p in preds)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    ledger = Ledger(ledger_dir)
    try:
        predict_runs = [r for r in ledger.runs() if r.startswith("predict-")]
        assert len(predict_runs) == 1
        assert ledger.summary(predict_runs[0]).queries_paid == 1
    finally:
        ledger.close()


def test_interrupted_run_resumes_paying_only_the_rest(
    tmp_path: Path, server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    union = n_train_union()
    total = N_TEST + union + 1
    # small requests one at a time, so that the limit stops the run partway (requests in flight
    # when the limit is hit are cancelled and refunded)
    small = "max_prompts_per_request = 4\nmax_concurrency = 1"
    limited = write_config(tmp_path, server_url, "[budget]\nmax_queries = 10\n", small)
    assert main(["run", str(limited), "--run-id", "first-try"]) == EXIT_BUDGET
    err = capsys.readouterr().err
    assert "budget limit on queries" in err
    paid_first = paid(tmp_path, "first-try")
    assert paid_first == 8  # two requests of 4; the third would pass the limit of 10

    free = write_config(tmp_path, server_url, "", small)  # same folders, no limit
    assert main(["run", str(free), "--run-id", "resumed"]) == EXIT_OK
    assert paid(tmp_path, "resumed") == total - paid_first
    report = json.loads((tmp_path / "runs" / "resumed" / "report.json").read_text())
    assert report["usage"]["cache_hits"] == paid_first


def test_serve_without_the_server_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        return None if name == "dect_maas_server" else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    assert main(["serve", "--port", "0"]) == EXIT_CONFIG
    assert "pip install -e ./providers" in capsys.readouterr().err


def test_ledger_needs_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "summary"]) == EXIT_CONFIG
    assert "--ledger-dir" in capsys.readouterr().err
    assert main(["ledger", "summary", "--ledger-dir", str(tmp_path / "none")]) == EXIT_CONFIG


def test_a_key_named_in_the_config_never_reaches_reports_cache_or_ledger(
    tmp_path: Path,
    server_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = "sk-test-9f8e7d6c5b4a-never-stored"
    monkeypatch.setenv("DECT_MAAS_TEST_KEY", secret)
    cfg = write_config(
        tmp_path, server_url, "seeds = [0]\nshots = [1]", 'api_key_env = "DECT_MAAS_TEST_KEY"'
    )
    cfg.write_text(cfg.read_text().replace(f"shots = {SHOTS}\nseeds = {SEEDS}\n", ""))
    assert main(["run", str(cfg), "--json"]) == EXIT_OK
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    report = json.loads(out.out)
    assert report["config"]["provider"]["api_key_env"] == "DECT_MAAS_TEST_KEY"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "report.json" for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p


def test_auto_dect_runs_and_its_chosen_settings_are_in_the_report(
    tmp_path: Path, server_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, server_url)
    text = cfg.read_text().replace(
        f"methods = {json.dumps(METHODS)}", 'methods = ["auto_dect", "dect"]'
    )
    cfg.write_text(text)  # decoder.class_prior left at its default, "auto"
    assert main(["run", str(cfg)]) == EXIT_OK
    capsys.readouterr()
    (run_id,) = run_ids(tmp_path)
    run_dir = tmp_path / "runs" / run_id
    report = json.loads((run_dir / "report.json").read_text())
    auto = [r for r in report["runs"] if r["method"] == "auto_dect"]
    assert len(auto) == len(SHOTS) * len(SEEDS)
    for r in auto:
        assert r["chosen"]["name"]  # what cross-validation picked, by name
        assert 0.0 <= r["chosen_cv_accuracy"] <= 1.0
        if r["shots"] == 1:  # nothing trained can be checked: the prompt, scored on the shots
            assert "a class has one example" in r["chosen"]["reason"]
            assert r["chosen"]["method"] == "zero_shot"

        # by default auto DecT is told the training file's mix: 193 negative, 207 positive
        assert r["class_prior"] == pytest.approx({"negative": 0.4825, "positive": 0.5175})

    plain = [r for r in report["runs"] if r["method"] == "dect"]
    assert all(r["chosen"] is None for r in plain)
    assert all(r["class_prior"] is None for r in plain)
    md = (run_dir / "report.md").read_text()
    assert "Settings chosen by cross-validation" in md
    assert (
        'Class mix given to auto DecT (`decoder.class_prior = "auto"`): '
        "negative 48.2 %, positive 51.7 %." in md
    )
    assert "| DecT, auto (CV) |" in md


def test_class_prior_from_the_config_reaches_auto_dect(tmp_path: Path) -> None:
    from dect_maas.experiments.config_file import load_config
    from dect_maas.experiments.wiring import make_estimator

    cfg = write_config(tmp_path, "http://127.0.0.1:1")
    base = cfg.read_text()
    labels = ["negative"] * 30 + ["positive"] * 10
    est = make_estimator("auto_dect", load_config(cfg), labels)  # the default: "auto"
    assert est.get_params()["class_prior"] == {"negative": 30.0, "positive": 10.0}
    # "auto" gives no mix where the training file lacks a class; "train" says what is wrong
    cfg.write_text(base + '\n[decoder]\nclass_prior = "auto"\n')
    assert make_estimator("auto_dect", load_config(cfg), ["negative"] * 5).class_prior is None
    cfg.write_text(base + '\n[decoder]\nclass_prior = "train"\n')
    with pytest.raises(ConfigError, match=r"no example of \['positive'\]"):
        make_estimator("auto_dect", load_config(cfg), ["negative"] * 5)
    for setting, expected in [
        ('"auto"', {"negative": 30.0, "positive": 10.0}),
        ('"train"', {"negative": 30.0, "positive": 10.0}),
        ("{ negative = 1, positive = 4 }", {"negative": 1.0, "positive": 4.0}),
        ('"none"', None),
    ]:
        cfg.write_text(base + f"\n[decoder]\nclass_prior = {setting}\n")
        est = make_estimator("auto_dect", load_config(cfg), labels)
        assert est.get_params()["class_prior"] == expected, setting
    cfg.write_text(base + '\n[decoder]\nclass_prior = "test"\n')
    assert main(["run", str(cfg)]) == EXIT_CONFIG


def test_estimate_says_when_the_run_would_pass_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # nothing answers there: the estimate says so and falls back on the byte bound
    cfg = write_config(tmp_path, "http://127.0.0.1:1")
    cfg.write_text(cfg.read_text() + "\n[budget]\nmax_queries = 3\nmax_cost_usd = 5.0\n")
    assert main(["estimate", str(cfg)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "warning: budget.max_queries = 3 but this run would need about" in out
    assert "max_cost_usd" not in out  # unpriced: within that limit
    assert "  features: " in out  # per role
    assert "input tokens (byte bound)" in out
    assert "http://127.0.0.1:1 was asked what is free (model, tokenizer) and failed" in out
    assert main(["estimate", str(cfg), "--json"]) == EXIT_OK
    est = json.loads(capsys.readouterr().out)
    assert len(est["over_budget"]) == 1
    assert est["by_role"]["features"]["queries"] == est["queries"]
    assert est["by_role"]["features"]["tokens_method"] == "byte bound"
    assert est["by_role"]["features"]["cost_usd"] == 0.0

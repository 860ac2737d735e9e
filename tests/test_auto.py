"""AutoDecTClassifier: the batched trainer matches DecT, and the search picks what the data says.

Reaches inside: the search's candidates, ranking and step checkpoints are what is under test.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dect_maas import (
    AutoDecTClassifier,
    ConfigError,
    DecTClassifier,
    Features,
    FeaturesError,
    ZeroShotClassifier,
)
from dect_maas.decoders.auto import STEP_CHECKPOINTS, Candidate, _rank, _Scored, grid_logits


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Many small matmuls: one thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(
    *,
    n_classes: int = 3,
    shots: int = 8,
    dim: int = 16,
    hidden_signal: float = 1.0,
    score_signal: float = 1.0,
    seed: int = 0,
) -> tuple[Features, np.ndarray]:
    """Class-dependent hidden vectors and log-prob-like scores with tunable signal."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), shots)
    rng.shuffle(y)
    centres = rng.normal(size=(n_classes, dim))
    hidden = centres[y] * hidden_signal + rng.normal(size=(len(y), dim)) + 3.0
    noise = rng.normal(size=(len(y), n_classes)) * (3.0 if score_signal == 0 else 1.0)
    scores = np.eye(n_classes)[y] * 3 * score_signal + noise - 6
    feats = Features(
        scores.astype(np.float32),
        hidden.astype(np.float32),
        content_free=np.full(n_classes, -6.0, dtype=np.float32),
        meta={"score_kind": "logprobs", "classes": [f"c{i}" for i in range(n_classes)]},
    )
    return feats, np.array([f"c{i}" for i in y])


# -- the search scores public estimators -----------------------------------------------------------


@pytest.mark.parametrize("representation", ["raw", "content_free"])
def test_every_searched_member_is_the_public_estimator_fitted_on_its_fold(
    representation: str,
) -> None:
    """Member (fold g, setting k) of the batched search is ``Candidate.estimator(...)`` fitted
    on fold g's rows: a DecTClassifier(basis="span") with those settings, logit for logit.
    Tolerance 2e-4 on logits of order 1-10 (float32, sums in another order)."""
    feats, y = _data(shots=6, dim=40)
    rng = np.random.default_rng(0)
    feats = feats.with_content_free_hidden(rng.normal(size=40).astype(np.float32))
    labels = np.array([int(v[1:]) for v in y])
    folds = np.stack([np.arange(len(y)) % 3 != f for f in range(3)])  # (3, N)
    members = [
        Candidate("dect", True, 0.25, 0.01, 0, representation),  # type: ignore[arg-type]
        Candidate("dect", False, 0.0, 0.05, 0, representation),  # type: ignore[arg-type]
    ]
    logits = grid_logits(feats, labels, folds, members, 7, 128, 3)
    assert logits.shape == (len(STEP_CHECKPOINTS), 3, len(y), len(members), 3)
    for t, steps in enumerate(STEP_CHECKPOINTS):
        for g, rows in enumerate(folds):
            for k, cand in enumerate(members):
                est = replace(cand, n_steps=steps).estimator(128, 7, "cpu")
                assert isinstance(est, DecTClassifier)
                assert est.basis == "span"
                est.fit(feats[rows], y[rows])
                np.testing.assert_allclose(
                    logits[t, g, :, k].numpy(), est.decision_function(feats), atol=2e-4, rtol=0
                )


def test_the_winner_is_refitted_through_its_public_estimator() -> None:
    feats, y = _data(shots=6, dim=40, hidden_signal=1.5, score_signal=0.0, seed=1)
    model = AutoDecTClassifier(random_state=3, max_repeats=1).fit(feats, y)
    params = {k: v for k, v in model.best_params_.items() if k not in ("name", "reason")}
    again = Candidate(**params).estimator(128, 3, "cpu").fit(feats, y)
    assert type(again) is type(model.best_estimator_)
    assert again.get_params() == model.best_estimator_.get_params()
    np.testing.assert_array_equal(model.decision_function(feats), again.decision_function(feats))
    assert not [k for k in vars(model) if k.startswith("_")]  # no scratch state on the estimator


# -- what the search chooses -----------------------------------------------------------------------


def test_noise_scores_choose_the_decoder_alone() -> None:
    feats, y = _data(shots=12, hidden_signal=1.5, score_signal=0.0, seed=1)
    model = AutoDecTClassifier(random_state=0, max_repeats=1).fit(feats, y)
    p = model.best_params_
    assert p["method"] != "zero_shot"
    assert p["prompt_weight"] <= 1 / 8, p
    assert model.best_score_ is not None
    assert model.best_score_ > 0.8


def test_perfect_scores_and_noise_hidden_choose_the_prompt() -> None:
    feats, y = _data(shots=12, hidden_signal=0.0, score_signal=3.0, seed=2)
    model = AutoDecTClassifier(random_state=0, max_repeats=1).fit(feats, y)
    p = model.best_params_
    assert p["method"] == "zero_shot" or (p["method"] == "dect" and p["prompt_weight"] >= 1.0), p
    assert model.best_score_ == 1.0


def test_calibration_is_dropped_when_it_hurts() -> None:
    feats, y = _data(shots=10, hidden_signal=0.0, score_signal=1.5, seed=3)
    # a content-free vector that favours class 0 so much that calibrating ruins the prompt
    assert feats.scores is not None
    assert feats.hidden is not None
    bad = Features(
        feats.scores,
        feats.hidden,
        content_free=np.array([-20.0, -1.0, -1.0], dtype=np.float32),
        meta=feats.meta,
    )
    model = AutoDecTClassifier(random_state=0, max_repeats=1).fit(bad, y)
    assert model.best_params_["calibrate"] is False
    names = model.cv_results_["name"]
    acc = dict(zip(names, model.cv_results_["mean_accuracy"], strict=True))
    assert acc["zero_shot"] > acc["zero_shot+calibrated"] + 0.2


def test_fit_takes_no_evaluation_data() -> None:
    params = list(inspect.signature(AutoDecTClassifier.fit).parameters)
    assert params == ["self", "features", "y"]
    assert "test" not in " ".join(inspect.signature(AutoDecTClassifier).parameters)


# -- small sets, determinism, serialisation --------------------------------------------------------


def test_one_shot_checks_only_the_prompt_on_the_shots() -> None:
    feats, y = _data(shots=1, n_classes=5, score_signal=2.0)
    model = AutoDecTClassifier(random_state=3, prompt_blend=0.0).fit(feats, y)
    assert model.best_params_["method"] == "zero_shot"
    assert "a class has one example" in model.best_params_["reason"]
    assert model.n_splits_ == 0
    # both prompt variants were scored on all 5 shots, nothing trained was; the more accurate
    # one comes first
    assert sorted(model.cv_results_["name"]) == ["zero_shot", "zero_shot+calibrated"]
    acc = model.cv_results_["mean_accuracy"]
    assert acc[0] >= acc[1]
    zs = ZeroShotClassifier("auto" if model.best_params_["calibrate"] else "none").fit(feats)
    np.testing.assert_allclose(model.decision_function(feats), zs.decision_function(feats))


def test_one_shot_paper_reproduces_the_paper() -> None:
    feats, y = _data(shots=1)
    model = AutoDecTClassifier(random_state=3, one_shot="paper").fit(feats, y)
    assert model.best_params_["method"] == "paper"
    assert "one example per class" in model.best_params_["reason"]
    assert model.cv_results_["name"] == []
    paper = DecTClassifier(random_state=3).fit(feats, y)
    np.testing.assert_allclose(model.decision_function(feats), paper.decision_function(feats))


def test_two_shots_hold_out_one_example_per_class_and_repeat() -> None:
    feats, y = _data(shots=2)
    model = AutoDecTClassifier(random_state=0).fit(feats, y)
    assert model.n_splits_ == 2
    assert model.n_repeats_ == 8  # 6 rows: the folds are redrawn up to max_repeats times


def test_same_random_state_same_model() -> None:
    feats, y = _data(shots=5, seed=4)
    a = AutoDecTClassifier(random_state=11, max_repeats=2).fit(feats, y)
    b = AutoDecTClassifier(random_state=11, max_repeats=2).fit(feats, y)
    assert a.best_params_ == b.best_params_
    assert a.cv_results_ == b.cv_results_
    np.testing.assert_array_equal(a.decision_function(feats), b.decision_function(feats))


def test_results_are_json_and_save_load_round_trips(tmp_path: Path) -> None:
    feats, y = _data(shots=5, seed=5)
    model = AutoDecTClassifier(random_state=0, max_repeats=1).fit(feats, y)
    text = json.dumps({"best": model.best_params_, "cv": model.cv_results_})
    assert json.loads(text)["best"] == model.best_params_
    n = len(model.cv_results_["name"])
    assert n == 2 + 20 + 3  # zero-shot x 2, 10 raw-representation settings x 2 step counts, 3 plain
    assert all(len(v) == n for v in model.cv_results_.values())
    assert sorted(model.cv_results_["rank"]) == list(range(1, n + 1))
    path = model.save(tmp_path / "auto")
    back = AutoDecTClassifier.load(path)
    np.testing.assert_array_equal(back.decision_function(feats), model.decision_function(feats))
    assert back.best_params_ == model.best_params_
    assert back.cv_results_ == model.cv_results_
    assert list(back.predict(feats)) == list(model.predict(feats))


def test_embedding_only_features_search_the_decoder_alone() -> None:
    feats, y = _data(shots=6)
    assert feats.hidden is not None
    emb = Features(None, feats.hidden)
    model = AutoDecTClassifier(random_state=0, max_repeats=1).fit(emb, y)
    assert all(p["prompt_weight"] == 0.0 for p in model.cv_results_["params"])
    assert "zero_shot" not in model.cv_results_["name"]
    assert set(model.predict(emb)) <= set(y)


# -- the selection rule ----------------------------------------------------------------------------


def _scored(correct: list[float]) -> _Scored:
    row = np.asarray(correct, dtype=np.float64)
    return _Scored(float(row.mean()), 0.5, row)


def test_a_small_gap_on_rows_where_two_candidates_differ_is_a_tie() -> None:
    # The plain candidate (first) is right on rows 0-19, the searched one on rows 16-39: a 0.1
    # gap over 40 rows, but they disagree on 28 of them, so the gap is within one SE.
    plain = _scored([1.0] * 20 + [0.0] * 20)
    other = _scored([0.0] * 16 + [1.0] * 24)
    order, top, se = _rank([plain, other], "1se")
    assert top == 1
    assert se[0] == pytest.approx(np.std([-1] * 16 + [0] * 4 + [1] * 20, ddof=1) / np.sqrt(40))
    assert order[0] == 0


def test_the_same_gap_on_few_differing_rows_is_not_a_tie() -> None:
    # Same 0.1 gap, but the searched candidate is right everywhere the plain one is, plus 4 rows.
    plain = _scored([1.0] * 20 + [0.0] * 20)
    other = _scored([1.0] * 24 + [0.0] * 16)
    order, top, se = _rank([plain, other], "1se")
    assert (top, order[0]) == (1, 1)
    assert se[0] == pytest.approx(np.std([0] * 36 + [1] * 4, ddof=1) / np.sqrt(40))
    assert se[1] == 0.0
    assert _rank([plain, other], "best")[0] == [1, 0]


# -- class prior -----------------------------------------------------------------------------------


def _skewed_test(feats: Features, y: np.ndarray, prior: np.ndarray, n: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    labels = np.array([f"c{i}" for i in range(len(prior))])
    rows = [np.flatnonzero(y == c) for c in labels]
    pick = np.concatenate(
        [rng.choice(r, size=int(n * p)) for r, p in zip(rows, prior, strict=True)]
    )
    return feats[pick], y[pick]


def test_class_prior_shifts_a_trained_choice_and_helps_on_that_mix() -> None:
    feats, y = _data(shots=30, hidden_signal=0.35, score_signal=0.0, seed=5)
    train = np.concatenate([np.flatnonzero(y == f"c{c}")[:8] for c in range(3)])
    prior = np.array([0.8, 0.1, 0.1])
    plain = AutoDecTClassifier(random_state=0).fit(feats[train], y[train])
    shifted = AutoDecTClassifier(random_state=0, class_prior={"c0": 8, "c1": 1, "c2": 1}).fit(
        feats[train], y[train]
    )
    assert shifted.best_params_["method"] != "zero_shot"
    np.testing.assert_allclose(shifted.prior_shift_, np.log(prior) - np.log(1 / 3), rtol=1e-6)
    assert not plain.prior_shift_.any()
    # the mix used, as shares, is recorded (the runner's report shows it); None without one
    assert shifted.class_prior_ == {"c0": 0.8, "c1": 0.1, "c2": 0.1}
    assert plain.class_prior_ is None
    rest = np.setdiff1d(np.arange(len(y)), train)
    test_f, test_y = _skewed_test(feats[rest], y[rest], prior, 400, seed=1)
    if plain.best_params_ == {**shifted.best_params_, "reason": plain.best_params_["reason"]}:
        # same choice: the prior is a pure shift of the same scores
        np.testing.assert_allclose(
            shifted.decision_function(test_f),
            plain.decision_function(test_f) + shifted.prior_shift_,
            rtol=1e-5,
            atol=1e-5,
        )
    share = lambda m: float(np.mean(m.predict(test_f) == "c0"))  # noqa: E731
    assert share(shifted) > share(plain) + 0.1
    assert shifted.score(test_f, test_y) > plain.score(test_f, test_y) + 0.05


def test_class_prior_weights_the_held_out_accuracy() -> None:
    feats, y = _data(shots=6, seed=6)
    model = AutoDecTClassifier(random_state=0, class_prior={"c0": 1, "c1": 1, "c2": 2}).fit(
        feats, y
    )
    # plain zero-shot is scored on all rows, weighted by prior / training share
    zs = ZeroShotClassifier("none").fit(feats)
    right = zs.predict(feats) == y
    w = np.where(y == "c2", 1.5, 0.75)
    acc = dict(zip(model.cv_results_["name"], model.cv_results_["mean_accuracy"], strict=True))
    assert acc["zero_shot"] == pytest.approx(float(np.mean(right * w)), abs=1e-6)


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        ({"c0": 1, "c1": 1}, "missing: ['c2']"),
        ({"c0": 1, "c1": 1, "c2": 1, "c9": 1}, "unknown: ['c9']"),
        ({"c0": 1, "c1": 0, "c2": 1}, "positive"),
    ],
)
def test_class_prior_errors_name_the_problem(prior: dict[str, float], message: str) -> None:
    feats, y = _data(shots=4)
    with pytest.raises(ConfigError, match=re.escape(message)):
        AutoDecTClassifier(class_prior=prior).fit(feats, y)


def test_prior_shift_survives_save_and_load(tmp_path: Path) -> None:
    feats, y = _data(shots=6, hidden_signal=1.5, score_signal=0.0, seed=1)
    model = AutoDecTClassifier(random_state=0, class_prior={"c0": 3, "c1": 1, "c2": 1})
    model.fit(feats, y)
    assert model.prior_shift_.any()
    back = AutoDecTClassifier.load(model.save(tmp_path / "m"))
    np.testing.assert_array_equal(back.prior_shift_, model.prior_shift_)
    assert back.class_prior_ == model.class_prior_ == {"c0": 0.6, "c1": 0.2, "c2": 0.2}
    np.testing.assert_allclose(back.decision_function(feats), model.decision_function(feats))


# -- the search order ------------------------------------------------------------------------------


def test_search_order_starts_with_dect_at_lambda_two_then_the_prompt_by_evidence() -> None:
    feats, y = _data(shots=6, seed=7)
    rng = np.random.default_rng(1)
    feats = feats.with_content_free_hidden(rng.normal(size=16).astype(np.float32))
    model = AutoDecTClassifier(random_state=0, max_repeats=1).fit(feats, y)
    names, params = model.cv_results_["name"], model.cv_results_["params"]
    first = params[0]
    assert (first["method"], first["prompt_weight"], first["representation"]) == (
        "dect",
        2.0,
        "content_free",
    )
    assert (first["lr"], first["n_steps"]) == (0.01, 30)
    assert sorted(names[1:3]) == ["zero_shot", "zero_shot+calibrated"]
    acc = model.cv_results_["mean_accuracy"]
    assert acc[1] >= acc[2]
    # then DecT from prompt-heavy to the decoder alone, then paper, prototype, probe
    weights = [p["prompt_weight"] for p in params[3:-3]]
    assert weights == sorted(weights, reverse=True)
    assert names[-3:] == ["paper", "prototype", "linear_probe"]
    # zero-shot x 2, 2 representations x 2 rates x 5 weights x 2 step counts (the anchor is one of
    # them, moved), paper, prototype, probe
    assert len(names) == 2 + 2 * 2 * 5 * 2 + 3


def test_calibrated_zero_shot_wins_over_plain_when_it_is_better_on_the_shots() -> None:
    """Plain zero-shot biased towards class 0 (the content-free scores show the same bias):
    calibration removes it, and the order follows the evidence, not plainness."""
    feats, y = _data(shots=1, n_classes=4, score_signal=2.0, seed=3)
    assert feats.scores is not None
    biased = feats.scores.copy()
    biased[:, 0] += 6.0
    cf = np.full(4, -6.0, dtype=np.float32)
    cf[0] += 6.0
    f = Features(biased, feats.hidden, content_free=cf, meta=feats.meta)
    model = AutoDecTClassifier(random_state=0, prompt_blend=0.0).fit(f, y)
    assert model.best_params_["name"] == "zero_shot+calibrated"
    assert model.cv_results_["name"][0] == "zero_shot+calibrated"
    assert model.cv_results_["mean_accuracy"][0] > model.cv_results_["mean_accuracy"][1]


def test_a_read_only_content_free_vector_is_fine() -> None:
    """The client's cache can hand back read-only buffers; torch must not warn about them."""
    feats, y = _data(shots=3)
    ref = np.zeros(16, dtype=np.float32)
    ref.setflags(write=False)
    feats = feats.with_content_free_hidden(ref)
    assert feats.content_free_hidden is not None
    assert not feats.content_free_hidden.flags.writeable
    model = AutoDecTClassifier(random_state=0, max_repeats=1).fit(feats, y)
    assert "content_free" in " ".join(model.cv_results_["name"])


# -- the prompt blend ------------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)  # type: ignore[no-any-return]


def test_a_kept_prompt_blend_mixes_the_choice_with_the_plain_prompt(tmp_path: Path) -> None:
    """One shot: calibrated and plain zero-shot tie on the shots, so the mixture of the two is
    kept; its class scores are log((1 - w)·softmax(choice) + w·softmax(plain scores))."""
    feats, y = _data(shots=1, n_classes=5, score_signal=2.0)
    model = AutoDecTClassifier(random_state=3, prompt_blend=0.5).fit(feats, y)
    assert model.blend_["kept"] is True
    assert model.blend_weight_ == 0.5
    assert "mixed with the plain prompt" in model.best_params_["reason"]
    assert feats.scores is not None
    chosen = model.best_estimator_.decision_function(feats)
    want = np.log(0.5 * _softmax(chosen) + 0.5 * _softmax(feats.scores))
    np.testing.assert_allclose(model.decision_function(feats), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(feats).sum(1), 1.0, rtol=1e-5)
    back = AutoDecTClassifier.load(model.save(tmp_path / "blend"))
    np.testing.assert_array_equal(back.decision_function(feats), model.decision_function(feats))
    assert back.blend_ == model.blend_
    with pytest.raises(FeaturesError, match="scores"):
        model.decision_function(Features(None, feats.hidden))


def test_one_shot_mixes_calibrated_and_plain_prompts_whatever_the_rows_say() -> None:
    """One row per class cannot tell the prompts apart: at one shot the model is always
    ½ calibrated zero-shot (shifted to the class prior) + ½ plain zero-shot, even where the
    plain prompt is right on every shot and the calibrated one on one of three."""
    feats, y = _data(shots=1, n_classes=3, score_signal=2.0, seed=4)
    assert feats.scores is not None
    assert feats.content_free is not None
    # plain scores right on every shot; the content-free scores make calibration favour c0
    cf = np.zeros(3, dtype=np.float32)
    scores = np.zeros((3, 3), dtype=np.float32)
    for row, label in enumerate(y):
        scores[row, int(label[1:])] = 1.0
    cf[:] = 2.0
    cf[0] = 0.0  # calibrated = scores - cf: +2 for class 0 on every row
    f = Features(scores, feats.hidden, content_free=cf, meta=feats.meta)
    prior = {"c0": 1.0, "c1": 1.0, "c2": 3.0}
    model = AutoDecTClassifier(random_state=0, class_prior=prior).fit(f, y)
    acc = dict(zip(model.cv_results_["name"], model.cv_results_["mean_accuracy"], strict=True))
    assert acc["zero_shot"] > acc["zero_shot+calibrated"]  # the rows favour the plain prompt
    assert model.best_params_["name"] == "zero_shot+calibrated"
    assert model.blend_["kept"] is True
    assert model.blend_weight_ == 0.5
    assert "one row per class cannot choose" in model.best_params_["reason"]
    shift = np.log(np.array([0.2, 0.2, 0.6])) - np.log(1 / 3)
    np.testing.assert_allclose(model.prior_shift_, shift, rtol=1e-6)
    cal = ZeroShotClassifier("auto").fit(f).decision_function(f)
    want = np.log(0.5 * _softmax(cal + shift) + 0.5 * _softmax(scores))
    np.testing.assert_allclose(model.decision_function(f), want, rtol=1e-5, atol=1e-5)
    # prompt_blend=0 keeps the pick by evidence on the shots
    alone = AutoDecTClassifier(random_state=0, class_prior=prior, prompt_blend=0.0).fit(f, y)
    assert alone.best_params_["name"] == "zero_shot"


def test_the_blend_is_dropped_when_held_out_rows_show_it_costs() -> None:
    """A plain prompt biased hard towards class 0 (the content-free scores show it), 40 shots:
    the calibrated choice is clearly better than any mixture with the biased prompt."""
    feats, y = _data(shots=40, n_classes=3, score_signal=1.0, hidden_signal=0.3, seed=2)
    assert feats.scores is not None
    biased = feats.scores.copy()
    biased[:, 0] += 8.0
    cf = np.full(3, -6.0, dtype=np.float32)
    cf[0] += 8.0
    f = Features(biased, feats.hidden, content_free=cf, meta=feats.meta)
    model = AutoDecTClassifier(random_state=0, max_repeats=1).fit(f, y)
    assert model.blend_["kept"] is False
    assert model.blend_weight_ == 0.0
    assert model.blend_["mean_accuracy"] < model.blend_["chosen_accuracy"]
    assert "clearly behind the best" in model.blend_["reason"]
    off = AutoDecTClassifier(random_state=0, max_repeats=1, prompt_blend=0.0).fit(f, y)
    np.testing.assert_array_equal(off.decision_function(f), model.decision_function(f))
    assert off.blend_ == {"weight": 0.0, "kept": False, "reason": "off"}


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "half"])
def test_prompt_blend_is_checked(bad: object) -> None:
    feats, y = _data(shots=2)
    with pytest.raises(ConfigError, match="prompt_blend"):
        AutoDecTClassifier(prompt_blend=bad).fit(feats, y)  # type: ignore[arg-type]

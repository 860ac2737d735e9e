"""Baselines: zero-shot (raw, calibrated), prototype-only DecT, linear probe; one interface."""

from __future__ import annotations

import numpy as np
import pytest

from dect_maas import (
    AutoDecTClassifier,
    ConfigError,
    DecTClassifier,
    FeatureMeta,
    Features,
    FeaturesError,
    LinearProbeClassifier,
    NotFittedError,
    PrototypeClassifier,
    ZeroShotClassifier,
)

ALL = [
    ZeroShotClassifier,
    PrototypeClassifier,
    LinearProbeClassifier,
    DecTClassifier,
    AutoDecTClassifier,
]


def blobs(n_per_class=16, n_classes=3, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim)) * 2
    y = np.tile(np.arange(n_classes), n_per_class)
    hidden = (means[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
    scores = rng.normal(size=(len(y), n_classes)).astype(np.float32)
    scores[np.arange(len(y)), y] += 1.0
    meta = FeatureMeta(classes=tuple("abcdefgh"[:n_classes]), score_kind="logits")
    cf = np.linspace(1.0, 2.0, n_classes).astype(np.float32)
    return Features(scores, hidden, content_free=cf, meta=meta), y


def make(cls):
    if cls is ZeroShotClassifier:
        return cls()
    if cls is LinearProbeClassifier:
        return cls()
    return cls(random_state=0)


@pytest.mark.parametrize("cls", ALL)
def test_every_estimator_shares_the_contract(cls, tmp_path):
    f, y = blobs()
    est = make(cls)
    with pytest.raises(NotFittedError):
        est.predict(f)
    assert est.fit(f, y) is est
    assert est.classes_.tolist() == ["a", "b", "c"]
    scores = est.decision_function(f)
    assert scores.shape == (len(y), 3)
    assert scores.dtype == np.float32
    proba = est.predict_proba(f)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    pred = est.predict(f)
    assert pred.tolist() == est.classes_[scores.argmax(1)].tolist()
    assert est.score(f, y) == pytest.approx(float((scores.argmax(1) == y).mean()))
    back = type(est).load(est.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(back.decision_function(f), scores)
    assert back.get_params() == est.get_params()
    assert repr(back) == repr(est)


def test_zero_shot_is_argmax_of_raw_scores():
    f, _ = blobs()
    zs = ZeroShotClassifier().fit(f)
    assert zs.calibration_ is None
    assert zs.predict(f).tolist() == np.array(list("abc"))[f.scores.argmax(1)].tolist()


def test_calibrated_zero_shot_divides_by_kappa_and_can_change_the_answer():
    scores = np.array([[2.0, 3.0], [4.0, 3.0]], np.float32)
    f = Features(scores, content_free=np.array([1.0, 3.0], np.float32))  # κ = [0.5, 1.5]
    zs = ZeroShotClassifier(calibration="auto").fit(f)
    np.testing.assert_allclose(zs.decision_function(f), [[4.0, 2.0], [8.0, 2.0]], rtol=1e-6)
    assert zs.predict(f).tolist() == [0, 0]
    assert ZeroShotClassifier().fit(f).predict(f).tolist() == [1, 0]


def test_calibrated_zero_shot_on_logprobs_subtracts():
    scores = np.array([[-1.0, -2.0]], np.float32)
    meta = FeatureMeta(score_kind="logprobs")
    f = Features(scores, content_free=np.array([-0.5, -3.0], np.float32), meta=meta)
    zs = ZeroShotClassifier(calibration="auto").fit(f)
    assert zs.decision_function(f).tolist() == [[-0.5, 1.0]]
    assert zs.predict(f).tolist() == [1]


def test_zero_shot_needs_scores_and_content_free_when_calibrated():
    f, _ = blobs()
    with pytest.raises(FeaturesError, match="no label-word scores"):
        ZeroShotClassifier().fit(Features(None, f.hidden))
    with pytest.raises(ConfigError, match="content_free is None"):
        ZeroShotClassifier(calibration="auto").fit(Features(f.scores))


def test_prototype_classifier_is_dect_with_zero_prompt_weight():
    f, y = blobs()
    proto = PrototypeClassifier(random_state=3).fit(f, y)
    dect0 = DecTClassifier(prompt_weight=0.0, calibration="none", random_state=3).fit(f, y)
    assert proto.prompt_weight_ == 0.0
    np.testing.assert_array_equal(proto.projection_, dect0.projection_)
    np.testing.assert_array_equal(proto.decision_function(f), dect0.decision_function(f))
    # scores are not needed, neither to fit nor to predict
    no_scores = Features(None, f.hidden, meta=FeatureMeta(classes=("a", "b", "c")))
    again = PrototypeClassifier(random_state=3).fit(no_scores, y)
    np.testing.assert_array_equal(again.predict(no_scores), proto.predict(f))
    assert "prompt_weight" not in proto.get_params()


def test_linear_probe_learns_is_deterministic_and_standardises():
    f, y = blobs(n_per_class=30, dim=40, seed=4)
    test, yt = blobs(n_per_class=50, dim=40, seed=4)
    a = LinearProbeClassifier().fit(f, y)
    b = LinearProbeClassifier().fit(f, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.score(test, yt) >= 0.95
    np.testing.assert_allclose(a.mean_, f.hidden.astype(np.float64).mean(0), atol=1e-6)
    np.testing.assert_allclose(a.scale_, f.hidden.astype(np.float64).std(0), atol=1e-6)


def test_linear_probe_minimises_the_regularised_objective():
    """At the optimum the gradient of C·ΣCE + ½‖W‖² vanishes: C·Σ(p − onehot)·z = −W."""
    f, y = blobs(n_per_class=10, dim=6, seed=2)
    est = LinearProbeClassifier(C=0.5, max_iter=500, tol=1e-10).fit(f, y)
    z = (f.hidden.astype(np.float64) - est.mean_) / est.scale_
    logits = z @ est.coef_.T + est.intercept_
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    resid = p - np.eye(3)[y]
    np.testing.assert_allclose(0.5 * resid.T @ z, -est.coef_, atol=1e-5)
    np.testing.assert_allclose(resid.sum(0), 0.0, atol=1e-5)  # unpenalised bias
    # a stronger penalty shrinks the weights
    strong = LinearProbeClassifier(C=0.01).fit(f, y)
    assert np.abs(strong.coef_).sum() < np.abs(est.coef_).sum()


def test_linear_probe_bad_inputs():
    f, y = blobs()
    with pytest.raises(ConfigError, match="C must be a positive number"):
        LinearProbeClassifier(C=0).fit(f, y)
    with pytest.raises(FeaturesError, match="no hidden vectors"):
        LinearProbeClassifier().fit(Features(f.scores), y)
    est = LinearProbeClassifier().fit(f, y)
    with pytest.raises(FeaturesError, match="hidden vectors have 3 dimensions"):
        est.predict(Features(f.scores, f.hidden[:, :3]))


def test_linear_probe_matches_scikit_learn_when_installed():
    linear_model = pytest.importorskip("sklearn.linear_model")
    f, y = blobs(n_per_class=40, n_classes=4, dim=16, seed=5)
    ours = LinearProbeClassifier(max_iter=1000, tol=1e-10).fit(f, y)
    z = (f.hidden.astype(np.float64) - ours.mean_) / ours.scale_
    theirs = linear_model.LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(z, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=1e-4)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, atol=1e-4)

"""DecTClassifier: the estimator contract, determinism, persistence, calibration and learning.

Reaches inside for ``DecTDecoder`` only, to build the initial weights a fit must reproduce.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dect_maas import (
    ConfigError,
    DecTClassifier,
    FeatureMeta,
    Features,
    FeaturesError,
    NotFittedError,
)
from dect_maas.decoders.dect import DecTDecoder


def blobs(n_per_class=16, n_classes=3, dim=32, seed=0, sep=3.0, informative_scores=False):
    """Gaussian classes in `dim` dimensions; scores are noise unless asked to carry the label."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim)) * sep
    y = np.tile(np.arange(n_classes), n_per_class)
    hidden = means[y] + rng.normal(size=(len(y), dim))
    scores = rng.normal(size=(len(y), n_classes))
    if informative_scores:
        scores[np.arange(len(y)), y] += 3.0
    return hidden.astype(np.float32), scores.astype(np.float32), y


def feats(hidden, scores, classes=("a", "b", "c"), content_free=None, score_kind="logits"):
    meta = FeatureMeta(classes=classes, score_kind=score_kind)
    return Features(scores, hidden, content_free=content_free, meta=meta)


def test_init_only_stores_parameters_and_get_params_round_trips():
    est = DecTClassifier(projection_dim=16, lr="not checked until fit")  # type: ignore[arg-type]
    assert est.get_params()["lr"] == "not checked until fit"
    assert not hasattr(est, "classes_")
    est.set_params(lr=0.05)
    assert est.lr == 0.05
    assert repr(est) == "DecTClassifier(projection_dim=16, lr=0.05)"
    with pytest.raises(ConfigError, match="no parameter 'alpha'"):
        est.set_params(alpha=1)


def test_fit_returns_self_with_fitted_numpy_attributes():
    h, s, y = blobs()
    f = feats(h, s, content_free=np.array([1.0, 2.0, 3.0], np.float32))
    est = DecTClassifier(projection_dim=8, random_state=0)
    assert est.fit(f, y) is est
    assert est.classes_.tolist() == ["a", "b", "c"]
    assert est.projection_.shape == (8, 32)
    assert est.prototypes_.shape == (3, 8)
    assert est.radii_.shape == (3,)
    assert est.prompt_weight_ == pytest.approx(1 / 16)  # λ = 1/shot
    assert est.calibration_.tolist() == [0.5, 1.0, 1.5]
    assert est.calibration_kind_ == "logits"
    for arr in (est.projection_, est.prototypes_, est.radii_):
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == np.float32
    assert est.loss_curve_.shape == (30,)
    assert est.loss_curve_[-1] < est.loss_curve_[0]


def test_prompt_weight_is_one_over_mean_shot_when_unbalanced():
    h, s, y = blobs(n_per_class=8)
    keep = np.array([i for i in range(24) if not (y[i] == 0 and i >= 12)])  # class 0: 4 of 8
    assert np.bincount(y[keep]).tolist() == [4, 8, 8]
    f = feats(h[keep], s[keep])
    est = DecTClassifier(calibration="none", n_steps=1, random_state=0).fit(f, y[keep])
    assert est.prompt_weight_ == pytest.approx(3 / len(keep))  # 1 / (N / C)
    assert DecTClassifier(prompt_weight=0.7, calibration="none", n_steps=1).fit(
        f, y[keep]
    ).prompt_weight_ == pytest.approx(0.7)


def test_learns_separable_features_and_beats_chance_by_far():
    h, s, y = blobs(n_per_class=16, n_classes=4, dim=64, seed=1, sep=1.0)
    ht, st, yt = blobs(n_per_class=100, n_classes=4, dim=64, seed=1, sep=1.0)  # same means
    classes = ("w", "x", "y", "z")
    est = DecTClassifier(calibration="none", random_state=0).fit(feats(h, s, classes), y)
    acc = est.score(feats(ht, st, classes), yt)
    assert acc >= 0.95, acc  # 4 classes, chance 0.25; the scores are pure noise here


def test_informative_prompt_scores_help_when_hidden_vectors_do_not():
    rng = np.random.default_rng(5)
    h = rng.normal(size=(400, 16)).astype(np.float32)  # hidden vectors carry no label
    y = np.tile(np.arange(2), 200)
    s = rng.normal(size=(400, 2)).astype(np.float32)
    s[np.arange(400), y] += 2.0
    f, classes = feats(h, s, ("neg", "pos")), ("neg", "pos")
    train, test = np.arange(32), np.arange(32, 400)
    with_prompt = DecTClassifier(prompt_weight=1.0, calibration="none", random_state=0)
    without = DecTClassifier(prompt_weight=0.0, calibration="none", random_state=0)
    acc_with = with_prompt.fit(f[train], y[train]).score(f[test], y[test])
    acc_without = without.fit(f[train], y[train]).score(f[test], y[test])
    assert acc_with >= 0.85
    assert acc_without <= 0.7
    assert classes == tuple(with_prompt.classes_.tolist())


def test_same_random_state_same_model_and_global_rng_untouched():
    h, s, y = blobs()
    f = feats(h, s)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = DecTClassifier(calibration="none", random_state=7).fit(f, y)
    b = DecTClassifier(calibration="none", random_state=7).fit(f, y)
    c = DecTClassifier(calibration="none", random_state=8).fit(f, y)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    for name in ("projection_", "prototypes_", "radii_"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.projection_, c.projection_)
    np.testing.assert_array_equal(a.decision_function(f), b.decision_function(f))


def test_prototypes_after_fit_are_the_initial_xavier_draw():
    h, s, y = blobs()
    est = DecTClassifier(projection_dim=8, calibration="none", random_state=11).fit(feats(h, s), y)
    init = DecTDecoder(32, 3, 8, generator=torch.Generator().manual_seed(11))
    np.testing.assert_array_equal(est.prototypes_, init.prototypes.detach().numpy())
    assert not np.array_equal(est.projection_, init.proj.weight.detach().numpy())


def test_save_load_round_trips_predictions_exactly(tmp_path):
    h, s, y = blobs()
    f = feats(h, s, content_free=np.array([2.0, 3.0, 4.0], np.float32))
    est = DecTClassifier(projection_dim=8, random_state=0).fit(f, y)
    path = est.save(tmp_path / "model")
    assert path.name == "model.npz"
    back = DecTClassifier.load(path)
    assert back.get_params() == est.get_params()
    np.testing.assert_array_equal(back.decision_function(f), est.decision_function(f))
    np.testing.assert_array_equal(back.predict(f), est.predict(f))
    np.testing.assert_array_equal(back.predict_proba(f), est.predict_proba(f))
    assert back.calibration_kind_ == "logits"
    np.testing.assert_array_equal(back.calibration_, est.calibration_)
    assert back.prompt_weight_ == est.prompt_weight_
    with np.load(path, allow_pickle=False) as data:  # plain arrays + JSON, no pickle
        header = json.loads(str(data["header_json"]))
    assert header["estimator"] == "DecTClassifier"


def test_load_refuses_other_files(tmp_path):
    from dect_maas import ZeroShotClassifier

    h, s, _ = blobs()
    zs = ZeroShotClassifier().fit(feats(h, s))
    path = zs.save(tmp_path / "zs.npz")
    with pytest.raises(ConfigError, match="holds a ZeroShotClassifier"):
        DecTClassifier.load(path)
    evil = tmp_path / "evil.npz"
    np.savez(evil, header_json=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ConfigError, match="not a dect-maas model file"):
        DecTClassifier.load(evil)
    with pytest.raises(ConfigError, match="not a dect-maas model file"):
        DecTClassifier.load(tmp_path / "missing.npz")


def test_predict_returns_class_names_and_integer_labels_work():
    h, s, y = blobs()
    f = feats(h, s)
    by_index = DecTClassifier(calibration="none", random_state=0).fit(f, y)
    by_name = DecTClassifier(calibration="none", random_state=0).fit(
        f, np.array(["a", "b", "c"])[y]
    )
    np.testing.assert_array_equal(by_index.projection_, by_name.projection_)
    assert set(by_name.predict(f).tolist()) <= {"a", "b", "c"}
    proba = by_name.predict_proba(f)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert (proba.argmax(1) == by_name.decision_function(f).argmax(1)).all()


def test_without_meta_classes_classes_are_column_indices():
    h, s, y = blobs()
    est = DecTClassifier(calibration="none", random_state=0).fit(Features(s, h), y)
    assert est.classes_.tolist() == [0, 1, 2]
    assert est.predict(Features(s, h)).dtype.kind == "i"


def test_embedding_only_features_train_the_prototype_decoder():
    h, _, y = blobs()
    names = np.array(["x", "y", "z"])[y]
    est = DecTClassifier(random_state=0).fit(Features(None, h), names)
    assert est.prompt_weight_ == 0.0
    assert est.calibration_ is None
    assert est.classes_.tolist() == ["x", "y", "z"]
    assert est.score(Features(None, h), names) >= 0.9
    with pytest.raises(ConfigError, match="no label-word scores"):
        DecTClassifier(prompt_weight=0.5).fit(Features(None, h), names)


def test_logprob_features_get_log_space_calibration():
    h, s, y = blobs()
    s = -np.abs(s) - 1  # log-probabilities
    cf = np.array([-1.0, -2.0, -4.0], np.float32)
    f = feats(h, s, content_free=cf, score_kind="logprobs")
    est = DecTClassifier(prompt_weight=1.0, n_steps=0, random_state=0).fit(f, y)
    assert est.calibration_kind_ == "logprobs"
    assert est.calibration_.tolist() == [-1.0, -2.0, -4.0]
    plain = DecTClassifier(prompt_weight=1.0, n_steps=0, calibration="none", random_state=0)
    diff = est.decision_function(f) - plain.fit(f, y).decision_function(f)
    np.testing.assert_allclose(diff, np.broadcast_to(-cf, diff.shape), atol=1e-5)  # −log p_cf


def test_logit_features_get_the_paper_ratio_calibration():
    h, s, y = blobs()
    cf = np.array([1.0, 2.0, 3.0], np.float32)  # κ = [0.5, 1, 1.5]
    f = feats(h, s, content_free=cf)
    est = DecTClassifier(prompt_weight=1.0, n_steps=0, random_state=0).fit(f, y)
    plain = DecTClassifier(prompt_weight=1.0, n_steps=0, calibration="none", random_state=0)
    diff = est.decision_function(f) - plain.fit(f, y).decision_function(f)
    want = s / np.array([0.5, 1.0, 1.5]) - s  # λ·(z/κ − z) with λ = 1
    np.testing.assert_allclose(diff, want, atol=1e-5)


# -- bad inputs, each with its clear error --------------------------------------------------------


def test_predict_before_fit_raises_not_fitted():
    h, s, _ = blobs()
    with pytest.raises(NotFittedError, match="not fitted yet"):
        DecTClassifier().predict(feats(h, s))
    with pytest.raises(NotFittedError):
        DecTClassifier().save("never.npz")


def test_features_without_hidden_are_refused():
    _, s, y = blobs()
    with pytest.raises(FeaturesError, match="no hidden vectors"):
        DecTClassifier().fit(Features(s), y)


def test_calibration_without_content_free_is_a_clear_error():
    h, s, y = blobs()
    for cal in ("auto", "logits", "logprobs"):
        with pytest.raises(ConfigError, match="content_free is None"):
            DecTClassifier(calibration=cal).fit(feats(h, s), y)
    with pytest.raises(ConfigError, match="calibration must be"):
        DecTClassifier(calibration="yes").fit(feats(h, s), y)  # type: ignore[arg-type]


def test_bad_labels_and_shapes_are_clear_errors():
    h, s, y = blobs()
    f = feats(h, s)
    est = DecTClassifier(calibration="none")
    with pytest.raises(ConfigError, match="'d' at position 0 is not a known class"):
        est.fit(f, ["d"] + ["a"] * (len(y) - 1))
    with pytest.raises(ConfigError, match="y has 3 labels but the features have 48 rows"):
        est.fit(f, [0, 1, 2])
    with pytest.raises(ConfigError, match="label 3 at position 0"):
        est.fit(f, [3] * len(y))
    with pytest.raises(ConfigError, match="class\\(es\\) c have no training examples"):
        est.fit(f, y % 2)
    with pytest.raises(ConfigError, match="y is required"):
        est.fit(f)
    with pytest.raises(FeaturesError, match="expected a Features object"):
        est.fit(h, y)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="projection_dim"):
        DecTClassifier(projection_dim=0).fit(f, y)
    with pytest.raises(ConfigError, match="lr must be"):
        DecTClassifier(lr=-1.0).fit(f, y)
    with pytest.raises(ConfigError, match="random_state"):
        DecTClassifier(calibration="none", random_state="x").fit(f, y)  # type: ignore[arg-type]
    est.fit(f, y)
    with pytest.raises(FeaturesError, match="hidden vectors have 5 dimensions"):
        est.predict(feats(h[:, :5], s))
    with pytest.raises(FeaturesError, match="the features have none"):
        est.predict(Features(None, h))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_starts_from_the_same_decoder_and_agrees_with_cpu():
    h, s, y = blobs(n_per_class=32, dim=64)
    f = feats(h, s, content_free=np.array([1.0, 2.0, 3.0], np.float32))
    cpu = DecTClassifier(random_state=0).fit(f, y)
    gpu = DecTClassifier(random_state=0, device="cuda").fit(f, y)
    np.testing.assert_array_equal(gpu.prototypes_, cpu.prototypes_)
    np.testing.assert_allclose(gpu.projection_, cpu.projection_, atol=1e-3)
    assert (gpu.predict(f) == cpu.predict(f)).mean() >= 0.98


def test_zero_prompt_weight_needs_no_content_free():
    h, s, y = blobs()
    est = DecTClassifier(prompt_weight=0.0, random_state=0).fit(
        feats(h, s), y
    )  # calibration="auto"
    assert est.calibration_ is None
    assert est.calibration_kind_ is None
    with pytest.raises(ConfigError, match="calibration must be"):
        DecTClassifier(prompt_weight=0.0, calibration="bad").fit(feats(h, s), y)


def test_content_free_representation_is_fitted_used_and_saved(tmp_path):
    hidden, scores, y = blobs(n_per_class=8)
    common = np.full(hidden.shape[1], 40.0, dtype=np.float32)  # a large part every row shares
    f = feats(hidden + common, scores).with_content_free_hidden(common)
    est = DecTClassifier(prompt_weight=0.0, representation="content_free", random_state=0)
    est.fit(f, y)
    np.testing.assert_array_equal(est.reference_, common)
    # the same model sees the same representation whatever common part the rows carry
    moved = feats(hidden + 2 * common, scores).with_content_free_hidden(2 * common)
    est2 = DecTClassifier(prompt_weight=0.0, representation="content_free", random_state=0)
    np.testing.assert_allclose(
        est2.fit(moved, y).decision_function(moved), est.decision_function(f), atol=1e-5
    )
    assert est.score(f, y) > 0.9
    back = DecTClassifier.load(est.save(tmp_path / "m"))
    np.testing.assert_array_equal(back.decision_function(f), est.decision_function(f))
    assert DecTClassifier(prompt_weight=0.0, random_state=0).fit(f, y).reference_ is None


def test_content_free_representation_without_the_vector_is_a_clear_error():
    hidden, scores, y = blobs(n_per_class=2)
    with pytest.raises(ConfigError, match=r"features\.content_free_hidden is None"):
        DecTClassifier(prompt_weight=0.0, representation="content_free").fit(
            feats(hidden, scores), y
        )
    with pytest.raises(ConfigError, match="representation must be 'raw' or 'content_free'"):
        DecTClassifier(representation="whiten").fit(feats(hidden, scores), y)
    with pytest.raises(ConfigError, match="basis must be 'full' or 'span'"):
        DecTClassifier(basis="pca").fit(feats(hidden, scores), y)


def test_span_basis_fits_the_training_rows_as_the_full_basis_does_at_the_start():
    """With no step taken, span and full differ only in the part of a vector outside the
    training span: on the training rows they agree exactly; training then acts in that span."""
    hidden, scores, y = blobs(n_per_class=4, dim=64)  # 12 rows span 12 of 64 dimensions
    f = feats(hidden, scores)
    full = DecTClassifier(prompt_weight=0.0, n_steps=0, random_state=1).fit(f, y)
    span = DecTClassifier(prompt_weight=0.0, n_steps=0, random_state=1, basis="span").fit(f, y)
    np.testing.assert_allclose(span.decision_function(f), full.decision_function(f), atol=1e-5)
    assert span.projection_.shape == full.projection_.shape == (128, 64)
    trained = DecTClassifier(prompt_weight=0.0, random_state=1, basis="span").fit(f, y)
    assert trained.loss_curve_[-1] < trained.loss_curve_[0]
    assert trained.score(f, y) == 1.0

"""scikit-learn's own tools on our estimators: tags, cloning, cross-validation, search, pipelines.

Runs where scikit-learn is installed (the dev extras install it, so CI runs these). X is a
``Features``: it has a ``shape`` and ``features[rows, ...]`` selects rows, so sklearn slices it the
way it slices an array.
"""

from __future__ import annotations

import numpy as np
import pytest

from dect_maas import (
    AutoDecTClassifier,
    DecTClassifier,
    FeatureMeta,
    Features,
    FeaturesError,
    LinearProbeClassifier,
    PrototypeClassifier,
    ZeroShotClassifier,
)

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone, is_classifier  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score  # noqa: E402
from sklearn.pipeline import FunctionTransformer, make_pipeline  # noqa: E402

CLASSES = ("neg", "neu", "pos")


def make_features(n_per_class: int = 12, dim: int = 16, seed: int = 0) -> tuple[Features, list]:
    """Three separable classes in the hidden vectors; the scores lean the right way, noisily."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3.0, size=(len(CLASSES), dim))
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    rng.shuffle(y)
    hidden = centres[y] + rng.normal(0, 1.0, size=(len(y), dim))
    scores = rng.normal(0, 1.0, size=(len(y), len(CLASSES)))
    scores[np.arange(len(y)), y] += 1.0
    meta = FeatureMeta(classes=CLASSES, score_kind="logits")
    features = Features(scores, hidden, content_free=np.zeros(3) + 0.5, meta=meta)
    return features, [CLASSES[i] for i in y]


ESTIMATORS = [
    DecTClassifier(n_steps=20, random_state=0),
    PrototypeClassifier(n_steps=20, random_state=0),
    LinearProbeClassifier(),
    ZeroShotClassifier(),
    AutoDecTClassifier(cv=2, max_repeats=1, projection_dim=16, random_state=0),
]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_sklearn_sees_a_classifier_and_clones_it(estimator) -> None:
    assert is_classifier(estimator)
    copy = clone(estimator)
    assert type(copy) is type(estimator)
    assert copy.get_params() == estimator.get_params()
    assert not hasattr(copy, "classes_")


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_cross_val_score_slices_features_by_row(estimator) -> None:
    features, y = make_features()
    scores = cross_val_score(estimator, features, y, cv=StratifiedKFold(3))
    assert scores.shape == (3,)
    # each fold scored on its own 12 held-out rows: accuracies are multiples of 1/12
    assert np.allclose(scores * 12, np.round(scores * 12))
    floor = 0.5 if isinstance(estimator, ZeroShotClassifier) else 0.9  # chance is 1/3
    assert scores.mean() >= floor


def test_grid_search_chooses_on_training_folds_and_refits() -> None:
    features, y = make_features()
    search = GridSearchCV(
        DecTClassifier(n_steps=20, random_state=0),
        {"prompt_weight": [0.0, 100.0]},
        cv=StratifiedKFold(3),
    )
    search.fit(features, y)
    # λ = 100 lets the noisy scores swamp the well-separated hidden vectors
    assert search.best_params_ == {"prompt_weight": 0.0}
    assert search.cv_results_["mean_test_score"][0] > search.cv_results_["mean_test_score"][1]
    assert search.best_estimator_.prompt_weight_ == 0.0
    assert list(search.classes_) == list(CLASSES)
    assert search.predict(features[:5]).tolist() == y[:5]


def test_pipeline_with_a_features_step_and_a_nested_grid() -> None:
    features, y = make_features()

    def hidden_only(f: Features) -> Features:
        return Features(None, f.hidden, meta=FeatureMeta(classes=CLASSES, score_kind="none"))

    pipe = make_pipeline(
        FunctionTransformer(hidden_only), DecTClassifier(n_steps=20, random_state=0)
    )
    search = GridSearchCV(pipe, {"dectclassifier__projection_dim": [4, 32]}, cv=3)
    search.fit(features, y)
    assert search.best_params_["dectclassifier__projection_dim"] in (4, 32)
    fitted = search.best_estimator_[-1]
    assert fitted.prompt_weight_ == 0.0  # the pipeline's first step dropped the scores
    assert search.score(features, y) >= 0.9


def test_features_index_like_an_array_for_rows_only() -> None:
    features, _ = make_features(n_per_class=2)
    assert features.shape == (6, 3 + 16)
    rows = np.array([4, 0])
    picked = features[rows, ...]
    assert picked.shape == (2, 19)
    assert np.array_equal(picked.hidden, features.hidden[rows])
    assert np.array_equal(features[rows, :].scores, features.scores[rows])
    with pytest.raises(FeaturesError, match=r"select rows only: use features\[rows\]"):
        features[rows, 0]

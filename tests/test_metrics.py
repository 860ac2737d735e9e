"""Metrics on small hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from dect_maas import ConfigError, accuracy, confusion_matrix, macro_f1, mean_std

T = ["a", "a", "a", "b", "b", "c"]
P = ["a", "a", "b", "b", "c", "c"]


def test_accuracy():
    assert accuracy(T, P) == pytest.approx(4 / 6)
    assert accuracy([0, 1, 2], np.array([0, 1, 2])) == 1.0


def test_confusion_matrix_rows_are_truth_columns_predictions():
    m = confusion_matrix(T, P)
    assert m.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m.dtype == np.int64
    m2 = confusion_matrix(T, P, labels=["c", "b", "a", "d"])
    assert m2.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]


def test_macro_f1_by_hand():
    # a: p=2/2, r=2/3 → 0.8; b: p=1/2, r=1/2 → 0.5; c: p=1/2, r=1 → 2/3
    assert macro_f1(T, P) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class absent from both truth and predictions counts as 0 when listed
    assert macro_f1(T, P, labels=["a", "b", "c", "d"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)
    assert macro_f1([1, 1], [0, 0]) == 0.0


def test_mean_std_over_seeds():
    mean, std = mean_std([0.9, 0.8, 0.7])
    assert mean == pytest.approx(0.8)
    assert std == pytest.approx(0.1)  # sample std
    assert mean_std([0.9, 0.8, 0.7], ddof=0)[1] == pytest.approx(np.std([0.9, 0.8, 0.7]))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_metric_errors():
    with pytest.raises(ConfigError, match="y_true has 2 labels but y_pred has 1"):
        accuracy([1, 2], [1])
    with pytest.raises(ConfigError, match="no labels"):
        accuracy([], [])
    with pytest.raises(ConfigError, match="'z' is not in labels"):
        confusion_matrix(["a"], ["z"], labels=["a"])
    with pytest.raises(ConfigError, match="non-empty"):
        mean_std([])
    with pytest.raises(ConfigError, match="NaN"):
        mean_std([1.0, float("nan")])

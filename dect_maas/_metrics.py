"""Evaluation metrics: accuracy, macro-F1, confusion matrix, and mean ± std over seeds.

Labels may be class names or integers; ``labels`` fixes the class order (default: the sorted union
of the labels seen), as scikit-learn does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._exceptions import ConfigError

__all__ = ["accuracy", "confusion_matrix", "macro_f1", "mean_std"]

ArrayLike = Sequence[Any] | npt.NDArray[Any]


def _pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shapes {t.shape} and {p.shape}")
    if t.shape != p.shape:
        raise ConfigError(f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}")
    if t.size == 0:
        raise ConfigError("no labels to score")
    return t, p


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of predictions equal to the truth."""
    t, p = _pair(y_true, y_pred)
    return float((t == p).mean())


def confusion_matrix(
    y_true: ArrayLike, y_pred: ArrayLike, labels: ArrayLike | None = None
) -> npt.NDArray[np.int64]:
    """``m[i, j]`` = number of examples of class ``labels[i]`` predicted as ``labels[j]``."""
    t, p = _pair(y_true, y_pred)
    order = np.unique(np.concatenate([t, p])) if labels is None else np.asarray(labels)
    index = {v: i for i, v in enumerate(order.tolist())}
    if len(index) != len(order):
        raise ConfigError("labels has duplicates")
    m = np.zeros((len(order), len(order)), dtype=np.int64)
    for a, b in zip(t.tolist(), p.tolist(), strict=True):
        if a not in index or b not in index:
            raise ConfigError(f"label {a if a not in index else b!r} is not in labels")
        m[index[a], index[b]] += 1
    return m


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, labels: ArrayLike | None = None) -> float:
    """Unweighted mean of per-class F1; a class with no true and no predicted example scores 0."""
    m = confusion_matrix(y_true, y_pred, labels).astype(np.float64)
    tp = np.diag(m)
    denom = m.sum(0) + m.sum(1)  # 2·tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def mean_std(values: ArrayLike, ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation of per-seed results.

    ``ddof=1`` (default) is the sample standard deviation; a single value has std 0.0.
    ``ddof=0`` gives ``numpy.std``'s population form.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ConfigError("mean_std needs a non-empty list of numbers")
    if not np.isfinite(v).all():
        raise ConfigError("mean_std got NaN or inf")
    return float(v.mean()), float(v.std(ddof=ddof)) if v.size > ddof else 0.0

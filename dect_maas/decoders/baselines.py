"""Baselines on the same Features and with the same estimator interface as `DecTClassifier`.

Users compare methods on features they already paid for, without querying again:

- `ZeroShotClassifier`: argmax of the prompt scores; ``calibration="auto"`` gives calibrated
  zero-shot (the content-free correction of DecT §2.2, in the form that fits the score kind).
- `PrototypeClassifier`: DecT with λ = 0, the decoder alone (what embedding-only providers get).
- `LinearProbeClassifier`: multinomial logistic regression on standardised hidden vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from dect_maas._exceptions import ConfigError, FeaturesError
from dect_maas._features import Features

from .dect import CalibrationKind, calibrate
from .estimator import (
    DecTClassifier,
    FeatureClassifier,
    Labels,
    check_features,
    encode_labels,
    resolve_calibration,
    resolve_classes,
)

__all__ = ["LinearProbeClassifier", "PrototypeClassifier", "ZeroShotClassifier"]


class ZeroShotClassifier(FeatureClassifier):
    """The prompt alone: predict the class whose label words score highest.

    ``calibration="none"`` is the raw zero-shot prompt; ``"auto"`` (or ``"logits"`` /
    ``"logprobs"``) is calibrated zero-shot and needs ``features.content_free``. ``fit`` learns
    nothing from labels: it fixes ``classes_`` and the calibration vector, so ``y`` may be None.
    """

    def __init__(self, calibration: str = "none") -> None:
        self.calibration = calibration

    calibration_: npt.NDArray[np.float32] | None
    calibration_kind_: CalibrationKind | None

    def fit(self, features: Features, y: Labels | None = None) -> ZeroShotClassifier:
        check_features(features, need_scores=True)
        assert features.scores is not None
        kind, vector = resolve_calibration(features, self.calibration)
        classes = resolve_classes(features, [])
        if y is not None:
            encode_labels(y, classes, n_rows=len(features))  # validated, not used
        self.classes_ = classes
        self.calibration_kind_ = kind
        self.calibration_ = None if vector is None else vector.numpy().copy()
        return self

    def decision_function(self, features: Features) -> npt.NDArray[np.float32]:
        """The (calibrated) prompt scores, shape (N, C)."""
        self._check_fitted()
        check_features(features, need_scores=True)
        assert features.scores is not None
        if features.scores.shape[1] != len(self.classes_):
            raise FeaturesError(
                f"scores have {features.scores.shape[1]} columns, the model has "
                f"{len(self.classes_)} classes"
            )
        if self.calibration_ is None or self.calibration_kind_ is None:
            return features.scores.copy()
        s = calibrate(
            torch.from_numpy(features.scores),
            torch.from_numpy(self.calibration_),
            self.calibration_kind_,
        )
        return s.numpy()

    def _fitted_arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {} if self.calibration_ is None else {"calibration_": self.calibration_}

    def _fitted_scalars(self) -> dict[str, Any]:
        return {"calibration_kind_": self.calibration_kind_}

    def _set_fitted(self, arrays: dict[str, npt.NDArray[Any]], scalars: dict[str, Any]) -> None:
        self.calibration_ = arrays.get("calibration_")
        self.calibration_kind_ = scalars["calibration_kind_"]


class PrototypeClassifier(DecTClassifier):
    """DecT's decoder without the prompt scores (λ = 0): −‖û − p_c‖ + r_c.

    The baseline that shows what the prompt scores add, and the model that embedding-only
    providers get. Label-word scores, if present, are ignored.
    """

    def __init__(
        self,
        projection_dim: int = 128,
        n_steps: int = 30,
        lr: float = 0.01,
        normalize: bool = True,
        random_state: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(
            projection_dim=projection_dim,
            n_steps=n_steps,
            lr=lr,
            normalize=normalize,
            random_state=random_state,
            device=device,
        )

    def _settings(self) -> tuple[float | None, str]:
        return 0.0, "none"


class LinearProbeClassifier(FeatureClassifier):
    """Multinomial logistic regression on the hidden vectors (a linear probe).

    Features are standardised with the training mean and standard deviation; the objective is
    scikit-learn's ``LogisticRegression``: ``C · Σ_i CE_i + ½‖W‖²`` (bias not penalised),
    minimised with L-BFGS from zeros in float64, so the result is deterministic.
    """

    def __init__(
        self,
        C: float = 1.0,  # noqa: N803 - scikit-learn's name for the inverse regularisation strength
        max_iter: int = 200,
        standardize: bool = True,
        tol: float = 1e-6,
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.standardize = standardize
        self.tol = tol

    coef_: npt.NDArray[np.float64]
    intercept_: npt.NDArray[np.float64]
    mean_: npt.NDArray[np.float64]
    scale_: npt.NDArray[np.float64]
    n_features_in_: int

    def fit(self, features: Features, y: Labels | None = None) -> LinearProbeClassifier:
        if not (isinstance(self.C, (int, float)) and self.C > 0 and np.isfinite(self.C)):
            raise ConfigError(f"C must be a positive number, got {self.C!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"max_iter must be a positive int, got {self.max_iter!r}")
        check_features(features, need_hidden=True)
        assert features.hidden is not None
        classes = resolve_classes(features, y)
        labels = torch.from_numpy(encode_labels(y, classes, n_rows=len(features)))
        x = torch.from_numpy(features.hidden).to(torch.float64)  # (N, D)
        n, dim = x.shape
        if self.standardize:
            mean = x.mean(0)  # (D,)
            scale = x.std(0, unbiased=False)  # (D,)
            scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
        else:
            mean, scale = (
                torch.zeros(dim, dtype=torch.float64),
                torch.ones(dim, dtype=torch.float64),
            )
        z = (x - mean) / scale  # (N, D)
        weight = torch.zeros(len(classes), dim, dtype=torch.float64, requires_grad=True)  # (C, D)
        bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)  # (C,)
        opt = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        penalty = 1.0 / (2.0 * float(self.C) * n)  # sklearn's objective divided by C·N

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z @ weight.T + bias, labels) + penalty * (weight * weight).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
        self.classes_ = classes
        self.coef_ = weight.detach().numpy().copy()
        self.intercept_ = bias.detach().numpy().copy()
        self.mean_ = mean.numpy().copy()
        self.scale_ = scale.numpy().copy()
        self.n_features_in_ = int(dim)
        return self

    def decision_function(self, features: Features) -> npt.NDArray[np.float32]:
        """Class logits of the logistic regression, shape (N, C)."""
        self._check_fitted()
        check_features(features, need_hidden=True)
        assert features.hidden is not None
        if features.hidden.shape[1] != self.n_features_in_:
            raise FeaturesError(
                f"hidden vectors have {features.hidden.shape[1]} dimensions, the model was fitted "
                f"on {self.n_features_in_}"
            )
        z = (features.hidden.astype(np.float64) - self.mean_) / self.scale_  # (N, D)
        return (z @ self.coef_.T + self.intercept_).astype(np.float32)  # (N, C)

    def _fitted_arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {
            "coef_": self.coef_,
            "intercept_": self.intercept_,
            "mean_": self.mean_,
            "scale_": self.scale_,
        }

    def _set_fitted(self, arrays: dict[str, npt.NDArray[Any]], scalars: dict[str, Any]) -> None:
        self.coef_ = arrays["coef_"]
        self.intercept_ = arrays["intercept_"]
        self.mean_ = arrays["mean_"]
        self.scale_ = arrays["scale_"]
        self.n_features_in_ = int(self.coef_.shape[1])

"""Scikit-learn style estimators on Features: a shared base and `DecTClassifier`.

The contract follows scikit-learn without depending on it: ``__init__`` only stores its arguments;
``fit`` validates, sets attributes ending in ``_`` (numpy arrays) and returns ``self``; randomness
comes only from ``random_state`` through a local ``torch.Generator``. Fitted models are saved as a
``.npz`` of plain arrays plus JSON text and read back with ``allow_pickle=False``, so loading a
model never runs code.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch

from dect_maas._exceptions import ConfigError, FeaturesError, NotFittedError
from dect_maas._features import Features, npz_problem

from .dect import (
    CalibrationKind,
    DecTDecoder,
    PrototypeInit,
    Representation,
    calibrate,
    calibration_vector,
    initial_parameters,
    prompt_term,
    represent,
    span_basis,
    train_decoder,
)

__all__ = ["DecTClassifier"]

FORMAT_VERSION = 1
Labels = Sequence[Any] | npt.NDArray[Any]
_CHUNK = 32768  # rows per block at predict time: bounds memory, keeps matmuls large

_E = TypeVar("_E", bound="FeatureClassifier")


class FeatureClassifier:
    """Shared machinery: parameters, label encoding, predict/score, and save/load.

    Subclasses implement ``fit``, ``decision_function``, ``_fitted_arrays`` and ``_set_fitted``.
    """

    classes_: npt.NDArray[Any]

    # -- parameters (sklearn's get_params / set_params) -------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self: _E, **params: Any) -> _E:
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ConfigError(
                    f"{type(self).__name__} has no parameter {name!r}; valid: {sorted(valid)}"
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        shown = [
            f"{name}={getattr(self, name)!r}"
            for name, p in sig.parameters.items()
            if name != "self" and getattr(self, name) != p.default
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- what subclasses provide ------------------------------------------------------------------

    def fit(self: _E, features: Features, y: Labels | None = None) -> _E:
        raise NotImplementedError

    def decision_function(self, features: Features) -> npt.NDArray[np.float32]:
        """Class scores ``(N, C)``; the predicted class is the argmax of each row."""
        raise NotImplementedError

    def _fitted_arrays(self) -> dict[str, npt.NDArray[Any]]:
        raise NotImplementedError

    def _set_fitted(self, arrays: dict[str, npt.NDArray[Any]], scalars: dict[str, Any]) -> None:
        raise NotImplementedError

    def _fitted_scalars(self) -> dict[str, Any]:
        return {}

    # -- scikit-learn interoperability ----------------------------------------------------------

    def __sklearn_tags__(self) -> Any:
        """What scikit-learn >= 1.6 reads (``is_classifier``, cross-validation, search).

        Imported here because scikit-learn is optional: only sklearn itself calls this.
        """
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags(),
            input_tags=InputTags(two_d_array=False),  # X is Features, sliced by row
        )

    # -- shared behaviour -------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(features, y) first"
            )

    def predict(self, features: Features) -> npt.NDArray[Any]:
        """The predicted class of each row, as elements of ``classes_``."""
        scores = self.decision_function(features)
        pred: npt.NDArray[Any] = self.classes_[scores.argmax(axis=1)]
        return pred

    def predict_proba(self, features: Features) -> npt.NDArray[np.float32]:
        """Softmax of ``decision_function``; columns follow ``classes_``.

        Not calibrated: the decoder is trained for accuracy on a few shots, so these are
        scores that sum to 1, not probabilities to threshold on.
        """
        logits = torch.from_numpy(self.decision_function(features))
        return torch.softmax(logits, dim=1).numpy()

    def score(self, features: Features, y: Labels) -> float:
        """Accuracy of ``predict`` against ``y`` (class names or indices into ``classes_``)."""
        self._check_fitted()
        true = encode_labels(y, self.classes_, n_rows=len(features))
        pred = self.decision_function(features).argmax(axis=1)
        return float((pred == true).mean())

    def save(self, path: str | PathLike[str]) -> Path:
        """Write the fitted model as a ``.npz`` (no pickle); returns the path written."""
        self._check_fitted()
        p = Path(path)
        if p.suffix != ".npz":
            p = p.with_name(p.name + ".npz")
        header = {
            "format_version": FORMAT_VERSION,
            "estimator": type(self).__name__,
            "params": self.get_params(),
            "fitted": self._fitted_scalars(),
        }
        arrays: dict[str, Any] = {"classes_": self.classes_, **self._fitted_arrays()}
        for name, arr in arrays.items():
            if arr.dtype == object:
                raise ConfigError(f"cannot save {name}: object arrays would need pickle")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez(tmp, header_json=np.array(json.dumps(header, sort_keys=True)), **arrays)
        tmp.replace(p)
        return p

    @classmethod
    def load(cls: type[_E], path: str | PathLike[str]) -> _E:
        """Read a model written by ``save``; the file must hold this estimator class."""
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as data:
                header = json.loads(str(data["header_json"]))
                arrays = {k: data[k] for k in data.files if k != "header_json"}
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{p}: not a dect-maas model file ({npz_problem(exc)})") from exc
        if not isinstance(header, dict):
            raise ConfigError(f"{p}: not a dect-maas model file (bad header)")
        if header.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{p}: model format version {header.get('format_version')!r}, "
                f"this dect-maas reads {FORMAT_VERSION}"
            )
        if header.get("estimator") != cls.__name__:
            raise ConfigError(
                f"{p} holds a {header.get('estimator')}, not a {cls.__name__}; "
                f"load it with {header.get('estimator')}.load"
            )
        est = cls(**header["params"])
        est.classes_ = arrays.pop("classes_")
        est._set_fitted(arrays, header["fitted"])
        return est


# -- helpers shared by every estimator ------------------------------------------------------------


def check_features(features: Any, *, need_hidden: bool = False, need_scores: bool = False) -> None:
    if not isinstance(features, Features):
        raise FeaturesError(
            f"expected a Features object, got {type(features).__name__}; wrap arrays as "
            "Features(scores, hidden=...)"
        )
    if len(features) == 0:
        raise FeaturesError("features hold no examples")
    if need_hidden and features.hidden is None:
        raise FeaturesError(
            "these features have no hidden vectors (features.hidden is None); this estimator needs "
            "them: query a provider that returns hidden states or embeddings"
        )
    if need_scores and features.scores is None:
        raise FeaturesError(
            "these features have no label-word scores (features.scores is None; an "
            "embedding-only provider?); this estimator needs them"
        )


def resolve_classes(features: Features, y: Labels | None) -> npt.NDArray[Any]:
    """``classes_`` for a fit: the names in ``meta.classes``, else column indices ``0..C-1``.

    Features with neither (embedding-only, no class names) take the sorted distinct labels of y.
    """
    if features.meta.classes:
        return np.array(features.meta.classes)
    if features.scores is not None:
        return np.arange(features.scores.shape[1])
    labels = _as_list(y)
    kinds = {isinstance(v, str) for v in labels}
    if len(kinds) > 1:
        raise ConfigError("y mixes class names and integers; use one kind of label")
    return np.unique(np.array(labels))


def encode_labels(y: Any, classes: npt.NDArray[Any], *, n_rows: int) -> npt.NDArray[np.int64]:
    """Class indices for y, whose items are elements of ``classes`` or integer indices into it."""
    labels = _as_list(y)
    if len(labels) != n_rows:
        raise ConfigError(f"y has {len(labels)} labels but the features have {n_rows} rows")
    lookup = {c: i for i, c in enumerate(classes.tolist())}
    by_index = not np.issubdtype(classes.dtype, np.integer)
    out = np.empty(len(labels), dtype=np.int64)
    for i, v in enumerate(labels):
        if isinstance(v, (bool, np.bool_)):
            raise ConfigError(f"label {v!r} at position {i} is a bool; use a class name or index")
        key = v.item() if isinstance(v, np.generic) else v
        if key in lookup:
            out[i] = lookup[key]
        elif by_index and isinstance(key, int) and 0 <= key < len(classes):
            out[i] = key
        else:
            shown = ", ".join(repr(c) for c in classes.tolist()[:20])
            raise ConfigError(
                f"label {key!r} at position {i} is not a known class; classes are [{shown}]"
                + (f" or indices 0..{len(classes) - 1}" if by_index else "")
            )
    return out


def training_labels(
    features: Features, y: Labels | None, *, why: str = ""
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Classes, label indices and per-class counts of a training set; every class needs an
    example (``why`` says why, in the error)."""
    classes = resolve_classes(features, y)
    labels = encode_labels(y, classes, n_rows=len(features))
    if len(classes) < 2:
        raise ConfigError(f"need at least two classes, got {len(classes)}")
    counts = np.bincount(labels, minlength=len(classes))
    if (counts == 0).any():
        missing = [str(c) for c in classes[counts == 0].tolist()]
        raise ConfigError(f"class(es) {', '.join(missing)} have no training examples{why}")
    return classes, labels, counts


def _as_list(y: Any) -> list[Any]:
    if y is None:
        raise ConfigError("y is required: one label per row of the features")
    if isinstance(y, (str, bytes)):
        raise ConfigError("y must be a sequence of labels, not a single string")
    arr = np.asarray(y, dtype=object) if not isinstance(y, np.ndarray) else y
    if arr.ndim != 1:
        raise ConfigError(f"y must be one-dimensional, got shape {arr.shape}")
    return list(arr.tolist())


def resolve_calibration(
    features: Features | None, calibration: str
) -> tuple[CalibrationKind | None, torch.Tensor | None]:
    """Which calibration form applies, and its per-class vector (§2.2 of the method note).

    ``features=None`` only checks the setting (for models that do not use the scores).
    """
    if calibration not in ("auto", "none", "logits", "logprobs"):
        raise ConfigError(
            f"calibration must be 'auto', 'none', 'logits' or 'logprobs', got {calibration!r}"
        )
    if calibration == "none" or features is None:
        return None, None
    if features.scores is None or (calibration == "auto" and features.meta.score_kind == "none"):
        if calibration == "auto":
            return None, None
        raise ConfigError(
            f"calibration={calibration!r} needs label-word scores; features have none"
        )
    kind: CalibrationKind
    if calibration == "auto":
        kind = "logprobs" if features.meta.score_kind == "logprobs" else "logits"
    else:
        kind = "logprobs" if calibration == "logprobs" else "logits"
    if features.content_free is None:
        raise ConfigError(
            f"calibration={calibration!r} needs the content-free scores, but "
            "features.content_free is None: query the content-free prompt (the client does it "
            "when asked), attach it with features.with_content_free(...), or pass "
            "calibration='none'"
        )
    vector = calibration_vector(torch.from_numpy(features.content_free), kind)
    if not bool(torch.isfinite(vector).all()):
        raise ConfigError(
            "content-free scores average to 0, so the ratio calibration is undefined; "
            "pass calibration='none'"
        )
    return kind, vector


def _reference(features: Features, representation: str) -> npt.NDArray[np.float32] | None:
    """The content-free hidden vector when the representation needs it, else None."""
    if representation != "content_free":
        return None
    if features.content_free_hidden is None:
        raise ConfigError(
            "representation='content_free' needs the content-free prompt's hidden vector, but "
            "features.content_free_hidden is None: query with a client that keeps it, attach it "
            "with features.with_content_free_hidden(...), or pass representation='raw'"
        )
    return features.content_free_hidden.copy()


def _seeded_generator(random_state: int | None) -> torch.Generator:
    gen = torch.Generator()
    if random_state is None:
        gen.seed()
    else:
        if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)):
            raise ConfigError(f"random_state must be an int or None, got {random_state!r}")
        gen.manual_seed(int(random_state))
    return gen


# -- DecT -----------------------------------------------------------------------------------------


class DecTClassifier(FeatureClassifier):
    """Decoder Tuning (Cui et al., ACL 2023) on Features: hidden vectors plus prompt scores.

    logit_c = −‖û − p_c‖ + r_c + λ·s_c, with û the L2-normalised projection W h (``normalize=False``
    gives the paper-v1 un-normalised form), Xavier-uniform prototypes that stay frozen, radii
    initialised from the data, and ``n_steps`` full-batch Adam steps over W and r.

    ``prompt_weight`` is λ; None means 1/shot, where shot is the number of training examples per
    class (the mean per class when classes are unbalanced, i.e. N / C). Features whose ``scores``
    are None (embedding-only providers) train with λ = 0: the prototype decoder alone.

    ``calibration``: ``"auto"`` uses the content-free scores in the form that fits the score kind
    in ``features.meta`` (the paper's ratio z / κ for raw logits; z − log p_cf for
    log-probabilities) and needs ``features.content_free``; ``"none"`` turns it off; ``"logits"``
    and ``"logprobs"`` force a form. The vector fitted here is reused at predict time.

    ``representation``: ``"raw"`` (the paper) feeds the hidden vectors as they are;
    ``"content_free"`` subtracts the content-free prompt's hidden vector and L2-normalises
    (needs ``features.content_free_hidden``; no label, no query). ``basis``: ``"full"`` (the
    paper) trains W in all D dimensions; ``"span"`` trains it in an orthonormal basis of the
    training vectors' span, which is faster when there are fewer examples than dimensions and
    drops the part of a new vector that no training vector has (`AutoDecTClassifier` uses it).
    ``learn_prototypes``, ``prototype_init`` and ``distance_scale`` are further variants outside
    the paper (see ``decoders/dect.py``). Every default gives the paper's method.
    """

    def __init__(
        self,
        projection_dim: int = 128,
        prompt_weight: float | None = None,
        n_steps: int = 30,
        lr: float = 0.01,
        normalize: bool = True,
        calibration: str = "auto",
        random_state: int | None = None,
        device: str = "cpu",
        *,
        learn_prototypes: bool = False,
        prototype_init: str = "random",
        distance_scale: bool = False,
        representation: str = "raw",
        basis: str = "full",
    ) -> None:
        self.projection_dim = projection_dim
        self.prompt_weight = prompt_weight
        self.n_steps = n_steps
        self.lr = lr
        self.normalize = normalize
        self.calibration = calibration
        self.random_state = random_state
        self.device = device
        self.learn_prototypes = learn_prototypes
        self.prototype_init = prototype_init
        self.distance_scale = distance_scale
        self.representation = representation
        self.basis = basis

    # fitted attributes
    projection_: npt.NDArray[np.float32]
    prototypes_: npt.NDArray[np.float32]
    radii_: npt.NDArray[np.float32]
    prompt_weight_: float
    calibration_: npt.NDArray[np.float32] | None
    calibration_kind_: CalibrationKind | None
    distance_scale_: float
    n_features_in_: int
    loss_curve_: npt.NDArray[np.float32]
    reference_: npt.NDArray[np.float32] | None

    def _settings(self) -> tuple[float | None, str]:
        """(prompt_weight, calibration) as fit uses them; PrototypeClassifier fixes both."""
        return self.prompt_weight, self.calibration

    def _check_params(self) -> None:
        if not isinstance(self.projection_dim, (int, np.integer)) or self.projection_dim < 1:
            raise ConfigError(f"projection_dim must be a positive int, got {self.projection_dim!r}")
        if not isinstance(self.n_steps, (int, np.integer)) or self.n_steps < 0:
            raise ConfigError(f"n_steps must be an int >= 0, got {self.n_steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.prototype_init not in ("random", "class_means"):
            raise ConfigError(
                f"prototype_init must be 'random' or 'class_means', got {self.prototype_init!r}"
            )
        if self.representation not in ("raw", "content_free"):
            raise ConfigError(
                f"representation must be 'raw' or 'content_free', got {self.representation!r}"
            )
        if self.basis not in ("full", "span"):
            raise ConfigError(f"basis must be 'full' or 'span', got {self.basis!r}")
        weight, _ = self._settings()
        if weight is not None and not (isinstance(weight, (int, float)) and np.isfinite(weight)):
            raise ConfigError(f"prompt_weight must be a finite number or None, got {weight!r}")

    def fit(self, features: Features, y: Labels | None = None) -> DecTClassifier:
        """Train the decoder on ``features`` with labels ``y`` (class names or column indices)."""
        self._check_params()
        check_features(features, need_hidden=True)
        assert features.hidden is not None
        classes, labels, _ = training_labels(
            features,
            y,
            why="; DecT initialises each class's radius from its examples, so every class needs "
            "at least one",
        )
        n_classes = len(classes)
        weight, calibration = self._settings()
        if features.scores is None:
            if weight not in (None, 0, 0.0):
                raise ConfigError(
                    f"prompt_weight={weight} but the features have no label-word scores; "
                    "leave prompt_weight=None (the prototype decoder alone is trained)"
                )
            lam = 0.0
        else:
            lam = float(n_classes / len(labels)) if weight is None else float(weight)
        # calibration only matters when the scores are used (λ ≠ 0); the setting is checked anyway
        kind, vector = resolve_calibration(features if lam != 0.0 else None, calibration)

        reference = _reference(features, self.representation)
        dev = torch.device(self.device)
        hidden = torch.from_numpy(features.hidden).to(dev)  # (N, D)
        ref = None if reference is None else torch.from_numpy(reference).to(dev)  # (D,)
        x = represent(hidden, ref, cast(Representation, self.representation))  # (N, D)
        y_t = torch.from_numpy(labels).to(dev)  # (N,)
        scores = None
        if features.scores is not None and lam != 0.0:
            scores = torch.from_numpy(features.scores).to(dev)  # (N, C)
            if kind is not None and vector is not None:
                scores = calibrate(scores, vector.to(dev), kind)
        _seeded_generator(self.random_state)  # validates random_state
        w0, p0 = initial_parameters(
            x.shape[1], n_classes, int(self.projection_dim), self.random_state
        )  # (d, D), (C, d)
        basis = span_basis(x) if self.basis == "span" else None  # (D, r)
        decoder = DecTDecoder(
            x.shape[1] if basis is None else basis.shape[1],
            n_classes,
            int(self.projection_dim),
            normalize=bool(self.normalize),
            device="meta",
        ).to_empty(device=dev)
        with torch.no_grad():
            decoder.proj.weight.copy_(w0 if basis is None else w0 @ basis.cpu())
            decoder.prototypes.copy_(p0)
        losses = train_decoder(
            decoder,
            x if basis is None else x @ basis,
            y_t,
            prompt_term(scores, lam),
            n_steps=int(self.n_steps),
            lr=float(self.lr),
            prototype_init=cast(PrototypeInit, self.prototype_init),
            learn_prototypes=bool(self.learn_prototypes),
            distance_scale=bool(self.distance_scale),
        )
        projection = decoder.proj.weight.detach()  # (d, D) or (d, r)
        if basis is not None:
            projection = projection @ basis.T  # (d, D): back to the hidden space
        self.classes_ = classes
        self.n_features_in_ = int(hidden.shape[1])
        self.reference_ = reference
        self.projection_ = projection.cpu().numpy().copy()
        self.prototypes_ = decoder.prototypes.detach().cpu().numpy().copy()
        self.radii_ = decoder.radii.detach().cpu().numpy().copy()
        self._log_scale = np.float32(decoder.log_scale.detach().cpu().item())
        self.distance_scale_ = float(np.exp(self._log_scale))
        self.prompt_weight_ = lam
        self.calibration_kind_ = kind
        self.calibration_ = None if vector is None else vector.cpu().numpy().copy()
        self.loss_curve_ = losses.cpu().numpy()
        return self

    # -- inference --------------------------------------------------------------------------------

    def _decoder(self, dev: torch.device) -> DecTDecoder:
        d, dim = self.projection_.shape
        dec = DecTDecoder(
            dim, self.prototypes_.shape[0], d, normalize=bool(self.normalize), device="meta"
        )
        dec = dec.to_empty(device=dev)
        with torch.no_grad():
            dec.proj.weight.copy_(torch.from_numpy(self.projection_))
            dec.prototypes.copy_(torch.from_numpy(self.prototypes_))
            dec.radii.copy_(torch.from_numpy(self.radii_))
            dec.log_scale.fill_(float(self._log_scale))
        return dec

    def decision_function(self, features: Features) -> npt.NDArray[np.float32]:
        """The final class logits −‖û − p_c‖ + r_c + λ·s_c, shape (N, C), float32."""
        self._check_fitted()
        check_features(features, need_hidden=True)
        assert features.hidden is not None
        n_classes = len(self.classes_)
        if features.hidden.shape[1] != self.n_features_in_:
            raise FeaturesError(
                f"hidden vectors have {features.hidden.shape[1]} dimensions, the model was fitted "
                f"on {self.n_features_in_}"
            )
        use_prompt = self.prompt_weight_ != 0.0
        if use_prompt:
            if features.scores is None:
                raise FeaturesError(
                    f"this model weighs the prompt scores (prompt_weight_={self.prompt_weight_}) "
                    "but the features have none"
                )
            if features.scores.shape[1] != n_classes:
                raise FeaturesError(
                    f"scores have {features.scores.shape[1]} columns, the model has "
                    f"{n_classes} classes"
                )
        dev = torch.device(self.device)
        out = np.empty((len(features), n_classes), dtype=np.float32)
        with torch.inference_mode():
            dec = self._decoder(dev)
            cal = None if self.calibration_ is None else torch.from_numpy(self.calibration_).to(dev)
            ref = None if self.reference_ is None else torch.from_numpy(self.reference_).to(dev)
            kind = cast(Representation, self.representation)
            for start in range(0, len(features), _CHUNK):
                stop = start + _CHUNK
                h = torch.from_numpy(features.hidden[start:stop]).to(dev)  # (n, D)
                s = None
                if use_prompt:
                    assert features.scores is not None
                    s = torch.from_numpy(features.scores[start:stop]).to(dev)  # (n, C)
                    if cal is not None and self.calibration_kind_ is not None:
                        s = calibrate(s, cal, self.calibration_kind_)  # (n, C)
                prompt = None if s is None else prompt_term(s, self.prompt_weight_)  # (n, C)
                logits = dec(represent(h, ref, kind), prompt)  # (n, C)
                out[start:stop] = logits.cpu().numpy()
        return out

    # -- persistence ------------------------------------------------------------------------------

    def _fitted_arrays(self) -> dict[str, npt.NDArray[Any]]:
        arrays = {
            "projection_": self.projection_,
            "prototypes_": self.prototypes_,
            "radii_": self.radii_,
            "log_scale": np.asarray(self._log_scale, dtype=np.float32),
            "loss_curve_": self.loss_curve_,
        }
        if self.calibration_ is not None:
            arrays["calibration_"] = self.calibration_
        if self.reference_ is not None:
            arrays["reference_"] = self.reference_
        return arrays

    def _fitted_scalars(self) -> dict[str, Any]:
        return {
            "prompt_weight_": self.prompt_weight_,
            "calibration_kind_": self.calibration_kind_,
            "n_features_in_": self.n_features_in_,
        }

    def _set_fitted(self, arrays: dict[str, npt.NDArray[Any]], scalars: dict[str, Any]) -> None:
        self.projection_ = arrays["projection_"]
        self.prototypes_ = arrays["prototypes_"]
        self.radii_ = arrays["radii_"]
        self._log_scale = np.float32(arrays["log_scale"])
        self.distance_scale_ = float(np.exp(self._log_scale))
        self.loss_curve_ = arrays["loss_curve_"]
        self.calibration_ = arrays.get("calibration_")
        self.reference_ = arrays.get("reference_")
        self.prompt_weight_ = float(scalars["prompt_weight_"])
        self.calibration_kind_ = scalars["calibration_kind_"]
        self.n_features_in_ = int(scalars["n_features_in_"])

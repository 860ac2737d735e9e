"""`AutoDecTClassifier`: DecT that picks its own settings by cross-validation on the training set.

The paper's fixed settings (λ = 1/shot, 30 Adam steps at lr 0.01, frozen random prototypes) do not
suit every model and task: on a small causal LM, calibrated zero-shot can beat DecT at few shots
and a linear probe can beat it at many. This estimator scores a grid of DecT settings and the
plain methods that run on the same features (zero-shot with and without calibration, the
prototype decoder alone, a linear probe, the paper's DecT) by stratified cross-validation on the
labelled training features alone - no query is made - and refits the winner on all of them.

Search (``DEFAULT_GRID``): the prompt weight λ from 0 to values where the prompt dominates, with
and without calibration; the learning rate; the number of steps (read off one run at
``STEP_CHECKPOINTS``); two decoders: the paper's (random frozen prototypes) and one whose
prototypes start at the class means and train along with a learned distance scale.

Speed: every (setting, fold) pair is trained at once by `train_members`, full batch, with a leading
member dimension on every parameter and one Adam over all of them. Each fold's training vectors
span at most ``n_train`` of the D dimensions, so the searched decoders work in that span (an
orthonormal basis of the fold's training vectors): the same function of the training data, a
``D / n_train`` times smaller matmul, and test vectors lose only the part that no training
vector has. The refit works in the span of all training vectors, exactly as the folds did; its
projection is then mapped back to D dimensions, so the fitted model is a plain DecT decoder.

Small sets: with one example per class nothing trained can be held out, but the prompt learns
nothing from labels, so zero-shot (with and without calibration) is scored on every training
example and the better one is used (``one_shot="paper"`` uses the paper's DecT instead). With 2-3
per class each fold holds out one example per class; when there are few examples the fold
assignment is repeated with new shuffles (up to ``max_repeats`` times) so that every setting is
judged on more held-out predictions.

Class mix: k-shot training sets are balanced, so everything trained on them, and calibrated
zero-shot, assumes balanced classes. ``class_prior`` (the mix expected at prediction time, e.g.
the label counts of the file the shots came from) weights the held-out rows so that
cross-validation estimates accuracy under that mix, and adds log(prior / training share) to
those models' class scores (Bayes' rule for a shifted prior). Plain zero-shot keeps the model's
own prior and is never shifted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from ._baselines import LinearProbeClassifier, PrototypeClassifier, ZeroShotClassifier
from ._decoder import ADAM_BETAS, ADAM_EPS, DecTDecoder, calibrate
from ._estimator import (
    DecTClassifier,
    FeatureClassifier,
    Labels,
    check_features,
    resolve_calibration,
    training_labels,
)
from ._exceptions import ConfigError
from ._features import Features

__all__ = ["DEFAULT_GRID", "STEP_CHECKPOINTS", "AutoDecTClassifier", "Candidate", "train_members"]

Method = Literal["zero_shot", "linear_probe", "prototype", "paper", "dect"]
STEP_CHECKPOINTS: tuple[int, ...] = (10, 30)
_MIN_HELD_OUT = 48  # repeat the folds until about this many held-out predictions per setting
_TIE_SE = 1.0  # selection="1se": how many standard errors of a gap still count as a tie


@dataclass(frozen=True)
class Candidate:
    """One setting the search scores. ``method`` says which model; other fields apply to DecT.

    ``"paper"`` is `DecTClassifier` with its defaults (λ = 1/shot), ``"prototype"`` is
    `PrototypeClassifier` (λ = 0), ``"zero_shot"`` is `ZeroShotClassifier` and ``"linear_probe"``
    `LinearProbeClassifier`; ``"dect"`` is a searched DecT setting trained in the span basis.
    """

    method: Method
    calibrate: bool = False
    prompt_weight: float = 0.0
    lr: float = 0.01
    n_steps: int = 30
    prototypes: Literal["random", "class_means"] = "random"

    @property
    def name(self) -> str:
        if self.method == "zero_shot":
            return "zero_shot" + ("+calibrated" if self.calibrate else "")
        if self.method != "dect":
            return self.method
        cal = "+cal" if self.calibrate else ""
        proto = "means+scale" if self.prototypes == "class_means" else "random"
        return f"dect(λ={self.prompt_weight:g}{cal},lr={self.lr:g},steps={self.n_steps},{proto})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class _Scored:
    """A candidate's held-out results: accuracy, log-loss, and accuracy per training row."""

    accuracy: float
    log_loss: float
    per_row: npt.NDArray[np.float64]  # (N,) mean correctness over the folds that held it out


def _dect_grid() -> tuple[Candidate, ...]:
    out = []
    families: tuple[tuple[Literal["random", "class_means"], tuple[float, ...]], ...] = (
        ("random", (0.01, 0.05)),
        ("class_means", (0.05,)),
    )
    for prototypes, rates in families:
        for lr in rates:
            out.append(Candidate("dect", False, 0.0, lr, 0, prototypes))
            for weight in (1 / 8, 1 / 2, 2.0):
                for cal in (True, False):
                    out.append(Candidate("dect", cal, weight, lr, 0, prototypes))
    return tuple(out)  # n_steps is filled in from STEP_CHECKPOINTS


DEFAULT_GRID: tuple[Candidate, ...] = _dect_grid()


# -- the batched trainer --------------------------------------------------------------------------


def train_members(
    x: Tensor,
    w0: Tensor,
    p0: Tensor,
    base: Tensor,
    y: Tensor,
    train: Tensor,
    *,
    lr: Tensor,
    class_means: Tensor,
    checkpoints: Sequence[int],
    normalize: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Train G x K DecT decoders at once: G groups (folds) of rows, K settings.

    Every member follows `dect_maas._decoder.train_decoder` exactly (same init of the radii,
    same optional class-mean prototypes with a learned distance scale, same loss and Adam
    arithmetic); members differ in their training rows (by group), their prompt term and
    learning rate (by setting). The loss is the sum of the members' losses, so each member's
    gradient is its own.

    Shapes: ``x`` (G, N, r) vectors in each group's basis; ``w0`` (G, d, r) the initial projection
    in that basis; ``p0`` (C, d) random prototypes; ``base`` (N, K, C) the weighted prompt term
    λ_k·s_k; ``y`` (N,) labels; ``train`` (G, N) bool; ``lr`` (K,); ``class_means`` (K,) bool:
    prototypes start at the class means and train, with a learned distance scale.

    Returns the logits after each checkpoint's number of steps, (T, G, N, K, C), and the final
    parameters: ``W`` (G, r, K, d), ``P`` (G, K, C, d), ``r`` (G, K, C), ``a`` (G, K) (log scale).
    """
    n_groups, n_rows, _ = x.shape
    n_set, n_classes = base.shape[1], p0.shape[0]
    d = w0.shape[1]
    onehot = F.one_hot(y, n_classes).to(x.dtype)  # (N, C)
    trainf = train.to(x.dtype)  # (G, N)
    n_train = trainf.sum(1)  # (G,)
    member = trainf[:, :, None] * onehot[None]  # (G, N, C): row n counts for class c in group g
    per_class = member.sum(1)  # (G, C)
    if bool((per_class == 0).any()):
        raise ConfigError("every fold needs at least one training example of every class")

    with torch.no_grad():
        u0 = x @ w0.transpose(1, 2)  # (G, N, d), not normalised (§2.5)
        centre = member.transpose(1, 2) @ u0 / per_class[..., None]  # (G, C, d)
        dev = (u0[:, :, None, :] - centre[:, None]).norm(dim=-1)  # (G, N, C)
        radii0 = (dev * member).sum(1) / per_class  # (G, C)
        u0h = u0 / u0.norm(dim=-1, keepdim=True).clamp_min(1e-30) if normalize else u0
        means = member.transpose(1, 2) @ u0h / per_class[..., None]  # (G, C, d)
        cm = class_means.view(1, n_set, 1, 1)
        protos0 = torch.where(cm, means[:, None], p0[None, None])  # (G, K, C, d)

    w = w0.transpose(1, 2)[:, :, None, :].expand(-1, -1, n_set, -1).contiguous()  # (G, r, K, d)
    protos = protos0.clone()  # (G, K, C, d)
    radii = radii0[:, None, :].expand(-1, n_set, -1).contiguous()  # (G, K, C)
    log_scale = x.new_zeros(n_groups, n_set)  # (G, K)
    params = [w, protos, radii, log_scale]
    for p in params:
        p.requires_grad_(True)
    masks = [None, class_means.view(1, n_set, 1, 1), None, class_means.view(1, n_set)]
    lrs = [lr.view(1, 1, n_set, 1), lr.view(1, n_set, 1, 1), lr.view(1, n_set, 1), lr.view(1, -1)]
    adam_m = [torch.zeros_like(p) for p in params]
    adam_v = [torch.zeros_like(p) for p in params]
    beta1, beta2 = ADAM_BETAS

    stops = sorted(set(int(s) for s in checkpoints))
    saved = []
    for step in range(stops[-1] + 1):
        u = (x @ w.view(n_groups, -1, n_set * d)).view(n_groups, n_rows, n_set, d)  # (G,N,K,d)
        # ‖û − p‖² = ‖û‖² − 2 û·p + ‖p‖² with û = u/‖u‖, written so that no (G, N, K, d)
        # tensor besides u itself is made: û·p = (u·p)/‖u‖ and ‖û‖² = (‖u‖/‖u‖)²
        length = torch.linalg.vector_norm(u, dim=-1, keepdim=True)  # (G, N, K, 1)
        cross = torch.einsum("gnkd,gkcd->gnkc", u, protos)  # (G, N, K, C)
        if normalize:
            clamped = length.clamp_min(1e-30)  # (G, N, K, 1)
            cross = cross / clamped
            length = length / clamped
        sq = length * length - 2 * cross + (protos * protos).sum(-1)[:, None]  # (G, N, K, C)
        dist = sq.clamp_min(1e-12).sqrt()  # (G, N, K, C)
        logits = base[None] + radii[:, None] - log_scale.exp()[:, None, :, None] * dist
        if step in stops:
            saved.append(logits.detach())
        if step == stops[-1]:
            break
        nll = -(torch.log_softmax(logits, dim=-1) * onehot[None, :, None, :]).sum(-1)  # (G,N,K)
        loss = ((nll * trainf[..., None]).sum(1) / n_train[:, None]).sum()  # ()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            t = step + 1
            bc2 = math.sqrt(1 - beta2**t)
            for p, g, m, v, mask, rate in zip(
                params, grads, adam_m, adam_v, masks, lrs, strict=True
            ):
                if mask is not None:
                    g = g * mask
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = v.sqrt().div_(bc2).add_(ADAM_EPS)  # torch.optim.Adam's arithmetic
                p.sub_(torch.div(m, denom, out=denom).mul_(rate / (1 - beta1**t)))
    final = {"W": w.detach(), "P": protos.detach(), "r": radii.detach(), "a": log_scale.detach()}
    return torch.stack(saved), final


def _span(h: Tensor, rows: Tensor) -> Tensor:
    """An orthonormal basis (D, r) of the span of ``h[rows]``."""
    _, sv, vh = torch.linalg.svd(h[rows], full_matrices=False)
    keep = sv > sv[0] * 1e-6
    basis: Tensor = vh[keep].T  # (D, r)
    return basis


# -- the estimator --------------------------------------------------------------------------------


class AutoDecTClassifier(FeatureClassifier):
    """DecT whose settings, or a plainer model, are chosen by cross-validation on the training set.

    ``cv`` is the number of stratified folds (fewer when a class has fewer examples; with 2-3
    per class, one example per class is held out per fold). ``max_repeats`` bounds how often the
    folds are redrawn when there are few examples. ``random_state`` fixes the folds and the
    decoders' initialisation. ``fit`` sees only the training features; nothing is tuned on
    anything else.

    ``one_shot``: when a class has a single example, ``"prompt"`` (zero-shot, calibrated or not,
    scored on the training examples) or ``"paper"`` (the paper's DecT, which cannot be checked).
    ``class_prior``: ``{class: weight}``, the class mix expected at prediction time (module
    docstring); ``None`` assumes the training set's own mix.

    Fitted attributes (plain, JSON-serialisable): ``best_params_`` (the chosen setting; its
    ``"reason"`` says why), ``best_score_`` (its cross-validated accuracy), ``cv_results_``
    (every candidate's name, settings, accuracy, log-loss and the standard error of its gap to
    the best, on held-out rows), ``n_splits_``, ``n_repeats_``, ``prior_shift_`` (added to the
    chosen model's class scores; zeros without a prior). The refitted model is
    ``best_estimator_``; predictions come from it plus ``prior_shift_``.

    To reproduce the paper instead, use ``DecTClassifier()`` with its defaults.
    """

    def __init__(
        self,
        cv: int = 4,
        max_repeats: int = 8,
        projection_dim: int = 128,
        random_state: int | None = None,
        device: str = "cpu",
        selection: Literal["1se", "best"] = "1se",
        one_shot: Literal["prompt", "paper"] = "prompt",
        class_prior: Mapping[Any, float] | None = None,
    ) -> None:
        self.cv = cv
        self.one_shot = one_shot
        self.class_prior = class_prior
        self.selection = selection
        self.max_repeats = max_repeats
        self.projection_dim = projection_dim
        self.random_state = random_state
        self.device = device

    best_params_: dict[str, Any]
    best_score_: float | None
    cv_results_: dict[str, list[Any]]
    n_splits_: int
    n_repeats_: int
    best_estimator_: FeatureClassifier
    prior_shift_: npt.NDArray[np.float32]

    def _check_params(self) -> None:
        for name in ("cv", "max_repeats", "projection_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.cv < 2:
            raise ConfigError(f"cv must be at least 2, got {self.cv}")
        if self.selection not in ("1se", "best"):
            raise ConfigError(f"selection must be '1se' or 'best', got {self.selection!r}")
        if self.one_shot not in ("prompt", "paper"):
            raise ConfigError(f"one_shot must be 'prompt' or 'paper', got {self.one_shot!r}")
        rs = self.random_state
        if rs is not None and (isinstance(rs, bool) or not isinstance(rs, (int, np.integer))):
            raise ConfigError(f"random_state must be an int or None, got {rs!r}")

    def fit(self, features: Features, y: Labels | None = None) -> AutoDecTClassifier:
        """Choose a setting by cross-validation on (features, y), then refit it on all of them."""
        self._check_params()
        check_features(features)
        classes, labels, counts = training_labels(features, y)
        n_classes = len(classes)
        seed = (
            int(np.random.SeedSequence().generate_state(1)[0] >> 1)
            if self.random_state is None
            else int(self.random_state)
        )
        self.classes_ = classes
        self._resolve_prior(counts, labels)
        self._paper_weight = float(n_classes / len(labels))
        has_cal = features.scores is not None and features.content_free is not None
        if features.hidden is None:
            # nothing to train: the prompt alone, calibrated if that is more accurate here
            cands = [Candidate("zero_shot", False)] + ([Candidate("zero_shot", True)] * has_cal)
            results = self._score_fixed(features, labels, cands)
            self.n_splits_, self.n_repeats_ = 0, 0
            return self._finish(features, labels, cands, results, seed, "no hidden vectors")
        if counts.min() < 2 and features.scores is not None and self.one_shot == "prompt":
            # No trained model can be checked on held-out rows, but the prompt learns nothing
            # from labels, so every training example is a held-out row for it.
            cands = [Candidate("zero_shot", False)] + ([Candidate("zero_shot", True)] * has_cal)
            results = self._score_fixed(features, labels, cands)
            self.n_splits_, self.n_repeats_ = 0, 0
            why = "a class has one example: nothing trained can be checked, so the prompt alone"
            return self._finish(features, labels, cands, results, seed, why)
        if counts.min() < 2:
            self.n_splits_, self.n_repeats_ = 0, 0
            self.cv_results_ = _empty_results()
            self.best_score_ = None
            best = (
                Candidate("paper", has_cal)
                if features.scores is not None
                else Candidate("prototype")
            )
            self.best_params_ = {
                **best.to_dict(),
                "reason": "one example per class: nothing can be held out, so the paper's "
                "settings are used",
            }
            self.best_estimator_ = self._build(best, features, labels, seed)
            self.prior_shift_ = self._shift.astype(np.float32)
            return self

        folds = self._folds(labels, counts, seed)
        cands, results = self._cross_validate(features, labels, folds, seed)
        return self._finish(features, labels, cands, results, seed, "cross-validation")

    # -- cross-validation ---------------------------------------------------------------

    def _folds(
        self, labels: npt.NDArray[np.int64], counts: npt.NDArray[np.int64], seed: int
    ) -> npt.NDArray[np.bool_]:
        """Training masks (G, N) for n_repeats x n_splits stratified folds."""
        n_splits = int(min(self.cv, counts.min()))
        n_repeats = int(min(self.max_repeats, max(1, math.ceil(_MIN_HELD_OUT / len(labels)))))
        rng = np.random.RandomState(seed)
        masks: list[npt.NDArray[np.bool_]] = []
        for _ in range(n_repeats):
            fold_of = np.empty(len(labels), dtype=np.int64)
            for c in range(len(counts)):
                idx = np.flatnonzero(labels == c)
                rng.shuffle(idx)
                fold_of[idx] = (np.arange(len(idx)) + rng.randint(n_splits)) % n_splits
            masks.extend(fold_of != f for f in range(n_splits))
        self.n_splits_, self.n_repeats_ = n_splits, n_repeats
        return np.stack(masks)

    def _candidates(self, features: Features) -> tuple[list[Candidate], list[Candidate]]:
        has_scores = features.scores is not None
        has_cal = has_scores and features.content_free is not None
        plain: list[Candidate] = []
        if has_scores:
            plain.append(Candidate("zero_shot", False))
            if has_cal:
                plain.append(Candidate("zero_shot", True))
            plain.append(Candidate("paper", has_cal, self._paper_weight))
        plain += [Candidate("prototype"), Candidate("linear_probe")]
        grid = [
            c
            for c in DEFAULT_GRID
            if (has_scores or c.prompt_weight == 0.0) and (has_cal or not c.calibrate)
        ]
        return plain, grid

    def _cross_validate(
        self,
        features: Features,
        labels: npt.NDArray[np.int64],
        folds: npt.NDArray[np.bool_],
        seed: int,
    ) -> tuple[list[Candidate], list[_Scored]]:
        plain, grid = self._candidates(features)
        held = ~folds  # (G, N)
        out_c: list[Candidate] = []
        out_r: list[_Scored] = []
        fixed = [c for c in plain if c.method == "zero_shot"]
        out_c += fixed
        out_r += self._score_fixed(features, labels, fixed)
        for cand in (c for c in plain if c.method != "zero_shot"):
            logits = np.zeros((len(folds), len(labels), len(self.classes_)), dtype=np.float32)
            for g, mask in enumerate(folds):
                est = self._build(cand, features[mask], labels[mask], seed)
                logits[g] = est.decision_function(features)
            out_c.append(cand)
            out_r.append(self._scores(cand, torch.from_numpy(logits), labels, held))
        if grid:
            out = self._score_grid(features, labels, folds, grid, seed)
            out_c += out[0]
            out_r += out[1]
        return out_c, out_r

    def _shifted(self, cand: Candidate) -> bool:
        """Whether a candidate's class scores assume the balance of its training set.

        Everything trained on the labelled examples does, and so does calibrated zero-shot
        (calibration makes the content-free input uniform); plain zero-shot keeps the model's own
        prior and is never shifted.
        """
        return cand.method != "zero_shot" or cand.calibrate

    def _scores(
        self,
        cand: Candidate,
        logits: Tensor,
        labels: npt.NDArray[np.int64],
        held: npt.NDArray[np.bool_],
    ) -> _Scored:
        if self._shifted(cand):
            logits = logits + torch.from_numpy(self._shift).to(logits.dtype)
        return _held_out_scores(logits, labels, held, self._row_weights)

    def _resolve_prior(self, counts: npt.NDArray[np.int64], labels: npt.NDArray[np.int64]) -> None:
        """Log-prior shift (C,) and importance weight per training row, from ``class_prior``."""
        n_classes = len(counts)
        if self.class_prior is None:
            self._shift = np.zeros(n_classes)
            self._row_weights = np.ones(len(labels))
            return
        given = dict(self.class_prior)
        by_name = {str(k): v for k, v in given.items()}
        names = [str(c) for c in self.classes_.tolist()]
        unknown = sorted(set(by_name) - set(names))
        missing = [c for c in names if c not in by_name]
        if unknown or missing:
            raise ConfigError(
                "class_prior must give a frequency for exactly the training classes "
                f"{names}; unknown: {unknown}, missing: {missing}"
            )
        prior = np.array([float(by_name[c]) for c in names])
        if not np.all(np.isfinite(prior)) or (prior <= 0).any():
            raise ConfigError(f"class_prior frequencies must be positive numbers, got {given}")
        prior = prior / prior.sum()
        freq = counts / counts.sum()
        self._shift = np.log(prior) - np.log(freq)
        self._row_weights = (prior / freq)[labels]

    def _score_fixed(
        self, features: Features, labels: npt.NDArray[np.int64], cands: list[Candidate]
    ) -> list[_Scored]:
        """Zero-shot learns nothing from labels, so every training row is a held-out row."""
        res = []
        for c in cands:
            zs = ZeroShotClassifier("auto" if c.calibrate else "none").fit(features)
            logits = torch.from_numpy(zs.decision_function(features))[None]
            res.append(self._scores(c, logits, labels, np.ones((1, len(labels)), dtype=bool)))
        return res

    def _prompt_terms(self, features: Features, grid: Sequence[Candidate]) -> Tensor:
        """λ_k·s_k for every setting, (N, K, C); s calibrated where the setting says so."""
        n, c = len(features), len(self.classes_)
        if features.scores is None:
            return torch.zeros(n, len(grid), c)
        raw = torch.from_numpy(features.scores)  # (N, C)
        cal = raw
        kind, vector = resolve_calibration(features, "auto")
        if kind is not None and vector is not None:
            cal = calibrate(raw, vector, kind)  # (N, C)
        cols = [(cal if g.calibrate else raw) * g.prompt_weight for g in grid]
        return torch.stack(cols, dim=1)  # (N, K, C)

    def _init(self, dim: int, seed: int) -> tuple[Tensor, Tensor]:
        """W and P drawn exactly as `DecTClassifier` draws them for this random_state."""
        gen = torch.Generator().manual_seed(seed)
        dec = DecTDecoder(dim, len(self.classes_), int(self.projection_dim), generator=gen)
        return dec.proj.weight.detach().clone(), dec.prototypes.detach().clone()

    def _score_grid(
        self,
        features: Features,
        labels: npt.NDArray[np.int64],
        folds: npt.NDArray[np.bool_],
        grid: Sequence[Candidate],
        seed: int,
    ) -> tuple[list[Candidate], list[_Scored]]:
        assert features.hidden is not None
        h = torch.from_numpy(features.hidden)  # (N, D)
        w_init, p0 = self._init(h.shape[1], seed)  # (d, D), (C, d)
        train = torch.from_numpy(folds)  # (G, N)
        bases = [_span(h, row) for row in train]  # G x (D, r_g)
        rank = max(b.shape[1] for b in bases)
        bases = [F.pad(b, (0, rank - b.shape[1])) for b in bases]  # zero columns never train
        basis = torch.stack(bases)  # (G, D, r)
        x = h[None] @ basis  # (G, N, r)
        w0 = w_init[None] @ basis  # (G, d, r)
        logits, _ = train_members(
            x,
            w0,
            p0,
            self._prompt_terms(features, grid),
            torch.from_numpy(labels),
            train,
            lr=torch.tensor([g.lr for g in grid]),
            class_means=torch.tensor([g.prototypes == "class_means" for g in grid]),
            checkpoints=STEP_CHECKPOINTS,
        )  # (T, G, N, K, C)
        held = ~folds
        cands, res = [], []
        for t, steps in enumerate(STEP_CHECKPOINTS):
            for k, g in enumerate(grid):
                cand = replace(g, n_steps=steps)
                cands.append(cand)
                res.append(self._scores(cand, logits[t, :, :, k], labels, held))
        return cands, res

    # -- choice and refit ---------------------------------------------------------------

    def _finish(
        self,
        features: Features,
        labels: npt.NDArray[np.int64],
        cands: list[Candidate],
        results: list[_Scored],
        seed: int,
        reason: str,
    ) -> AutoDecTClassifier:
        order, top, gap_se = _rank(results, self.selection)
        best = cands[order[0]]
        rank = np.empty(len(cands), dtype=np.int64)
        rank[order] = np.arange(1, len(cands) + 1)
        self.cv_results_ = {
            "name": [c.name for c in cands],
            "params": [c.to_dict() for c in cands],
            "mean_accuracy": [round(float(r.accuracy), 6) for r in results],
            "log_loss": [round(float(r.log_loss), 6) for r in results],
            "se_of_gap_to_best": [round(float(v), 6) for v in gap_se],
            "rank": [int(v) for v in rank],
        }
        self.best_score_ = float(results[order[0]].accuracy)
        if self.selection == "1se":
            reason += (
                ": the first candidate whose accuracy gap to the best "
                f"({cands[top].name}, {results[top].accuracy:.3f}) is within one standard "
                "error of that gap"
            )
        else:
            reason += ": the highest accuracy"
        self.best_params_ = {**best.to_dict(), "reason": reason}
        self.best_estimator_ = self._build(best, features, labels, seed)
        self.prior_shift_ = (
            self._shift.astype(np.float32)
            if self._shifted(best)
            else np.zeros(len(self.classes_), np.float32)
        )
        return self

    def _build(
        self,
        cand: Candidate,
        features: Features,
        labels: npt.NDArray[np.int64],
        seed: int,
    ) -> FeatureClassifier:
        """Fit the model a candidate names on (features, labels)."""
        est: FeatureClassifier
        y = labels.tolist()
        dim = int(self.projection_dim)
        cal = "auto" if cand.calibrate else "none"
        if cand.method == "zero_shot":
            est = ZeroShotClassifier(cal)
        elif cand.method == "linear_probe":
            est = LinearProbeClassifier()
        elif cand.method == "prototype":
            est = PrototypeClassifier(projection_dim=dim, random_state=seed, device=self.device)
        elif cand.method == "paper":
            # λ = 1/shot of the whole training set, also inside the folds: the value the refit uses
            est = DecTClassifier(
                dim,
                prompt_weight=self._paper_weight,
                calibration=cal,
                random_state=seed,
                device=self.device,
            )
        else:
            return self._refit_span(cand, features, labels, seed)
        est.fit(features, y)
        return est

    def _refit_span(
        self, cand: Candidate, features: Features, labels: npt.NDArray[np.int64], seed: int
    ) -> DecTClassifier:
        """Train the chosen span-basis setting on all rows; return it as a plain DecT model."""
        assert features.hidden is not None
        h = torch.from_numpy(features.hidden)  # (N, D)
        w_init, p0 = self._init(h.shape[1], seed)
        basis = _span(h, torch.ones(len(h), dtype=torch.bool))  # (D, r)
        _, final = train_members(
            (h @ basis)[None],
            (w_init @ basis)[None],
            p0,
            self._prompt_terms(features, [cand]),
            torch.from_numpy(labels),
            torch.ones(1, len(h), dtype=torch.bool),
            lr=torch.tensor([cand.lr]),
            class_means=torch.tensor([cand.prototypes == "class_means"]),
            checkpoints=(cand.n_steps,),
        )
        projection = (basis @ final["W"][0, :, 0, :]).T  # (d, D)
        kind = None
        vector = None
        if cand.calibrate and cand.prompt_weight != 0.0:
            kind, vector = resolve_calibration(features, "auto")
        est = DecTClassifier(
            int(self.projection_dim),
            prompt_weight=cand.prompt_weight,
            n_steps=cand.n_steps,
            lr=cand.lr,
            calibration="auto" if cand.calibrate else "none",
            random_state=seed,
            device=self.device,
            learn_prototypes=cand.prototypes == "class_means",
            prototype_init=cand.prototypes,
            distance_scale=cand.prototypes == "class_means",
        )
        est.classes_ = self.classes_
        arrays: dict[str, npt.NDArray[Any]] = {
            "projection_": projection.contiguous().numpy(),
            "prototypes_": final["P"][0, 0].numpy().copy(),
            "radii_": final["r"][0, 0].numpy().copy(),
            "log_scale": np.asarray(final["a"][0, 0].item(), dtype=np.float32),
            "loss_curve_": np.zeros(0, dtype=np.float32),
        }
        if vector is not None:
            arrays["calibration_"] = vector.numpy().copy()
        est._set_fitted(
            arrays,
            {
                "prompt_weight_": cand.prompt_weight,
                "calibration_kind_": kind,
                "n_features_in_": int(h.shape[1]),
            },
        )
        return est

    # -- inference and persistence ---------------------------------------------------------------

    def decision_function(self, features: Features) -> npt.NDArray[np.float32]:
        """The chosen model's class scores, shape (N, C)."""
        self._check_fitted()
        scores = self.best_estimator_.decision_function(features)
        if self.prior_shift_.any():
            scores = scores + self.prior_shift_
        return scores

    def _fitted_arrays(self) -> dict[str, npt.NDArray[Any]]:
        inner = self.best_estimator_._fitted_arrays()
        return {"prior_shift_": self.prior_shift_, **{f"best.{k}": v for k, v in inner.items()}}

    def _fitted_scalars(self) -> dict[str, Any]:
        inner = self.best_estimator_
        return {
            "best_params_": self.best_params_,
            "best_score_": self.best_score_,
            "cv_results_": self.cv_results_,
            "n_splits_": self.n_splits_,
            "n_repeats_": self.n_repeats_,
            "best_estimator": type(inner).__name__,
            "best_estimator_params": inner.get_params(),
            "best_estimator_fitted": inner._fitted_scalars(),
        }

    def _set_fitted(self, arrays: dict[str, npt.NDArray[Any]], scalars: dict[str, Any]) -> None:
        kinds: dict[str, type[FeatureClassifier]] = {
            cls.__name__: cls
            for cls in (
                DecTClassifier,
                PrototypeClassifier,
                ZeroShotClassifier,
                LinearProbeClassifier,
            )
        }
        name = scalars["best_estimator"]
        if name not in kinds:
            raise ConfigError(f"unknown inner estimator {name!r} in a saved AutoDecTClassifier")
        inner = kinds[name](**scalars["best_estimator_params"])
        inner.classes_ = self.classes_
        n_classes = len(self.classes_)
        self.prior_shift_ = arrays.get("prior_shift_", np.zeros(n_classes, np.float32))
        inner._set_fitted(
            {k.removeprefix("best."): v for k, v in arrays.items() if k.startswith("best.")},
            scalars["best_estimator_fitted"],
        )
        self.best_estimator_ = inner
        self.best_params_ = scalars["best_params_"]
        self.best_score_ = scalars["best_score_"]
        self.cv_results_ = scalars["cv_results_"]
        self.n_splits_ = int(scalars["n_splits_"])
        self.n_repeats_ = int(scalars["n_repeats_"])


def _rank(
    results: Sequence[_Scored], selection: str
) -> tuple[list[int], int, npt.NDArray[np.float64]]:
    """Candidate indices best first, the most accurate one, and each one's SE of its gap to it.

    Accuracy on a few held-out rows is noisy, and the best of many settings is luckier than good.
    With ``"1se"`` a candidate counts as tied with the most accurate one when its accuracy gap is
    within one standard error of that gap, paired over the same held-out rows: a setting that
    differs from the best on few rows must be close to it, one that disagrees on many rows may
    trail it further. The first tied candidate in candidate order wins; plainer models come
    first (zero-shot, calibrated zero-shot, the paper's DecT, the prototype decoder, the linear
    probe, then the searched settings), so a searched setting must beat all of them clearly.
    ``"best"`` takes the highest accuracy, ties to the lower log-loss.
    """
    acc = np.array([r.accuracy for r in results])
    top = int(np.argmax(acc))
    diff = np.stack([results[top].per_row - r.per_row for r in results])  # (K, N)
    n = diff.shape[1]
    gap_se = diff.std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(len(results))
    idx = range(len(results))
    if selection == "1se":
        tied = diff.mean(axis=1) <= _TIE_SE * gap_se + 1e-12
        order = sorted(idx, key=lambda i: (not tied[i], i if tied[i] else -acc[i]))
    else:
        order = sorted(idx, key=lambda i: (-acc[i], results[i].log_loss, i))
    return order, top, gap_se


def _empty_results() -> dict[str, list[Any]]:
    keys = ("name", "params", "mean_accuracy", "log_loss", "se_of_gap_to_best", "rank")
    return {k: [] for k in keys}


def _held_out_scores(
    logits: Tensor,
    labels: npt.NDArray[np.int64],
    held: npt.NDArray[np.bool_],
    row_weights: npt.NDArray[np.float64],
) -> _Scored:
    """Scores over every held-out (group, row) pair; logits (G, N, C).

    Every row is held out equally often, so each row's mean over its held-out folds counts once,
    times its weight (the class prior's importance weight; 1 without a prior).
    """
    mask = torch.from_numpy(held).double()  # (G, N)
    y = torch.from_numpy(labels)[None].expand(mask.shape)  # (G, N)
    logp = torch.log_softmax(logits.double(), dim=-1)  # (G, N, C)
    nll = -logp.gather(-1, y[..., None])[..., 0]  # (G, N)
    correct = (logits.argmax(-1) == y).double()  # (G, N)
    times = mask.sum(0).clamp_min(1)  # (N,)
    w = torch.from_numpy(row_weights)  # (N,)
    per_row = (correct * mask).sum(0) / times * w  # (N,)
    row_nll = (nll * mask).sum(0) / times * w  # (N,)
    return _Scored(float(per_row.mean()), float(row_nll.mean()), per_row.numpy())

"""`AutoDecTClassifier`: DecT that picks its own settings by cross-validation on the training set.

This module is search policy only: which candidates, scored how, chosen by which rule. Every
candidate is a public estimator with public settings (`Candidate.estimator`), and the winner is
refitted on all training rows through that estimator's own ``fit``. The searched DecT settings
are scored in batches by the decoder's one trainer (`dect_maas.decoders.dect.train_members`), doing
exactly what ``DecTClassifier(basis="span", ...).fit`` does on each fold.

Candidates, in the order that breaks ties (see `_rank`):

0. The anchor: DecT with λ = 2 (``ANCHOR_WEIGHT``, in units of calibrated log-probabilities or
   logits), the content-free representation where the features have it, lr 0.01, 30 steps:
   DecT's own idea, the prompt's scores plus a learned decoder, with the prompt weighing more.
   On the development splits it was within a point of the best baseline at 4-16 shots and
   ahead at 64; every other candidate has to beat it clearly.
1. Zero-shot, plain and calibrated, the better of the two on the training rows first. The prompt
   learns nothing from labels, so every training row is a held-out row for it: more evidence
   than any fold gives.
2. DecT settings (``DEFAULT_GRID``): the prompt weight λ from prompt-heavy (8) to the decoder alone
   (0), both representations of the hidden vectors (``"content_free"``, then ``"raw"``), two
   learning rates, 10 or 30 steps; the prompt scores calibrated or not as zero-shot was better.
   Ordering prompt-heavy first makes the selection shrink towards the prompt where the evidence
   is thin and move to the decoder only where held-out rows show it is better.
3. The paper's DecT (λ = 1/shot), the prototype decoder (λ = 0), a linear probe.

Selection (``selection="1se"``): the first candidate whose accuracy gap to the most accurate one
is within one standard error of that gap, paired over the same held-out rows. With few rows
many candidates tie, and the first tied one wins: the prompt, or the most prompt-heavy DecT.

The prompt blend (``prompt_blend``, default ½): the chosen model's probabilities mixed with
the plain prompt's, scored on the same held-out rows as one more candidate just before the
chosen one and kept by the same rule (`AutoDecTClassifier._choose_blend` says why).

One example per class: nothing trained can be held out. ``one_shot="prompt"`` (default) scores
the two zero-shot variants on the shots and keeps the better one; ``"paper"`` uses the paper's
DecT instead, unchecked.

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

from dect_maas._exceptions import ConfigError, FeaturesError
from dect_maas._features import Features

from .baselines import LinearProbeClassifier, PrototypeClassifier, ZeroShotClassifier
from .dect import (
    Representation,
    calibrate,
    initial_parameters,
    prompt_term,
    represent,
    span_basis,
    train_members,
)
from .estimator import (
    DecTClassifier,
    FeatureClassifier,
    Labels,
    check_features,
    resolve_calibration,
    training_labels,
)

__all__ = ["DEFAULT_GRID", "STEP_CHECKPOINTS", "AutoDecTClassifier", "Candidate"]

Method = Literal["zero_shot", "linear_probe", "prototype", "paper", "dect"]
STEP_CHECKPOINTS: tuple[int, ...] = (10, 30)
PROMPT_WEIGHTS: tuple[float, ...] = (8.0, 2.0, 0.5, 0.125, 0.0)  # prompt-heavy first
LEARNING_RATES: tuple[float, ...] = (0.01, 0.05)
ANCHOR_WEIGHT = 2.0  # λ of the setting tried first: the prompt plus a decoder, prompt-heavy
_MIN_HELD_OUT = 48  # repeat the folds until about this many held-out predictions per setting
_TIE_SE = 1.0  # selection="1se": how many standard errors of a gap still count as a tie


@dataclass(frozen=True)
class Candidate:
    """One setting the search scores. ``method`` says which model; other fields apply to DecT.

    ``"paper"`` is `DecTClassifier` with the paper's settings (λ = 1/shot), ``"prototype"``
    `PrototypeClassifier` (λ = 0), ``"zero_shot"`` `ZeroShotClassifier` and ``"linear_probe"``
    `LinearProbeClassifier`; ``"dect"`` is `DecTClassifier` with ``basis="span"`` and these
    settings.
    """

    method: Method
    calibrate: bool = False
    prompt_weight: float = 0.0
    lr: float = 0.01
    n_steps: int = 30
    representation: Representation = "raw"

    @property
    def name(self) -> str:
        if self.method == "zero_shot":
            return "zero_shot" + ("+calibrated" if self.calibrate else "")
        if self.method != "dect":
            return self.method
        cal = "+cal" if self.calibrate and self.prompt_weight else ""
        rep = ",content_free" if self.representation == "content_free" else ""
        return f"dect(λ={self.prompt_weight:g}{cal},lr={self.lr:g},steps={self.n_steps}{rep})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def estimator(self, projection_dim: int, seed: int, device: str) -> FeatureClassifier:
        """The public estimator, unfitted, that this candidate names."""
        cal = "auto" if self.calibrate else "none"
        if self.method == "zero_shot":
            return ZeroShotClassifier(cal)
        if self.method == "linear_probe":
            return LinearProbeClassifier()
        if self.method == "prototype":
            return PrototypeClassifier(projection_dim, random_state=seed, device=device)
        return DecTClassifier(
            projection_dim,
            prompt_weight=self.prompt_weight,
            n_steps=self.n_steps,
            lr=self.lr,
            calibration=cal,
            random_state=seed,
            device=device,
            representation=self.representation,
            basis="span" if self.method == "dect" else "full",
        )


def _dect_grid() -> tuple[Candidate, ...]:
    """The searched DecT settings; ``n_steps`` is filled in from STEP_CHECKPOINTS.

    Random frozen prototypes only: a class-mean family (prototypes started at the class means
    and trained, with a learned distance scale) lost on the development splits wherever it was
    chosen (docs/decoders.md).
    """
    return tuple(
        Candidate("dect", False, weight, lr, 0, rep)
        for rep in ("content_free", "raw")
        for lr in LEARNING_RATES
        for weight in PROMPT_WEIGHTS
    )


DEFAULT_GRID: tuple[Candidate, ...] = _dect_grid()


@dataclass(frozen=True)
class _Scored:
    """A candidate's held-out results: accuracy, log-loss, and accuracy per training row."""

    accuracy: float
    log_loss: float
    per_row: npt.NDArray[np.float64]  # (N,) mean correctness over the folds that held it out
    probs: Tensor | None = None  # (G, N, C) held-out class probabilities (prior-shifted)


@dataclass(frozen=True)
class _Fit:
    """What one ``fit`` call's search works on; passed along instead of kept on the estimator."""

    features: Features
    labels: npt.NDArray[np.int64]  # (N,)
    seed: int
    shift: npt.NDArray[np.float64]  # (C,) log(prior / training share); zeros without a prior
    row_weights: npt.NDArray[np.float64]  # (N,) prior / training share of each row's class
    paper_weight: float  # the paper's λ = 1/shot of the whole training set


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
    docstring); ``None`` assumes the training set's own mix. ``prompt_blend``: the weight w of
    the plain prompt in the mixture (1 − w)·p_chosen + w·p_prompt, kept only where held-out
    rows do not show that it costs accuracy; 0 turns it off.

    Fitted attributes (plain, JSON-serialisable): ``best_params_`` (the chosen setting; its
    ``"reason"`` says why), ``best_score_`` (its cross-validated accuracy), ``cv_results_``
    (every candidate's name, settings, accuracy, log-loss, the standard error of its gap to
    the best, and its rank, on held-out rows), ``n_splits_``, ``n_repeats_``, ``class_prior_``
    (the class mix used, as shares summing to 1, or None), ``prior_shift_`` (added to the chosen
    model's class scores; zeros without a prior), ``blend_weight_`` (w if
    the blend was kept, else 0) and ``blend_`` (the blend's held-out accuracy, log-loss, SE of
    its gap to the best, whether it was kept, and why). The refitted model is
    ``best_estimator_``, a public estimator; predictions come from it plus ``prior_shift_``,
    mixed with the plain prompt when the blend was kept.

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
        prompt_blend: float = 0.5,
    ) -> None:
        self.cv = cv
        self.prompt_blend = prompt_blend
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
    class_prior_: dict[str, float] | None
    blend_weight_: float
    blend_: dict[str, Any]

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
        pb = self.prompt_blend
        if isinstance(pb, bool) or not isinstance(pb, (int, float)) or not 0.0 <= pb < 1.0:
            raise ConfigError(f"prompt_blend must be a number in [0, 1), got {pb!r}")
        rs = self.random_state
        if rs is not None and (isinstance(rs, bool) or not isinstance(rs, (int, np.integer))):
            raise ConfigError(f"random_state must be an int or None, got {rs!r}")

    def fit(self, features: Features, y: Labels | None = None) -> AutoDecTClassifier:
        """Choose a setting by cross-validation on (features, y), then refit it on all of them."""
        self._check_params()
        check_features(features)
        classes, labels, counts = training_labels(features, y)
        seed = (
            int(np.random.SeedSequence().generate_state(1)[0] >> 1)
            if self.random_state is None
            else int(self.random_state)
        )
        shift, row_weights = _resolve_prior(self.class_prior, classes, counts, labels)
        share = np.exp(shift) * counts / counts.sum()  # the prior, normalised
        self.class_prior_ = (
            None
            if self.class_prior is None
            else {str(c): round(float(p), 6) for c, p in zip(classes.tolist(), share, strict=True)}
        )
        ctx = _Fit(features, labels, seed, shift, row_weights, float(len(classes) / len(labels)))
        self.classes_ = classes
        prompts = _prompt_candidates(ctx)
        if features.hidden is None or (counts.min() < 2 and self.one_shot == "prompt" and prompts):
            # Nothing to train, or nothing trained can be checked on held-out rows; the prompt
            # learns nothing from labels, so every training example is a held-out row for it.
            why = (
                "no hidden vectors"
                if features.hidden is None
                else "a class has one example: nothing trained can be checked, so the prompt alone"
            )
            self.n_splits_, self.n_repeats_ = 0, 0
            if features.hidden is not None and len(prompts) == 2 and self.prompt_blend > 0:
                # One row per class cannot tell the two prompts apart: no pick, their mixture
                # (calibrated first: it is the form that takes the class prior)
                cands = [prompts[1], prompts[0]]
                why = (
                    "a class has one example: nothing trained can be checked, and one row per "
                    "class cannot choose between the prompts, so calibrated zero-shot (shifted to "
                    "the class prior, if given)"
                )
                return self._finish(ctx, cands, _score_fixed(ctx, cands), why, mix_unchecked=True)
            cands = _order_prompts(prompts, _score_fixed(ctx, prompts))
            return self._finish(ctx, cands, _score_fixed(ctx, cands), why)
        if counts.min() < 2:
            self.n_splits_, self.n_repeats_ = 0, 0
            self.cv_results_ = _empty_results()
            self.best_score_ = None
            has_cal = features.scores is not None and features.content_free is not None
            best = (
                Candidate("paper", has_cal, ctx.paper_weight)
                if features.scores is not None
                else Candidate("prototype")
            )
            self.best_params_ = {
                **best.to_dict(),
                "reason": "one example per class: nothing can be held out, so the paper's "
                "settings are used",
            }
            self.blend_weight_ = 0.0
            self.blend_ = {"weight": float(self.prompt_blend), "kept": False, "reason": "unchecked"}
            return self._refit(ctx, best)

        folds = self._folds(labels, counts, seed)
        cands, results = self._cross_validate(ctx, folds, prompts)
        return self._finish(ctx, cands, results, "cross-validation")

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

    def _cross_validate(
        self, ctx: _Fit, folds: npt.NDArray[np.bool_], prompts: list[Candidate]
    ) -> tuple[list[Candidate], list[_Scored]]:
        features = ctx.features
        prompts = _order_prompts(prompts, _score_fixed(ctx, prompts))
        # the searched DecT settings use the prompt in the form zero-shot found better
        cal = bool(prompts) and prompts[0].calibrate
        has_cf = features.content_free_hidden is not None
        grid = [
            replace(c, calibrate=cal and c.prompt_weight != 0.0)
            for c in DEFAULT_GRID
            if (features.scores is not None or c.prompt_weight == 0.0)
            and (has_cf or c.representation == "raw")
        ]
        plain: list[Candidate] = []
        if features.scores is not None:
            plain.append(Candidate("paper", cal, ctx.paper_weight))
        plain += [Candidate("prototype"), Candidate("linear_probe")]

        out_c, out_r = list(prompts), _score_fixed(ctx, prompts)
        scored = zip(*self._score_grid(ctx, folds, _unique(grid)), strict=True)
        for c, r in sorted(scored, key=lambda p: _closeness_to_prompt(p[0])):
            out_c.append(c)
            out_r.append(r)
        # DecT's own default, the prompt plus a decoder, goes first: it must lose clearly
        anchor = Candidate(
            "dect",
            cal and features.scores is not None,
            ANCHOR_WEIGHT if features.scores is not None else 0.0,
            LEARNING_RATES[0],
            STEP_CHECKPOINTS[-1],
            "content_free" if has_cf else "raw",
        )
        i = out_c.index(anchor)
        out_c.insert(0, out_c.pop(i))
        out_r.insert(0, out_r.pop(i))
        held = ~folds
        for cand in plain:
            n_rows, n_classes = len(ctx.labels), len(self.classes_)
            logits = np.zeros((len(folds), n_rows, n_classes), dtype=np.float32)
            for g, mask in enumerate(folds):
                est = cand.estimator(int(self.projection_dim), ctx.seed, self.device)
                est.fit(features[mask], ctx.labels[mask].tolist())
                logits[g] = est.decision_function(features)
            out_c.append(cand)
            out_r.append(_scores(ctx, cand, torch.from_numpy(logits), held))
        return out_c, out_r

    def _score_grid(
        self, ctx: _Fit, folds: npt.NDArray[np.bool_], grid: Sequence[Candidate]
    ) -> tuple[list[Candidate], list[_Scored]]:
        held = ~folds
        cands, res = [], []
        for rep in dict.fromkeys(c.representation for c in grid):
            members = [c for c in grid if c.representation == rep]
            logits = grid_logits(
                ctx.features,
                ctx.labels,
                folds,
                members,
                ctx.seed,
                int(self.projection_dim),
                len(self.classes_),
            )  # (T, G, N, K, C)
            for t, steps in enumerate(STEP_CHECKPOINTS):
                for k, c in enumerate(members):
                    cand = replace(c, n_steps=steps)
                    cands.append(cand)
                    res.append(_scores(ctx, cand, logits[t, :, :, k], held))
        return cands, res

    # -- choice and refit ---------------------------------------------------------------

    def _finish(
        self,
        ctx: _Fit,
        cands: list[Candidate],
        results: list[_Scored],
        reason: str,
        mix_unchecked: bool = False,
    ) -> AutoDecTClassifier:
        """Rank, record, choose, blend, refit; ``mix_unchecked``: cands[0] mixed, no gate."""
        order, top, gap_se = _rank(results, self.selection)
        if mix_unchecked:
            order = [0, *(i for i in order if i != 0)]
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
        if mix_unchecked:
            pass  # no ranking chose: the reason says why as it is
        elif self.selection == "1se":
            reason += (
                ": the first candidate in the search order (DecT with the prompt at λ=2, "
                "zero-shot, DecT from prompt-heavy to decoder alone, paper, prototype, probe) "
                f"whose accuracy gap to the best ({cands[top].name}, "
                f"{results[top].accuracy:.3f}) is within one standard error of that gap"
            )
        else:
            reason += ": the highest accuracy"
        self.best_params_ = {**best.to_dict(), "reason": reason}
        self._choose_blend(ctx, cands, results, order[0], top, gap_se[order[0]], mix_unchecked)
        return self._refit(ctx, best)

    def _choose_blend(
        self,
        ctx: _Fit,
        cands: list[Candidate],
        results: list[_Scored],
        chosen: int,
        top: int,
        chosen_se: float,
        unchecked: bool = False,
    ) -> None:
        """Mix the chosen model with the plain prompt where the held-out rows allow it.

        Balanced shots measure balanced accuracy: they cannot show whether the mix of classes in
        use is balanced. Everything trained on them (and calibrated zero-shot) assumes it is;
        the prompt as the model gives it (plain zero-shot) keeps the model's own prior over the
        label words instead. Mixing their probabilities, (1 − w)·p_chosen + w·p_prompt, hedges
        between the two. The mixture counts as one more candidate, just before the chosen one
        (closer to the prompt): it is kept when its accuracy gap to the most accurate candidate
        is within one standard error of that gap, on the same held-out rows (`_rank`'s rule).
        """
        w = float(self.prompt_blend)
        self.blend_weight_ = 0.0
        plain = Candidate("zero_shot", False)
        self.blend_ = {"weight": w, "kept": False}
        if w == 0.0 or plain not in cands or cands[chosen] == plain:
            why = "off" if w == 0.0 else "the choice is the plain prompt, or there is none"
            self.blend_["reason"] = why
            return
        mixed = _blend_scores(ctx, results[chosen], results[cands.index(plain)], w)
        diff = results[top].per_row - mixed.per_row
        n = len(diff)
        se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        if unchecked:
            kept, rule = True, "kept unchecked: one example per class"
        elif self.selection == "1se":
            kept = float(diff.mean()) <= _TIE_SE * se + 1e-12
            rule = "within one standard error of the best" if kept else "clearly behind the best"
        else:
            kept = mixed.accuracy > results[chosen].accuracy
            rule = "more accurate than the choice" if kept else "not more accurate than the choice"
        self.blend_.update(
            kept=kept,
            mean_accuracy=round(mixed.accuracy, 6),
            log_loss=round(mixed.log_loss, 6),
            se_of_gap_to_best=round(se, 6),
            chosen_accuracy=round(results[chosen].accuracy, 6),
            chosen_se_of_gap_to_best=round(float(chosen_se), 6),
            reason=f"{w:g}·zero_shot + {1 - w:g}·{cands[chosen].name}: held-out accuracy "
            f"{mixed.accuracy:.3f}, {rule} ({cands[top].name}, {results[top].accuracy:.3f})",
        )
        if kept:
            self.blend_weight_ = w
            self.best_score_ = float(mixed.accuracy)
            self.best_params_["reason"] += (
                f"; then mixed with the plain prompt ({self.blend_['reason']}): balanced shots "
                "cannot show the class mix in use, and the plain prompt keeps the model's prior"
            )

    def _refit(self, ctx: _Fit, best: Candidate) -> AutoDecTClassifier:
        """Fit the chosen candidate's public estimator on every training row."""
        est = best.estimator(int(self.projection_dim), ctx.seed, self.device)
        self.best_estimator_ = est.fit(ctx.features, ctx.labels.tolist())
        shifted = _shifted(best) and ctx.shift.any()
        self.prior_shift_ = (
            ctx.shift.astype(np.float32) if shifted else np.zeros(len(self.classes_), np.float32)
        )
        return self

    # -- inference and persistence ---------------------------------------------------------------

    def decision_function(self, features: Features) -> npt.NDArray[np.float32]:
        """The chosen model's class scores, shape (N, C).

        With a kept prompt blend: log((1 − w)·softmax(chosen) + w·softmax(plain prompt scores)).
        """
        self._check_fitted()
        scores = self.best_estimator_.decision_function(features)
        if self.prior_shift_.any():
            scores = scores + self.prior_shift_
        w = self.blend_weight_
        if w:
            if features.scores is None:
                raise FeaturesError(
                    "this model mixes in the prompt's label-word scores (prompt_blend); pass "
                    "features with scores, as in training"
                )
            mixed = (1 - w) * torch.softmax(torch.from_numpy(scores).double(), -1) + (
                w * torch.softmax(torch.from_numpy(features.scores).double(), -1)
            )
            scores = torch.log(mixed.clamp_min(1e-300)).float().numpy()
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
            "blend_weight_": self.blend_weight_,
            "blend_": self.blend_,
            "class_prior_": self.class_prior_,
            "best_estimator": type(inner).__name__,
            "best_estimator_params": inner.get_params(),
            "best_estimator_fitted": inner._fitted_scalars(),
        }

    def _set_fitted(self, arrays: dict[str, npt.NDArray[Any]], scalars: dict[str, Any]) -> None:
        """Rebuild the inner estimator from a saved file (the load path of every estimator)."""
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
        self.blend_weight_ = float(scalars.get("blend_weight_", 0.0))
        self.blend_ = dict(scalars.get("blend_", {"weight": 0.0, "kept": False}))
        self.class_prior_ = scalars.get("class_prior_")


# -- search policy helpers (no state) -------------------------------------------------------------


def grid_logits(
    features: Features,
    labels: npt.NDArray[np.int64],
    folds: npt.NDArray[np.bool_],
    members: Sequence[Candidate],
    seed: int,
    projection_dim: int,
    n_classes: int,
) -> Tensor:
    """Logits (T, G, N, K, C) of every DecT setting (one representation) trained on every fold.

    Member (g, k) after STEP_CHECKPOINTS[t] steps is what
    ``members[k].estimator(projection_dim, seed, ...)`` fitted on the rows of fold g gives, at
    once for all: the same initial W and P (drawn from ``seed``), each fold's own span basis,
    the same prompt term.
    """
    assert features.hidden is not None
    (rep,) = {c.representation for c in members}
    h = torch.from_numpy(features.hidden)  # (N, D)
    w_init, p0 = initial_parameters(h.shape[1], n_classes, projection_dim, seed)  # (d,D), (C,d)
    ref = features.content_free_hidden
    x = represent(h, None if ref is None else torch.tensor(ref), rep)  # (N, D)
    train = torch.from_numpy(folds)  # (G, N)
    bases = [span_basis(x[row]) for row in train]  # G x (D, r_g)
    rank = max(b.shape[1] for b in bases)
    basis = torch.stack([F.pad(b, (0, rank - b.shape[1])) for b in bases])  # (G, D, r)
    scores = _prompt_scores(features)  # raw and calibrated (N, C), or None
    base = []
    for c in members:
        b = prompt_term(None if scores is None else scores[int(c.calibrate)], c.prompt_weight)
        base.append(torch.zeros(len(h), n_classes) if b is None else b)
    trained = train_members(
        x[None] @ basis,  # (G, N, r); zero columns never train
        w_init[None] @ basis,  # (G, d, r)
        p0,
        torch.stack(base, dim=1),  # (N, K, C)
        torch.from_numpy(labels),
        train,
        lr=[c.lr for c in members],
        class_means=[False] * len(members),
        checkpoints=STEP_CHECKPOINTS,
    )
    return trained.logits


def _prompt_candidates(ctx: _Fit) -> list[Candidate]:
    if ctx.features.scores is None:
        return []
    cands = [Candidate("zero_shot", False)]
    if ctx.features.content_free is not None:
        cands.append(Candidate("zero_shot", True))
    return cands


def _order_prompts(cands: list[Candidate], results: list[_Scored]) -> list[Candidate]:
    """The zero-shot variants by evidence: higher accuracy on the rows, then lower log-loss."""
    ranked = sorted(zip(cands, results, strict=True), key=lambda p: (-p[1].accuracy, p[1].log_loss))
    return [c for c, _ in ranked]


def _closeness_to_prompt(c: Candidate) -> tuple[float, bool, float, int]:
    """Sort key of the searched settings: prompt-heavy first, then the least trained."""
    return (-c.prompt_weight, c.representation != "content_free", c.lr, c.n_steps)


def _unique(cands: Sequence[Candidate]) -> list[Candidate]:
    return list(dict.fromkeys(cands))


def _prompt_scores(features: Features) -> tuple[Tensor, Tensor] | None:
    """The prompt scores raw and calibrated (calibrated = raw where no calibration applies)."""
    if features.scores is None:
        return None
    raw = torch.from_numpy(features.scores)  # (N, C)
    kind, vector = resolve_calibration(features, "auto")
    cal = calibrate(raw, vector, kind) if kind is not None and vector is not None else raw
    return raw, cal


def _score_fixed(ctx: _Fit, cands: list[Candidate]) -> list[_Scored]:
    """Zero-shot learns nothing from labels, so every training row is a held-out row."""
    res = []
    every = np.ones((1, len(ctx.labels)), dtype=bool)
    for c in cands:
        zs = ZeroShotClassifier("auto" if c.calibrate else "none").fit(ctx.features)
        logits = torch.from_numpy(zs.decision_function(ctx.features))[None]
        res.append(_scores(ctx, c, logits, every))
    return res


def _shifted(cand: Candidate) -> bool:
    """Whether a candidate's class scores assume the balance of its training set.

    Everything trained on the labelled examples does, and so does calibrated zero-shot
    (calibration makes the content-free input uniform); plain zero-shot keeps the model's own
    prior and is never shifted.
    """
    return cand.method != "zero_shot" or cand.calibrate


def _scores(ctx: _Fit, cand: Candidate, logits: Tensor, held: npt.NDArray[np.bool_]) -> _Scored:
    if _shifted(cand):
        logits = logits + torch.from_numpy(ctx.shift).to(logits.dtype)
    return _held_out_scores(logits, ctx.labels, held, ctx.row_weights)


def _resolve_prior(
    class_prior: Mapping[Any, float] | None,
    classes: npt.NDArray[Any],
    counts: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Log-prior shift (C,) and importance weight per training row, from ``class_prior``."""
    n_classes = len(counts)
    if class_prior is None:
        return np.zeros(n_classes), np.ones(len(labels))
    given = dict(class_prior)
    by_name = {str(k): v for k, v in given.items()}
    names = [str(c) for c in classes.tolist()]
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
    return np.log(prior) - np.log(freq), (prior / freq)[labels]


def _rank(
    results: Sequence[_Scored], selection: str
) -> tuple[list[int], int, npt.NDArray[np.float64]]:
    """Candidate indices best first, the most accurate one, and each one's SE of its gap to it.

    Accuracy on a few held-out rows is noisy, and the best of many settings is luckier than good.
    With ``"1se"`` a candidate counts as tied with the most accurate one when its accuracy gap is
    within one standard error of that gap, paired over the same held-out rows: a setting that
    differs from the best on few rows must be close to it, one that disagrees on many rows may
    trail it further. The first tied candidate in candidate order wins (the module docstring
    gives the order), so a setting further from the prompt must beat the ones before it clearly.
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


def _blend_scores(ctx: _Fit, chosen: _Scored, prompt: _Scored, weight: float) -> _Scored:
    """Held-out scores of (1 − w)·p_chosen + w·p_prompt on the rows ``chosen`` held out."""
    assert chosen.probs is not None
    assert prompt.probs is not None
    held = chosen.probs.sum(-1) > 0  # (G, N)
    mixed = (1 - weight) * chosen.probs + weight * prompt.probs[0][None]  # (G, N, C)
    logits = torch.log(mixed.clamp_min(1e-300))
    return _held_out_scores(logits, ctx.labels, held.numpy(), ctx.row_weights)


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
    probs = torch.exp(logp) * mask[..., None]  # (G, N, C), zero where not held out
    return _Scored(float(per_row.mean()), float(row_nll.mean()), per_row.numpy(), probs)

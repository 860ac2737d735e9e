"""The experiment runner: config -> k-shot sets -> one query per example -> every method -> report.

Querying is planned before anything is sent: the k-shot indices of every (shots, seed) pair are
drawn first, and the union of those training examples is queried once, as is the test set, whatever
the number of shot counts, seeds and methods. The client's disk cache makes a re-run (or a run
resumed after an interruption) pay only for what is missing; the ledger records each run under its
own run id.
"""

from __future__ import annotations

import logging
import os
import platform
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dect_maas._exceptions import ConfigError
from dect_maas._features import Features
from dect_maas._metrics import accuracy, macro_f1
from dect_maas._task import Task

from .bbt import check_bbt, estimate_bbt, run_bbt
from .config_file import ExperimentConfig, load_config, merge
from .data import load_split, sample_k_shot  # sample_k_shot: OpenPrompt's sampler
from .icl import ICL_METHODS, estimate_icl, run_icl
from .report import ExperimentResult, MethodRun, QueryPlan
from .report import write_report as _write_report
from .shot_set import ShotSet
from .wiring import build_client, make_estimator

__all__ = ["Experiment", "ExperimentEstimate", "ExperimentResult", "MethodRun", "QueryPlan"]

logger = logging.getLogger("dect_maas.experiment")


class _Estimator(Protocol):
    def fit(self, features: Features, y: Sequence[Any]) -> Any: ...
    def predict(self, features: Features) -> Any: ...


@dataclass(frozen=True)
class ExperimentEstimate:
    """A dry run: what the run would send, and how much of it the cache already holds."""

    plan: QueryPlan
    queries: int
    requests: int
    input_tokens: int
    cost_usd: float
    cached_queries: int
    assumptions: tuple[str, ...] = ()
    by_role: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    over_budget: tuple[str, ...] = ()  # the config's budget limits this run alone would pass
    # ICL and BBT (their own queries, summed over every k-shot set; included in the totals)
    by_method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def queries_to_pay(self) -> int:
        return self.queries - self.cached_queries

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_test": self.plan.n_test,
            "n_train_union": self.plan.n_train_union,
            "queries": self.queries,
            "cached_queries": self.cached_queries,
            "queries_to_pay": self.queries_to_pay,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "cost_usd": self.cost_usd,
            "by_role": {r: dict(v) for r, v in self.by_role.items()},
            "by_method": {m: dict(v) for m, v in self.by_method.items()},
            "over_budget": list(self.over_budget),
            "assumptions": list(self.assumptions),
        }


@dataclass(frozen=True)
class _Totals:
    queries: int
    requests: int
    input_tokens: int
    cost_usd: float


# -- the runner -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Split:
    texts: list[str]
    texts_b: list[str] | None
    labels: list[str]
    ids: list[str] | None


class Experiment:
    """Run a config: ``Experiment.from_config("movies.toml").run()``.

    ``client_factory`` exists for callers that build their own client (tests, notebooks); by default
    one is built from the config's provider, budget, cache and ledger sections.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        run_id: str | None = None,
        client_factory: Callable[[ExperimentConfig, str], Any] | None = None,
    ) -> None:
        self.config = config
        self.run_id = run_id or _new_run_id(config.name)
        self._client_factory = client_factory or build_client
        self._data: tuple[_Split, _Split] | None = None

    @classmethod
    def from_config(
        cls,
        config: ExperimentConfig | Mapping[str, Any] | str | PathLike[str],
        *,
        run_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Experiment:
        """From a config file, a mapping (paths relative to the cwd) or an ExperimentConfig.

        ``overrides``: a nested mapping merged over the settings before validation, e.g.
        ``{"provider": {"base_url": url}, "shots": [1, 4]}``.
        """
        if isinstance(config, ExperimentConfig):
            cfg = config
            if overrides:
                cfg = ExperimentConfig.from_dict(merge(cfg.to_public_dict(), overrides))
        elif isinstance(config, Mapping):
            cfg = ExperimentConfig.from_dict(merge(config, overrides or {}))
        else:
            cfg = load_config(config, overrides)
        return cls(cfg, run_id=run_id)

    @property
    def task(self) -> Task:
        return self.config.task.to_task()

    # -- planning (no network) --------------------------------------------------------------------

    def data(self) -> tuple[_Split, _Split]:
        if self._data is None:
            task = self.task
            self._data = (
                _load_split(self.config, "train", task),
                _load_split(self.config, "test", task),
            )
        return self._data

    def plan(self) -> QueryPlan:
        """Draw every k-shot set first, so that their union is queried once."""

        train, test = self.data()
        indices: dict[tuple[int, int], tuple[int, ...]] = {}
        for k in self.config.shots:
            for seed in self.config.seeds:
                try:
                    idx = sample_k_shot(train.labels, k, seed)
                except ValueError as exc:
                    raise ConfigError(
                        f"data.train ({self.config.data.train.describe()}): {exc}"
                    ) from None
                indices[(k, seed)] = tuple(int(i) for i in idx)
        union = tuple(sorted({i for idx in indices.values() for i in idx}))
        return QueryPlan(
            n_test=len(test.texts),
            n_train_pool=len(train.texts),
            n_train_union=len(union),
            train_indices=indices,
            union=union,
        )

    def estimate(self) -> ExperimentEstimate:
        """What the run would send and cost; sends nothing."""
        plan = self.plan()
        train, test = self.data()
        task = self.task
        texts, texts_b = _all_inputs(plan, train, test)
        client = self._client_factory(self.config, self.run_id)
        try:
            est = client.estimate(task, texts, texts_b=texts_b)
            by_method = self._estimate_input_side(plan, client, est.token_ratio)
        finally:
            client.close()
        extra = {
            key: sum(row.get(key, 0) for row in by_method.values())
            for key in ("queries", "queries_to_pay", "requests", "input_tokens", "cost_usd")
        }
        notes = sorted({n for row in by_method.values() for n in row.get("notes", ())})
        total = _Totals(  # what is to pay, as the budget counts it
            queries=int(est.queries) + extra["queries_to_pay"],
            requests=int(est.requests) + extra["requests"],
            input_tokens=int(est.input_tokens) + extra["input_tokens"],
            cost_usd=float(est.cost_usd) + extra["cost_usd"],
        )
        return ExperimentEstimate(
            plan=plan,
            queries=int(est.total_queries) + extra["queries"],
            requests=total.requests,
            input_tokens=total.input_tokens,
            cost_usd=total.cost_usd,
            cached_queries=int(est.cached_queries) + extra["queries"] - extra["queries_to_pay"],
            assumptions=(
                *getattr(est, "assumptions", ()),
                *getattr(est, "tokens_basis", ()),
                *notes,
            ),
            by_role=dict(getattr(est, "by_role", {})),
            by_method=by_method,
            over_budget=over_budget(self.config, total),
        )

    def _estimate_input_side(
        self, plan: QueryPlan, client: Any, ratio: float | None
    ) -> dict[str, dict[str, Any]]:
        """ICL's and BBT's own queries over every k-shot set (docs/input_side.md), estimated."""
        wanted = [m for m in self.config.methods if m in _INPUT_SIDE]
        if not wanted:
            return {}

        train, test = self.data()
        rows: dict[str, list[dict[str, Any]]] = {}
        for (k, seed), idx in plan.train_indices.items():
            shot_set = ShotSet(
                self.config, self.run_id, self._client_factory, self.task, train, test, idx, k, seed
            )
            if any(m in ICL_METHODS for m in wanted):
                # icl and calibrated_icl read the same answers: paid once, listed once
                name = "+".join(m for m in wanted if m in ICL_METHODS)
                rows.setdefault(name, []).append(estimate_icl(shot_set, client, ratio))
            if "bbt" in wanted:
                rows.setdefault("bbt", []).append(estimate_bbt(shot_set, client, ratio))
        out: dict[str, dict[str, Any]] = {}
        for name, per_set in rows.items():
            summed: dict[str, Any] = {
                key: sum(r[key] for r in per_set)
                for key in per_set[0]
                if isinstance(per_set[0][key], int | float) and key != "n_test"
            }
            summed["tokens_per_prediction"] = sum(
                r["tokens_per_prediction"] or 0 for r in per_set
            ) / len(per_set)
            summed["shot_sets"] = len(per_set)
            summed["n_test"] = per_set[0]["n_test"]
            summed["notes"] = sorted({n for r in per_set for n in r.get("notes", ())})
            out[name] = summed
        return out

    # -- running ----------------------------------------------------------------------------------

    def run(
        self,
        *,
        progress: bool = False,
        write_report: bool = True,
        on_event: Callable[[str], None] | None = None,
    ) -> ExperimentResult:
        """Query (paying only for what the cache lacks), train every method, evaluate, report."""

        say = on_event or (lambda msg: logger.info("%s", msg))
        if "bbt" in self.config.methods:
            # no soft-prompt input or no cma: refused before any query is paid
            check_bbt(self.config, self._client_factory, self.run_id)
        t0 = time.perf_counter()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        plan = self.plan()
        train, test = self.data()
        task = self.task
        say(
            f"run {self.run_id}: {plan.n_test} test + {plan.n_train_union} training examples "
            f"(union of {len(self.config.shots)} shot counts x {len(self.config.seeds)} seeds)"
        )
        # One call for test and training inputs: the content-free prompt is asked for once, and
        # an input found in both sets is paid once.
        texts, texts_b = _all_inputs(plan, train, test)
        client = self._client_factory(self.config, self.run_id)
        try:
            tq = time.perf_counter()
            all_f = client.features(task, texts, texts_b=texts_b, progress=progress)
            query_seconds = time.perf_counter() - tq
            usage = client.ledger.summary(self.run_id).to_dict()
        finally:
            client.close()
        test_f = all_f[: plan.n_test]
        union_f = all_f[plan.n_test :]

        position = {pool_i: row for row, pool_i in enumerate(plan.union)}
        methods, skipped = _usable_methods(self.config.methods, test_f)
        for m, why in skipped.items():
            say(f"skipping {m}: {why}")
        out_dir = self.config.output_dir / self.run_id if write_report else None
        runs: list[MethodRun] = []
        combos = [(k, s, m) for k in self.config.shots for s in self.config.seeds for m in methods]
        bar = _progress_bar(progress, total=len(combos), desc="train+evaluate")
        try:
            for k, seed, method in combos:
                rows = [position[i] for i in plan.train_indices[(k, seed)]]
                y_train = [train.labels[i] for i in plan.train_indices[(k, seed)]]
                est = make_estimator(method, self.config, train.labels)
                tf = time.perf_counter()
                est.fit(union_f[rows], y_train)
                fit_s = time.perf_counter() - tf
                tp = time.perf_counter()
                pred = [str(p) for p in est.predict(test_f)]
                pred_s = time.perf_counter() - tp
                model_file = None
                if out_dir is not None and _should_save(self.config, method, seed):
                    model_file = _save_model(est, out_dir, method, k, seed)
                runs.append(
                    MethodRun(
                        method=method,
                        shots=k,
                        seed=seed,
                        accuracy=float(accuracy(test.labels, pred)),
                        macro_f1=float(macro_f1(test.labels, pred, labels=list(task.classes))),
                        fit_seconds=fit_s,
                        predict_seconds=pred_s,
                        n_train=len(rows),
                        model_file=model_file,
                        chosen=getattr(est, "best_params_", None),
                        chosen_cv_accuracy=getattr(est, "best_score_", None),
                        class_prior=getattr(est, "class_prior_", None),
                    )
                )
                bar.update(1)
        finally:
            bar.close()
        runs += _run_input_side(self, plan, train, test, task, skipped, say, progress)

        result = ExperimentResult(
            run_id=self.run_id,
            config=self.config,
            runs=runs,
            plan=plan,
            usage=usage,
            model=test_f.meta.model,
            model_fingerprint=_fingerprint(test_f),
            classes=tuple(task.classes),
            wall_seconds=time.perf_counter() - t0,
            query_seconds=query_seconds,
            started_at=started,
            versions=package_versions(),
            skipped=skipped,
            censored=censored_share(all_f, task.classes),
        )
        if out_dir is not None:
            _write_report(result, out_dir)
            result.output_dir = out_dir
        return result


# -- methods --------------------------------------------------------------------------------------

_NEEDS_SCORES = frozenset({"zero_shot", "calibrated_zero_shot", "icl", "calibrated_icl", "bbt"})
# Methods that query the provider themselves (docs/input_side.md): not estimators on the features.
_INPUT_SIDE = frozenset({"icl", "calibrated_icl", "bbt"})


def _run_input_side(
    exp: Experiment,
    plan: QueryPlan,
    train: _Split,
    test: _Split,
    task: Task,
    skipped: dict[str, str],
    say: Callable[[str], None],
    progress: bool,
) -> list[MethodRun]:
    """ICL and BBT for every (shots, seed), each through the client with its own queries."""
    wanted = [m for m in exp.config.methods if m in _INPUT_SIDE and m not in skipped]
    if not wanted:
        return []
    runs: list[MethodRun] = []
    icl = [m for m in wanted if m in ICL_METHODS]
    for k in exp.config.shots:
        for seed in exp.config.seeds:
            idx = plan.train_indices[(k, seed)]
            shot_set = ShotSet(
                config=exp.config,
                run_id=exp.run_id,
                client_factory=exp._client_factory,
                task=task,
                train=train,
                test=test,
                train_indices=idx,
                shots=k,
                seed=seed,
                progress=progress,
            )
            if icl:
                say(f"icl: {k} shots, seed {seed}")
                runs += run_icl(shot_set, icl)
            if "bbt" in wanted:
                say(f"bbt: {k} shots, seed {seed}")
                runs.append(run_bbt(shot_set))
    return runs


_NEEDS_HIDDEN = frozenset({"dect", "prototype", "linear_probe"})  # auto_dect adapts to either


def _usable_methods(wanted: Sequence[str], f: Features) -> tuple[list[str], dict[str, str]]:
    keep: list[str] = []
    skipped: dict[str, str] = {}
    for m in wanted:
        if m in _INPUT_SIDE and f.scores is not None:
            continue  # not an estimator on these features; run by _run_input_side
        if f.scores is None and m in _NEEDS_SCORES:
            skipped[m] = "the provider gives no label-word scores (embeddings only)"
        elif f.hidden is None and m in _NEEDS_HIDDEN:
            skipped[m] = "the provider gives no vectors for the inputs"
        else:
            keep.append(m)
    return keep, skipped


def _should_save(config: ExperimentConfig, method: str, seed: int) -> bool:
    mode = config.decoder.save_models
    if method != "dect" or mode == "none":
        return False
    return mode == "all" or seed == config.seeds[0]


def _save_model(est: Any, out_dir: Path, method: str, shots: int, seed: int) -> str:
    models = out_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    written = est.save(models / f"{method}-{shots}shot-seed{seed}")
    path = Path(written) if written is not None else models / f"{method}-{shots}shot-seed{seed}"
    return str(path.relative_to(out_dir)) if path.is_absolute() else str(path)


# -- data -----------------------------------------------------------------------------------------


def _load_split(config: ExperimentConfig, which: str, task: Task) -> _Split:
    src = config.data.train if which == "train" else config.data.test
    d = config.data
    ex = load_split(
        src.path,
        hf_dataset=src.hf_dataset,
        hf_config=src.hf_config,
        split=src.split,
        text_field=d.text_field,
        label_field=d.label_field,
        text_b_field=d.text_b_field,
        id_field=d.id_field,
        classes=task.classes,
        limit=src.limit,
        where=f"data.{which} ({src.describe()})",
    )
    return _Split(
        texts=list(ex.texts),
        texts_b=None if ex.texts_b is None else list(ex.texts_b),
        labels=[str(label) for label in ex.labels],
        ids=None if ex.ids is None else list(ex.ids),
    )


def over_budget(config: ExperimentConfig, est: Any) -> tuple[str, ...]:
    """The budget limits of ``config`` that the estimated run would pass, in words."""
    b = config.budget
    checks = [
        ("max_queries", b.max_queries, est.queries, "queries"),
        ("max_requests", b.max_requests, est.requests, "requests"),
        ("max_input_tokens", b.max_input_tokens, est.input_tokens, "input tokens"),
        ("max_cost_usd", b.max_cost_usd, est.cost_usd, "USD"),
    ]
    return tuple(
        f"budget.{key} = {limit} but this run would need about {need:g} {what}"
        for key, limit, need, what in checks
        if limit is not None and need > limit
    )


def censored_share(features: Any, classes: Sequence[str]) -> dict[str, float]:
    """Per class, the share of queried examples whose label score is an upper bound (top-k
    censoring); empty when the scores are exact or there are none."""
    if features.censored is None:
        return {}
    share = np.asarray(features.censored, dtype=np.float64).mean(axis=0)  # [C]
    return {c: round(float(v), 4) for c, v in zip(classes, share, strict=True)}


def _all_inputs(plan: QueryPlan, train: _Split, test: _Split) -> tuple[list[str], list[str] | None]:
    """Test inputs, then the training union, in the order the features come back."""
    texts = [*test.texts, *(train.texts[i] for i in plan.union)]
    if test.texts_b is None or train.texts_b is None:
        return texts, None
    return texts, [*test.texts_b, *(train.texts_b[i] for i in plan.union)]


def _fingerprint(f: Features) -> str | None:
    fp = f.meta.extra.get("fingerprint") if f.meta.extra else None
    return str(fp) if fp else f.meta.revision


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("dect-maas", "numpy", "torch", "pydantic", "httpx", "diskcache", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _new_run_id(name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs, leave=False, disable=None if os.environ.get("CI") else False)

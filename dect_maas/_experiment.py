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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import numpy as np

from ._config_file import ExperimentConfig, ProviderSection, load_config, merge
from ._exceptions import ConfigError
from ._features import Features
from ._report import SCORE_METHODS
from ._task import Task

__all__ = ["Experiment", "ExperimentEstimate", "ExperimentResult", "MethodRun", "QueryPlan"]

logger = logging.getLogger("dect_maas.experiment")


class _Estimator(Protocol):
    def fit(self, features: Features, y: Sequence[Any]) -> Any: ...
    def predict(self, features: Features) -> Any: ...


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodRun:
    """One method trained on one k-shot set (shots, seed) and evaluated on the whole test set."""

    method: str
    shots: int
    seed: int
    accuracy: float
    macro_f1: float
    fit_seconds: float
    predict_seconds: float
    n_train: int
    model_file: str | None = None
    # AutoDecT only: the settings cross-validation chose and their CV accuracy
    chosen: Mapping[str, Any] | None = None
    chosen_cv_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "shots": self.shots,
            "seed": self.seed,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "fit_seconds": self.fit_seconds,
            "predict_seconds": self.predict_seconds,
            "n_train": self.n_train,
            "model_file": self.model_file,
            "chosen": None if self.chosen is None else dict(self.chosen),
            "chosen_cv_accuracy": self.chosen_cv_accuracy,
        }


@dataclass(frozen=True)
class QueryPlan:
    """What a run needs from the provider, before anything is sent."""

    n_test: int
    n_train_pool: int
    n_train_union: int
    train_indices: Mapping[tuple[int, int], tuple[int, ...]]  # (shots, seed) -> pool indices
    union: tuple[int, ...]  # sorted pool indices queried

    @property
    def n_examples(self) -> int:
        """Examples queried: test + the training union (the content-free prompt comes on top)."""
        return self.n_test + self.n_train_union


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
            "over_budget": list(self.over_budget),
            "assumptions": list(self.assumptions),
        }


@dataclass
class ExperimentResult:
    """Everything a report needs; ``output_dir`` is the run's folder once written."""

    run_id: str
    config: ExperimentConfig
    runs: list[MethodRun]
    plan: QueryPlan
    usage: dict[str, Any]
    model: str
    model_fingerprint: str | None
    classes: tuple[str, ...]
    wall_seconds: float
    query_seconds: float
    started_at: str
    versions: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)
    output_dir: Path | None = None
    # per class: the share of its label scores that are upper bounds (top-k censoring)
    censored: dict[str, float] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        seen: list[str] = []
        for r in self.runs:
            if r.method not in seen:
                seen.append(r.method)
        return seen

    @property
    def shots(self) -> list[int]:
        return sorted({r.shots for r in self.runs})

    def select(self, method: str, shots: int) -> list[MethodRun]:
        return [r for r in self.runs if r.method == method and r.shots == shots]

    def accuracy(self, method: str, shots: int) -> tuple[float, float]:
        """Mean and sample standard deviation (ddof=1; 0 for one seed) of accuracy over seeds."""
        from . import mean_std

        accs = [r.accuracy for r in self.select(method, shots)]
        if not accs:
            raise KeyError((method, shots))
        return mean_std(accs)

    def table(self, *, markdown: bool = False) -> str:
        """Accuracy mean ± std per method and shot count, as printed by the CLI."""
        from ._report import format_table

        return format_table(self, markdown=markdown)

    def cost_summary(self) -> str:
        """Queries paid, cache hits, requests, tokens, cost and wall time, one per line."""
        from ._report import usage_lines

        return "\n".join(usage_lines(self))

    @property
    def queries_paid(self) -> int:
        return int(self.usage.get("queries_paid", 0))

    @property
    def cache_hits(self) -> int:
        return int(self.usage.get("cache_hits", 0))

    @property
    def cost_usd(self) -> float:
        return float(self.usage.get("cost_usd", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "started_at": self.started_at,
            "config": self.config.to_public_dict(),
            "versions": self.versions,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "classes": list(self.classes),
            "plan": {
                "n_test": self.plan.n_test,
                "n_train_pool": self.plan.n_train_pool,
                "n_train_union": self.plan.n_train_union,
                "train_indices": {
                    f"{k}shot-seed{s}": list(idx) for (k, s), idx in self.plan.train_indices.items()
                },
            },
            "usage": self.usage,
            "wall_seconds": self.wall_seconds,
            "query_seconds": self.query_seconds,
            "skipped_methods": self.skipped,
            "censored": {
                "per_class": self.censored,
                "overall": float(np.mean(list(self.censored.values()))) if self.censored else 0.0,
                "methods_affected": [m for m in self.methods if m in SCORE_METHODS],
            },
            "runs": [r.to_dict() for r in self.runs],
            "summary": [
                {
                    "method": m,
                    "shots": k,
                    "accuracy_mean": self.accuracy(m, k)[0],
                    "accuracy_std": self.accuracy(m, k)[1],
                    "macro_f1_mean": float(np.mean([r.macro_f1 for r in self.select(m, k)])),
                    "fit_seconds_mean": float(np.mean([r.fit_seconds for r in self.select(m, k)])),
                    "n_seeds": len(self.select(m, k)),
                }
                for m in self.methods
                for k in self.shots
                if self.select(m, k)
            ],
        }


# -- the runner -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Split:
    texts: list[str]
    texts_b: list[str] | None
    labels: list[str]
    ids: list[str] | None


ProgressFactory = Callable[..., Any]


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
        from . import sample_k_shot  # OpenPrompt's sampler: per-label shuffle, first k

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
        finally:
            client.close()
        return ExperimentEstimate(
            plan=plan,
            queries=int(est.total_queries),
            requests=int(est.requests),
            input_tokens=int(est.input_tokens),
            cost_usd=float(est.cost_usd),
            cached_queries=int(est.cached_queries),
            assumptions=(*getattr(est, "assumptions", ()), *getattr(est, "tokens_basis", ())),
            by_role=dict(getattr(est, "by_role", {})),
            over_budget=over_budget(self.config, est),
        )

    # -- running ----------------------------------------------------------------------------------

    def run(
        self,
        *,
        progress: bool = False,
        write_report: bool = True,
        on_event: Callable[[str], None] | None = None,
    ) -> ExperimentResult:
        """Query (paying only for what the cache lacks), train every method, evaluate, report."""
        from . import accuracy, macro_f1

        say = on_event or (lambda msg: logger.info("%s", msg))
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
            usage = _usage_dict(client.ledger.summary(self.run_id))
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
                    )
                )
                bar.update(1)
        finally:
            bar.close()

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
            from ._report import write_report as _write

            _write(result, out_dir)
            result.output_dir = out_dir
        return result


# -- methods --------------------------------------------------------------------------------------

_NEEDS_SCORES = frozenset({"zero_shot", "calibrated_zero_shot"})
_NEEDS_HIDDEN = frozenset({"dect", "prototype", "linear_probe"})  # auto_dect adapts to either


def make_estimator(
    method: str, config: ExperimentConfig, train_labels: Sequence[str] = ()
) -> _Estimator:
    """The one table from method names to estimators.

    ``train_labels`` are the whole training file's labels, for ``decoder.class_prior = "train"``.
    """
    from . import (
        AutoDecTClassifier,
        DecTClassifier,
        LinearProbeClassifier,
        PrototypeClassifier,
        ZeroShotClassifier,
    )

    d = config.decoder
    decoder_args: dict[str, Any] = {
        "projection_dim": d.projection_dim,
        "n_steps": d.n_steps,
        "lr": d.lr,
        "normalize": d.normalize,
        "random_state": d.random_state,
    }
    cal = "auto" if d.calibration == "none" else d.calibration
    factories: dict[str, Callable[[], _Estimator]] = {
        "dect": lambda: DecTClassifier(
            prompt_weight=d.prompt_weight, calibration=d.calibration, **decoder_args
        ),
        "auto_dect": lambda: AutoDecTClassifier(
            projection_dim=d.projection_dim,
            random_state=d.random_state,
            class_prior=_class_prior(d.class_prior, train_labels),
        ),
        "zero_shot": lambda: ZeroShotClassifier(calibration="none"),
        "calibrated_zero_shot": lambda: ZeroShotClassifier(calibration=cal),
        "prototype": lambda: PrototypeClassifier(**decoder_args),
        "linear_probe": lambda: LinearProbeClassifier(),
    }
    try:
        return factories[method]()
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose from {sorted(factories)}") from None


def _class_prior(
    setting: Literal["none", "train"] | dict[str, float], train_labels: Sequence[str]
) -> dict[str, float] | None:
    if setting == "none":
        return None
    if setting == "train":
        if not train_labels:
            raise ConfigError('decoder.class_prior = "train" needs the training labels')
        return {str(k): float(v) for k, v in Counter(train_labels).items()}
    return dict(setting)


def _usable_methods(wanted: Sequence[str], f: Features) -> tuple[list[str], dict[str, str]]:
    keep: list[str] = []
    skipped: dict[str, str] = {}
    for m in wanted:
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
    from . import load_examples

    src = config.data.train if which == "train" else config.data.test
    d = config.data
    where = f"data.{which} ({src.describe()})"
    if src.path is not None:
        if not src.path.exists():
            raise ConfigError(f"{where}: file not found")
        ex = load_examples(
            src.path,
            text_field=d.text_field,
            label_field=d.label_field,
            text_b_field=d.text_b_field,
            id_field=d.id_field,
        )
    else:
        ex = _load_hf(config, which)
    texts = [str(t) for t in ex.texts]
    texts_b = None if ex.texts_b is None else [str(t) for t in ex.texts_b]
    ids = None if ex.ids is None else [str(i) for i in ex.ids]
    labels = [_class_name(lab, task, where) for lab in ex.labels]
    if src.limit is not None:
        texts, labels = texts[: src.limit], labels[: src.limit]
        texts_b = None if texts_b is None else texts_b[: src.limit]
        ids = None if ids is None else ids[: src.limit]
    if not texts:
        raise ConfigError(f"{where}: no examples")
    return _Split(texts=texts, texts_b=texts_b, labels=labels, ids=ids)


def _load_hf(config: ExperimentConfig, which: str) -> Any:
    from . import Examples

    src = config.data.train if which == "train" else config.data.test
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data.{which}.hf_dataset needs the Hugging Face `datasets` package "
            "(pip install datasets), or give a JSONL/CSV path"
        ) from None
    ds = datasets.load_dataset(src.hf_dataset, src.hf_config, split=src.split)
    d = config.data
    return Examples.from_hf_dataset(
        ds,
        text_field=d.text_field,
        label_field=d.label_field,
        text_b_field=d.text_b_field,
        id_field=d.id_field,
    )


def _class_name(label: Any, task: Task, where: str) -> str:
    classes = task.classes
    if isinstance(label, str) and label in classes:
        return label
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(classes):
            return classes[int(label)]
    elif isinstance(label, str) and label.isdigit() and int(label) < len(classes):
        return classes[int(label)]
    raise ConfigError(
        f"{where}: label {label!r} is not one of the task's classes {list(classes)} "
        "(nor a class index)"
    )


# -- client and bookkeeping -----------------------------------------------------------------------


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


def build_client(config: ExperimentConfig, run_id: str) -> Any:
    """A Client for the config's provider with its cache, ledger, budget, rate limit, retries."""
    from ._budget import BudgetLimits
    from ._cache import CacheConfig
    from ._client import CONNECT_TIMEOUT_S, Client
    from ._config import RateLimit, RetryPolicy

    p = config.provider
    return Client(
        make_adapter(p),
        cache=CacheConfig(config.cache_dir),
        ledger=config.ledger_dir,
        budget=BudgetLimits(**config.budget.model_dump()),
        rate_limit=RateLimit(
            requests_per_minute=p.requests_per_minute, tokens_per_minute=p.tokens_per_minute
        ),
        retry=RetryPolicy(max_attempts=p.max_attempts),
        max_concurrency=p.max_concurrency,
        run_id=run_id,
        api_key_env=api_keys(p),
        # a read may take minutes on a busy model server; a dead host should not
        timeout=httpx.Timeout(p.timeout_s, connect=min(CONNECT_TIMEOUT_S, p.timeout_s)),
    )


def api_keys(p: ProviderSection) -> str | dict[str, str | None] | None:
    """The key variable per endpoint role: one name (the client sends it to the vectors endpoint
    only on the scores endpoint's host), or a table when the vectors key is named apart."""
    if p.kind == "embeddings":
        env = p.embeddings_api_key_env or p.api_key_env
        return {"scores": None, "vectors": env} if env else None
    if p.embeddings_api_key_env is not None:
        return {"scores": p.api_key_env, "vectors": p.embeddings_api_key_env}
    return p.api_key_env


def make_adapter(p: ProviderSection) -> Any:
    """The one table from the provider section to an adapter."""
    from .adapters import (
        HFInferenceAdapter,
        LocalAdapter,
        OpenAIChatAdapter,
        OpenAICompatibleAdapter,
        Prices,
        TEIAdapter,
    )

    prices = Prices(
        per_million_input_tokens=p.price_per_million_input_tokens or 0.0,
        per_request=p.price_per_request or 0.0,
        per_million_output_tokens=p.price_per_million_output_tokens or 0.0,
    )
    vector_prices = Prices(
        per_million_input_tokens=(
            p.embeddings_price_per_million_input_tokens
            if p.embeddings_price_per_million_input_tokens is not None
            else prices.per_million_input_tokens
        ),
        per_request=(
            p.embeddings_price_per_request
            if p.embeddings_price_per_request is not None
            else prices.per_request
        ),
    )
    opt: dict[str, Any] = {}
    if p.label_token_ids is not None:
        if p.kind not in ("local", "openai", "openai_chat"):
            raise ConfigError(
                f"provider.label_token_ids: the {p.kind} provider takes no token ids "
                "(hf_inference scores label words by their text, tei gives no scores); remove it"
            )
        opt["label_token_ids"] = {k: tuple(v) for k, v in p.label_token_ids.items()}
    if p.pooling is not None and p.kind in ("openai", "openai_chat", "embeddings", "hf_inference"):
        opt["pooling"] = p.pooling
    if p.embeddings_batch_size is not None and p.kind in ("openai", "openai_chat", "embeddings"):
        opt["max_embedding_inputs"] = p.embeddings_batch_size
    if p.kind == "embeddings":
        base = p.embeddings_base_url or p.base_url
        model = p.embeddings_model or p.model
        assert base is not None
        assert model is not None  # validated by ProviderSection
        return OpenAICompatibleAdapter(
            base_url=base,
            model=model,
            scores=False,
            embeddings_base_url=base,
            embeddings_model=model,
            embeddings_prices=vector_prices,
            tokenize_api="none",
            **opt,
        )
    if p.kind == "local":
        assert p.base_url is not None  # validated by ProviderSection
        if p.max_prompts_per_request is not None:
            opt["max_inputs_per_request"] = p.max_prompts_per_request
        if p.mask_token is not None:
            opt["mask_token"] = p.mask_token
        return LocalAdapter(base_url=p.base_url, model=p.model or "local", prices=prices, **opt)
    if p.kind in ("openai", "openai_chat"):
        assert p.base_url is not None
        assert p.model is not None
        if p.top_k is not None:
            opt["top_logprobs"] = p.top_k
        if p.tokenize_api is not None:
            opt["tokenize_api"] = p.tokenize_api
        common: dict[str, Any] = dict(
            base_url=p.base_url,
            model=p.model,
            exact_token_ids=p.exact_token_ids,
            embeddings_model=p.embeddings_model,
            embeddings_base_url=p.embeddings_base_url,
            prices=prices,
            embeddings_prices=vector_prices,
        )
        if p.kind == "openai_chat":
            if p.combine_forms == "as-written":
                opt["surface_forms"] = False
            elif p.combine_forms is not None:
                opt["combine"] = p.combine_forms
            try:
                return OpenAIChatAdapter(system=p.system_prompt, **common, **opt)
            except ValueError as exc:  # top_logprobs above the chat cap
                raise ConfigError(f"provider.top_k: {exc}") from None
        if p.max_prompts_per_request is not None:
            opt["max_prompts_per_request"] = p.max_prompts_per_request
        return OpenAICompatibleAdapter(**common, **opt)
    if p.kind == "hf_inference":
        assert p.model is not None
        if p.mask_token is not None:
            opt["mask_token"] = p.mask_token
        return HFInferenceAdapter(
            model=p.model,
            base_url=p.base_url,
            embeddings_model=p.embeddings_model,
            embeddings_base_url=p.embeddings_base_url,
            prices=prices,
            **opt,
        )
    assert p.base_url is not None
    if p.max_prompts_per_request is not None:
        opt["max_inputs_per_request"] = p.max_prompts_per_request
    return TEIAdapter(base_url=p.base_url, model=p.model or "tei", prices=prices, **opt)


def _all_inputs(plan: QueryPlan, train: _Split, test: _Split) -> tuple[list[str], list[str] | None]:
    """Test inputs, then the training union, in the order the features come back."""
    texts = [*test.texts, *(train.texts[i] for i in plan.union)]
    if test.texts_b is None or train.texts_b is None:
        return texts, None
    return texts, [*test.texts_b, *(train.texts_b[i] for i in plan.union)]


def _usage_dict(summary: Any) -> dict[str, Any]:
    """The ledger's per-run summary as plain JSON values."""
    if summary is None:
        return {}
    if hasattr(summary, "to_dict"):
        raw = summary.to_dict()
    elif hasattr(summary, "__dataclass_fields__"):
        from dataclasses import asdict

        raw = asdict(summary)
    elif isinstance(summary, Mapping):
        raw = dict(summary)
    else:
        raw = dict(vars(summary))
    return {str(k): v for k, v in raw.items()}


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

"""Run reports: ``report.json`` (machine-readable), ``report.md`` (for people) and PNG plots.

Plots need matplotlib (``pip install 'dect-maas[plots]'``); without it the JSON and Markdown are
still written and the Markdown says how to get the plots. matplotlib is driven through its object
API on the Agg canvas, so nothing here touches global pyplot state or needs a display.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dect_maas._metrics import mean_std

from . import plots
from .config_file import ExperimentConfig

__all__ = [
    "SCORE_METHODS",
    "ExperimentResult",
    "MethodRun",
    "QueryPlan",
    "format_table",
    "render_markdown",
    "write_report",
]

#: The methods that read label-word scores (and so suffer from censored ones).
SCORE_METHODS = ("dect", "auto_dect", "zero_shot", "calibrated_zero_shot")

PLOTS_MISSING = "plots skipped: matplotlib is not installed (pip install 'dect-maas[plots]')"
_ZERO_SHOT = ("zero_shot", "calibrated_zero_shot")
_LABELS = {
    "dect": "DecT",
    "auto_dect": "DecT, auto (CV)",
    "zero_shot": "zero-shot",
    "calibrated_zero_shot": "calibrated zero-shot",
    "prototype": "prototype only (λ=0)",
    "linear_probe": "linear probe",
    "icl": "ICL",
    "calibrated_icl": "ICL, calibrated",
    "bbt": "BBT",
}


# -- what a run produced ---------------------------------------------------------------------------


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
    # AutoDecT only: the class mix it was given (shares summing to 1), or None
    class_prior: Mapping[str, float] | None = None
    # input-side methods: what this run itself asked of the provider (queries, tokens, dollars,
    # query seconds; BBT's loss curve), since its queries are not the shared DecT features
    cost: Mapping[str, Any] | None = None

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
            "class_prior": None if self.class_prior is None else dict(self.class_prior),
            "cost": None if self.cost is None else dict(self.cost),
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
        accs = [r.accuracy for r in self.select(method, shots)]
        if not accs:
            raise KeyError((method, shots))
        return mean_std(accs)

    def table(self, *, markdown: bool = False) -> str:
        """Accuracy mean ± std per method and shot count, as printed by the CLI."""
        return format_table(self, markdown=markdown)

    def cost_summary(self) -> str:
        """Queries paid, cache hits, requests, tokens, cost and wall time, one per line."""
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


# -- writing it down ------------------------------------------------------------------------------


def write_report(result: ExperimentResult, out_dir: Path) -> dict[str, Path]:
    """Write the run folder; returns the files written by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    plots, plot_note = _write_plots(result, out_dir)
    files.update(plots)
    data = result.to_dict()
    data["files"] = {name: str(p.relative_to(out_dir)) for name, p in plots.items()}
    data["files"].update({"markdown": "report.md", "json": "report.json"})
    if plot_note:
        data["notes"] = [plot_note]
    if any(r.cost is not None for r in result.runs):
        from .cost_report import cost_rows

        data["cost_on_one_footing"] = cost_rows(result)
    json_path = out_dir / "report.json"
    _atomic_write(json_path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    md_path = out_dir / "report.md"
    _atomic_write(md_path, render_markdown(result, plots=plots, note=plot_note))
    files["json"] = json_path
    files["markdown"] = md_path
    return files


# -- text -----------------------------------------------------------------------------------------


def format_table(result: ExperimentResult, *, markdown: bool = True) -> str:
    """Accuracy mean ± std over seeds per method (rows) and shot count (columns), with fit time."""
    shots = result.shots
    header = ["method", *[f"{k}-shot" for k in shots], "fit time (mean)"]
    rows: list[list[str]] = []
    for m in result.methods:
        cells = [_LABELS.get(m, m)]
        fits: list[float] = []
        for k in shots:
            runs = result.select(m, k)
            if not runs:
                cells.append("–")
                continue
            mean, std = result.accuracy(m, k)
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
            fits.extend(r.fit_seconds for r in runs)
        cells.append(_seconds(float(np.mean(fits))) if fits else "–")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def usage_lines(result: ExperimentResult) -> list[str]:
    """The cost side of the run, in words."""
    u = result.usage
    p = result.plan
    needed = p.n_test + p.n_train_union
    lines = [
        f"examples queried: {p.n_test} test + {p.n_train_union} training (the union of all k-shot "
        f"sets) = {needed}, plus the content-free prompt",
        f"queries paid this run: {result.queries_paid}; cache hits: {result.cache_hits}; "
        f"requests: {int(u.get('requests', 0))}; input tokens: {int(u.get('input_tokens', 0))}",
        f"cost: {_money(result.cost_usd)}",
        f"wall time: {_seconds(result.wall_seconds)} (querying {_seconds(result.query_seconds)})",
    ]
    unknown = int(u.get("queries_unknown", 0))
    if unknown:
        lines.append(
            f"queries of unknown outcome or lost answers: {unknown} (sent, then cut off; counted "
            "at their worst case)"
        )
    if result.queries_paid == 0:
        lines.append("this run paid zero queries: every answer came from the cache")
    if result.censored and any(result.censored.values()):
        overall = 100 * float(np.mean(list(result.censored.values())))
        per = ", ".join(f"{c} {100 * v:.0f}%" for c, v in result.censored.items())
        affected = [m for m in result.methods if m in SCORE_METHODS]
        lines.append(
            f"censored label scores (outside the provider's top-k, kept as upper bounds): "
            f"{overall:.1f}% ({per}); affects {', '.join(affected) or 'no method run'}"
        )
    return lines


def summary_lines(result: ExperimentResult) -> list[str]:
    """What `dect-maas run` and the demo print after a run: the table, the costs, the report."""
    lines = [format_table(result, markdown=False), "", *usage_lines(result)]
    if result.output_dir is not None:
        lines.append(f"report: {result.output_dir / 'report.md'}")
    return lines


def render_markdown(
    result: ExperimentResult, *, plots: dict[str, Path] | None = None, note: str | None = None
) -> str:
    cfg = result.config
    fp = result.model_fingerprint or "not reported"
    parts = [
        f"# {cfg.name}: run {result.run_id}",
        "",
        f"Started {result.started_at}. Provider `{cfg.provider.kind}` "
        f"at `{cfg.provider.base_url}`, "
        f"model `{result.model or cfg.provider.model or 'unknown'}` (fingerprint `{fp}`).",
        f"Task `{cfg.task.name}`: template `{cfg.task.template}`, classes "
        + ", ".join(f"{c} → {_words(cfg.task.label_words[c])}" for c in cfg.task.label_words)
        + ".",
        f"Seeds {', '.join(map(str, cfg.seeds))}; test set of {result.plan.n_test} examples, "
        f"k-shot sets drawn from {result.plan.n_train_pool} training examples.",
        "",
        "## Accuracy (%, mean ± std over seeds)",
        "",
        format_table(result, markdown=True),
        "",
        "## Cost",
        "",
        *[f"- {line}" for line in usage_lines(result)],
        "",
    ]
    if any(r.cost is not None for r in result.runs):
        from .cost_report import cost_table

        parts += [
            "## Cost on one footing (docs/input_side.md)",
            "",
            "Means over seeds. ICL and BBT may be scored on fewer test rows (column 'test rows').",
            "",
            cost_table(result),
            "",
        ]
    if result.skipped:
        parts += ["## Skipped methods", ""]
        parts += [f"- {m}: {why}" for m, why in result.skipped.items()]
        parts.append("")
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{name}]({p.name})" for name, p in plots.items()]
        parts.append("")
    chosen = [r for r in result.runs if r.chosen is not None]
    if chosen:
        parts += [
            "## Settings chosen by cross-validation (auto DecT)",
            "",
            "On the training shots only; report.json holds every chosen parameter.",
            "",
            "| shots | seed | chosen | CV accuracy |",
            "|---|---|---|---|",
        ]
        for r in chosen:
            assert r.chosen is not None
            cv = "—" if r.chosen_cv_accuracy is None else f"{100 * r.chosen_cv_accuracy:.1f}"
            parts.append(f"| {r.shots} | {r.seed} | {r.chosen.get('name', '?')} | {cv} |")
        parts += ["", _prior_line(chosen, result.config.decoder.class_prior), ""]
    if note:
        parts += [f"_{note}_", ""]
    models = [r for r in result.runs if r.model_file]
    if models:
        parts += [
            "## Saved models",
            "",
            "Load with `DecTClassifier.load(path)`; predict on new texts with "
            "`dect-maas predict MODEL --input FILE`.",
            "",
        ]
        parts += [f"- `{r.model_file}` ({r.shots}-shot, seed {r.seed})" for r in models]
        parts.append("")
    return "\n".join(parts)


# -- plots ----------------------------------------------------------------------------------------


def _write_plots(result: ExperimentResult, out_dir: Path) -> tuple[dict[str, Path], str | None]:
    if not plots.available():
        return {}, PLOTS_MISSING
    files: dict[str, Path] = {}
    shots = result.shots

    fig, ax = plots.axes(6.4, 4.2)
    for i, m in enumerate(result.methods):
        xs = [k for k in shots if result.select(m, k)]
        stats = np.array([result.accuracy(m, k) for k in xs]) * 100
        style = "--" if m in _ZERO_SHOT else "-"
        # the same colour per method in both plots
        plots.accuracy_band(ax, xs, stats, color=f"C{i}", label=_LABELS.get(m, m), style=style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    files["accuracy_vs_shots"] = plots.finish(
        fig,
        ax,
        out_dir / "accuracy_vs_shots.png",
        title=f"{result.config.name}: accuracy vs shots (band: ± std over seeds)",
        xlabel="shots per class",
    )

    # Queries paid to train one model: k·C labelled examples plus the content-free prompt for
    # calibration (plain zero-shot needs none). The test set adds the same n_test to every point.
    n_classes = len(result.classes)
    per_query = result.cost_usd / result.queries_paid if result.queries_paid else 0.0
    fig, ax = plots.axes(6.4, 4.2)
    ticks: set[int] = set()
    for i, m in enumerate(result.methods):
        if m in ("icl", "calibrated_icl", "bbt"):
            continue  # their queries are not k·C + 1: plotted in accuracy_vs_cost.png
        xs_shots = [k for k in shots if result.select(m, k)]
        stats = np.array([result.accuracy(m, k) for k in xs_shots]) * 100
        color = f"C{i}"
        if m in _ZERO_SHOT:  # no labelled example paid: a level line, not a point on the axis
            label = f"{_LABELS[m]} (no training)"
            ax.axhline(stats[:, 0].mean(), linestyle="--", color=color, label=label)
            continue
        xs = [k * n_classes + 1 for k in xs_shots]
        ticks.update(xs)
        plots.accuracy_band(ax, xs, stats, color=color, label=_LABELS.get(m, m))
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
    if per_query > 0:

        def to_usd(q: Any) -> Any:
            return np.asarray(q, dtype=np.float64) * per_query

        def to_queries(c: Any) -> Any:
            return np.asarray(c, dtype=np.float64) / per_query

        sec = ax.secondary_xaxis("top", functions=(to_usd, to_queries))
        sec.set_xlabel(f"USD at {_money(per_query)} per query (this run's average)")
    files["accuracy_vs_queries"] = plots.finish(  # no legend when only input-side methods ran
        fig,
        ax,
        out_dir / "accuracy_vs_queries.png",
        title=f"{result.config.name}: accuracy vs queries paid",
        xlabel=(
            f"training queries paid per model (k·{n_classes} + 1); "
            f"test set adds {result.plan.n_test}"
        ),
        pad=30 if per_query else 6,
    )
    if any(r.cost is not None for r in result.runs):
        from .cost_report import plot_accuracy_vs_cost

        cost_plot = plot_accuracy_vs_cost(result, out_dir)
        if cost_plot is not None:
            files["accuracy_vs_cost"] = cost_plot
    return files, None


# -- helpers --------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _words(w: Any) -> str:
    return "/".join(w) if isinstance(w, list) else str(w)


def _seconds(s: float) -> str:
    if s < 1:
        return f"{1000 * s:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


def _money(x: float) -> str:
    """Plain decimals, never scientific notation: three significant digits below a cent."""
    if x == 0 or not math.isfinite(x):
        return "$0 (unpriced or free)" if x == 0 else "unknown"
    if x >= 0.01:
        return f"${x:.4f}"
    digits = min(12, 2 - math.floor(math.log10(x)))
    return f"${x:.{digits}f}"


def _prior_line(runs: Sequence[MethodRun], setting: Any) -> str:
    """Which class mix auto DecT was given, in words: its choices and scores depend on it."""
    priors = {tuple(sorted(r.class_prior.items())) if r.class_prior else () for r in runs}
    named = f"`decoder.class_prior = {json.dumps(setting)}`"
    if priors == {()}:
        return (
            f"Class mix: none given ({named}); auto DecT assumed the balanced mix of its k-shot "
            "sets. The other methods are never given one."
        )
    shown = "; ".join(", ".join(f"{c} {100 * p:.1f} %" for c, p in mix) for mix in priors if mix)
    return (
        f"Class mix given to auto DecT ({named}): {shown}. Its cross-validation weighted the "
        "held-out rows to this mix and its class scores were shifted to it; the other methods "
        'are never given one (`"none"` turns it off).'
    )

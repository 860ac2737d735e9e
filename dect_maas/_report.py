"""Run reports: ``report.json`` (machine-readable), ``report.md`` (for people) and PNG plots.

Plots need matplotlib (``pip install 'dect-maas[plots]'``); without it the JSON and Markdown are
still written and the Markdown says how to get the plots. matplotlib is driven through its object
API on the Agg canvas, so nothing here touches global pyplot state or needs a display.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._experiment import ExperimentResult

__all__ = ["SCORE_METHODS", "format_table", "render_markdown", "write_report"]

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
}


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
        parts.append("")
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
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return {}, PLOTS_MISSING
    files: dict[str, Path] = {}
    shots = result.shots

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, m in enumerate(result.methods):
        xs = [k for k in shots if result.select(m, k)]
        stats = np.array([result.accuracy(m, k) for k in xs]) * 100
        style = "--" if m in _ZERO_SHOT else "-"
        color = f"C{i}"  # the same colour per method in both plots
        ax.plot(xs, stats[:, 0], style, marker="o", color=color, label=_LABELS.get(m, m))
        lo, hi = stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1]
        ax.fill_between(xs, lo, hi, alpha=0.2, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result.config.name}: accuracy vs shots (band: ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "accuracy_vs_shots.png"
    fig.savefig(path, dpi=120)
    files["accuracy_vs_shots"] = path

    # Queries paid to train one model: k·C labelled examples plus the content-free prompt for
    # calibration (plain zero-shot needs none). The test set adds the same n_test to every point.
    n_classes = len(result.classes)
    per_query = result.cost_usd / result.queries_paid if result.queries_paid else 0.0
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ticks: set[int] = set()
    for i, m in enumerate(result.methods):
        xs_shots = [k for k in shots if result.select(m, k)]
        stats = np.array([result.accuracy(m, k) for k in xs_shots]) * 100
        color = f"C{i}"
        if m in _ZERO_SHOT:  # no labelled example paid: a level line, not a point on the axis
            label = f"{_LABELS[m]} (no training)"
            ax.axhline(stats[:, 0].mean(), linestyle="--", color=color, label=label)
            continue
        xs = [k * n_classes + 1 for k in xs_shots]
        ticks.update(xs)
        ax.plot(xs, stats[:, 0], marker="o", color=color, label=_LABELS.get(m, m))
        lo, hi = stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1]
        ax.fill_between(xs, lo, hi, alpha=0.2, color=color)
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
    ax.set_xlabel(
        f"training queries paid per model (k·{n_classes} + 1); test set adds {result.plan.n_test}"
    )
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result.config.name}: accuracy vs queries paid", pad=30 if per_query else 6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if per_query > 0:

        def to_usd(q: Any) -> Any:
            return np.asarray(q, dtype=np.float64) * per_query

        def to_queries(c: Any) -> Any:
            return np.asarray(c, dtype=np.float64) / per_query

        sec = ax.secondary_xaxis("top", functions=(to_usd, to_queries))
        sec.set_xlabel(f"USD at {_money(per_query)} per query (this run's average)")
    fig.tight_layout()
    path = out_dir / "accuracy_vs_queries.png"
    fig.savefig(path, dpi=120)
    files["accuracy_vs_queries"] = path
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

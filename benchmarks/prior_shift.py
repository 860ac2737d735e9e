"""What the training file's class mix is worth to AutoDecT, and what it costs when it is wrong.

    .venv/bin/python benchmarks/prior_shift.py --data-dir /work/shared/data --json shift.json

Training files only, and only examples whose features ``compare_methods.py`` already cached (its
shot samples and development rows): no model query, nothing from a test file. Each training
file's cached examples are split, per class, into two halves: a *labelled pool* (the training
file a user would give `dect-maas run`: the shots are drawn from it, and the prior is its label
counts) and a *deployment* set to score on. Each half is subsampled to a class mix, so that:

- ``pool mix == deployment mix``: the prior is right (a labelled pool drawn like the data in use);
- ``pool mix != deployment mix``: the prior is wrong (label shift between the two).

Every method of ``compare_methods.py`` is scored, on both footings: ``auto_dect`` and the plain
baselines see the k shots only; ``auto_dect_prior`` and the ``*_prior`` baselines are also told the
pool's class mix. Prints JSON and a Markdown table per scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from compare_methods import (
    BASELINES,
    METHODS,
    PRIOR_BASELINES,
    TASKS,
    FeatureSource,
    balanced_accuracy,
    make_method,
)

from dect_maas import Task, accuracy, load_examples, sample_k_shot

# (set, scenario name, pool mix, deployment mix); None = the file's own (natural) mix.
B50 = {"negative": 0.5, "positive": 0.5}
B70 = {"negative": 0.7, "positive": 0.3}
B30 = {"negative": 0.3, "positive": 0.7}
SKEW5 = {
    "very negative": 0.35,
    "negative": 0.25,
    "neutral": 0.2,
    "positive": 0.12,
    "very positive": 0.08,
}
UNIFORM5 = dict.fromkeys(SKEW5, 1.0)
SCENARIOS: tuple[tuple[str, str, dict[str, float] | None, dict[str, float] | None], ...] = (
    ("movies_binary", "50/50 -> 50/50", B50, B50),
    (
        "movies_binary",
        "70/30 -> 70/30",
        B70,
        B70,
    ),
    (
        "movies_binary",
        "30/70 -> 30/70",
        B30,
        B30,
    ),
    ("movies_binary", "70/30 -> 50/50", B70, B50),
    (
        "movies_binary",
        "70/30 -> 30/70",
        B70,
        B30,
    ),
    ("movies_5way", "natural -> natural", None, None),
    ("movies_5way", "natural -> uniform", None, UNIFORM5),
    ("movies_5way", "skewed -> skewed", SKEW5, SKEW5),
    ("movies_5way", "skewed -> uniform", SKEW5, UNIFORM5),
    ("drugs_3way", "natural -> natural", None, None),
    ("drugs_3way", "natural -> uniform", None, {"negative": 1, "neutral": 1, "positive": 1}),
)


def subsample(
    idx_by_class: dict[str, np.ndarray], mix: dict[str, float] | None, rng: np.random.RandomState
) -> np.ndarray:
    """The largest subsample with class shares ``mix`` (None: keep everything)."""
    if mix is None:
        return np.sort(np.concatenate(list(idx_by_class.values())))
    total = sum(mix.values())
    share = {c: w / total for c, w in mix.items()}
    n = min(len(idx_by_class[c]) / share[c] for c in share)
    picked = [rng.permutation(idx_by_class[c])[: int(n * share[c])] for c in share]
    return np.sort(np.concatenate(picked))


def run_scenario(
    source: FeatureSource,
    data_dir: Path,
    name: str,
    pool_mix: dict[str, float] | None,
    dep_mix: dict[str, float] | None,
    shots: list[int],
    seeds: list[int],
) -> dict[str, Any]:
    spec = TASKS[name]
    task = Task(spec["template"], spec["label_words"], name=name)
    train = load_examples(data_dir / f"{name}_train.jsonl")
    from _inprocess_features import _key

    store = source._inproc._store(task.template)
    seen: set[str] = set()
    cached = []
    for i, t in enumerate(train.texts):
        k = _key(t)
        if k in store and k not in seen:
            seen.add(k)
            cached.append(i)
    labels = np.array(train.labels, dtype=object)
    rng = np.random.RandomState(2026)
    pool_by, dep_by = {}, {}
    for c in task.classes:
        idx = rng.permutation([i for i in cached if labels[i] == c])
        half = len(idx) // 2
        pool_by[c], dep_by[c] = idx[:half], idx[half:]
    pool = subsample(pool_by, pool_mix, rng)
    dep = subsample(dep_by, dep_mix, rng)
    y_pool = [str(labels[i]) for i in pool]
    y_dep = [str(labels[i]) for i in dep]
    prior = {c: float(y_pool.count(c)) for c in task.classes}
    pool_f = source.features(task, [train.texts[int(i)] for i in pool])
    dep_f = source.features(task, [train.texts[int(i)] for i in dep])
    cells: dict[str, Any] = {}
    for k in [k for k in shots if min(prior.values()) >= k]:
        acc: dict[str, list[float]] = {m: [] for m in METHODS}
        bal: dict[str, list[float]] = {m: [] for m in METHODS}
        for seed in seeds:
            rows = sample_k_shot(y_pool, k, seed)
            feats, y = pool_f[rows], [y_pool[int(r)] for r in rows]
            for m in METHODS:
                pred = make_method(m, seed, prior).fit(feats, y).predict(dep_f)
                acc[m].append(100.0 * accuracy(y_dep, pred))
                bal[m].append(100.0 * balanced_accuracy(y_dep, pred))
        mean = {m: float(np.mean(v)) for m, v in acc.items()}
        best = max(BASELINES, key=lambda m: mean[m])
        best_p = max(PRIOR_BASELINES, key=lambda m: mean[m])
        cells[str(k)] = {
            "mean": {m: round(v, 2) for m, v in mean.items()},
            "balanced_mean": {m: round(float(np.mean(v)), 2) for m, v in bal.items()},
            "best_baseline": best,
            "best_prior_baseline": best_p,
            "margin": {
                "auto_dect": round(mean["auto_dect"] - mean[best], 2),
                "auto_dect_prior": round(mean["auto_dect_prior"] - mean[best], 2),
                "auto_dect_prior_vs_prior_baselines": round(
                    mean["auto_dect_prior"] - mean[best_p], 2
                ),
                "prior_minus_no_prior": round(mean["auto_dect_prior"] - mean["auto_dect"], 2),
            },
        }
        print(
            f"[{name}] {k}-shot: auto {mean['auto_dect']:.1f}, auto+prior "
            f"{mean['auto_dect_prior']:.1f}, best baseline {best} {mean[best]:.1f}, "
            f"best with prior {best_p} {mean[best_p]:.1f}",
            file=sys.stderr,
        )
    return {
        "set": name,
        "pool_mix": {c: y_pool.count(c) for c in task.classes},
        "deployment_mix": {c: y_dep.count(c) for c in task.classes},
        "shots": cells,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| set | pool -> deployment | shots | auto | auto+prior | best baseline | "
        "best baseline with prior | prior − no prior |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for k, c in r["shots"].items():
            m = c["mean"]
            b, bp = c["best_baseline"], c["best_prior_baseline"]
            lines.append(
                f"| {r['set']} | {r['scenario']} | {k} | {m['auto_dect']:.1f} | "
                f"{m['auto_dect_prior']:.1f} | {m[b]:.1f} ({b}) | {m[bp]:.1f} ({bp}) | "
                f"{c['margin']['prior_minus_no_prior']:+.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--sets", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "dect-maas" / "compare"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    source = FeatureSource(args.cache_dir, None)
    t0 = time.time()
    results = []
    for name, label, pool_mix, dep_mix in SCENARIOS:
        if name not in args.sets:
            continue
        print(f"[{name}] {label}", file=sys.stderr)
        res = run_scenario(source, args.data_dir, name, pool_mix, dep_mix, args.shots, args.seeds)
        results.append({"scenario": label, **res})
    out = {
        "results": results,
        "new_forward_passes": source.n_forward,
        "wall_s": round(time.time() - t0, 1),
    }
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""AutoDecT design variants on the development splits (``compare_methods.py --eval-on dev``).

    .venv/bin/python benchmarks/auto_variants.py [--sets drugs_3way ...] [--json out.json]

The development rows are up to 1,000 training-file examples outside every shot sample (exactly
``compare_methods.py --eval-on dev``); no test file is read. For every set, shot count and seed
(0-4) it fits AutoDecTClassifier once without the prompt blend and derives the variants from
that fit, so they differ only in how the final model is formed:

- ``hard_pick``: the chosen model alone (``prompt_blend=0``: the search before the blend).
- ``gated_blend``: the default, ``AutoDecTClassifier()`` (½ plain prompt, kept by the 1-SE rule).
- ``always_blend``: ½ chosen + ½ plain zero-shot, never checked.
- ``model_prior_half`` / ``model_prior_full``: the chosen model's scores plus ½ (1) x the
  content-free prompt's log-probabilities over the classes (the model's own class prior), for
  models that assume balanced classes.
- ``tied_top3`` / ``tied_top5``: the mean probabilities of the first 3 (5) candidates tied with
  the best under the 1-SE rule, each refitted through its public estimator.

Prints, per cell, each variant's mean accuracy and balanced accuracy and its accuracy margin to
the best baseline (zero-shot plain or calibrated, prototype, linear probe), and a summary.
Features come from the same cache as ``compare_methods.py`` (in-process path).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).parent))
import compare_methods as cm

from dect_maas import (
    AutoDecTClassifier,
    LinearProbeClassifier,
    PrototypeClassifier,
    Task,
    ZeroShotClassifier,
    load_examples,
    sample_k_shot,
)
from dect_maas.decoders.auto import Candidate

VARIANTS = (
    "hard_pick",
    "gated_blend",
    "always_blend",
    "model_prior_half",
    "model_prior_full",
    "tied_top3",
    "tied_top5",
)


def _softmax(z: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)  # type: ignore[no-any-return]


def run_set(name: str, source: cm.FeatureSource, data_dir: Path) -> dict[str, Any]:
    spec = cm.TASKS[name]
    task = Task(spec["template"], spec["label_words"], name=name)
    train = load_examples(data_dir / f"{name}_train.jsonl")
    counts = {c: sum(1 for v in train.labels if v == c) for c in task.classes}
    usable = [k for k in cm.SHOTS if min(counts.values()) >= k]
    needed = sorted(
        {int(i) for k in usable for s in cm.SEEDS for i in sample_k_shot(train.labels, k, s)}
    )
    rest = np.setdiff1d(np.arange(len(train)), needed)  # as compare_methods --eval-on dev
    rest = np.sort(np.random.RandomState(12345).permutation(rest)[:1000])
    pool = source.features(task, [train.texts[i] for i in needed])
    dev = source.features(task, [train.texts[int(i)] for i in rest])
    y = np.array([train.labels[int(i)] for i in rest])
    row_of = {i: r for r, i in enumerate(needed)}
    assert dev.scores is not None
    assert dev.content_free is not None
    cf = dev.content_free.astype(np.float64)
    log_prior = cf - np.log(np.exp(cf).sum())  # the model's own class prior (log)
    plain = _softmax(dev.scores.astype(np.float64))
    cells: dict[str, Any] = {}
    for k in usable:
        acc: dict[str, list[float]] = {}
        bal: dict[str, list[float]] = {}
        for seed in cm.SEEDS:
            idx = sample_k_shot(train.labels, k, seed)
            feats = pool[[row_of[int(i)] for i in idx]]
            yy = [train.labels[int(i)] for i in idx]
            probs: dict[str, npt.NDArray[Any]] = {
                "zero_shot": plain,
                "zero_shot_calibrated": ZeroShotClassifier("auto").fit(feats).predict_proba(dev),
                "prototype": PrototypeClassifier(random_state=seed)
                .fit(feats, yy)
                .predict_proba(dev),
                "linear_probe": LinearProbeClassifier().fit(feats, yy).predict_proba(dev),
            }
            hard = AutoDecTClassifier(random_state=seed, prompt_blend=0.0).fit(feats, yy)
            d = hard.decision_function(dev).astype(np.float64)
            probs["hard_pick"] = _softmax(d)
            probs["gated_blend"] = (
                AutoDecTClassifier(random_state=seed).fit(feats, yy).predict_proba(dev)
            )
            probs["always_blend"] = 0.5 * probs["hard_pick"] + 0.5 * plain
            keeps_prior = (
                hard.best_params_["method"] == "zero_shot" and not hard.best_params_["calibrate"]
            )
            for v, w in (("model_prior_half", 0.5), ("model_prior_full", 1.0)):
                probs[v] = _softmax(d + (0.0 if keeps_prior else w * log_prior))
            cv = hard.cv_results_
            accs = np.array(cv["mean_accuracy"])
            order = np.argsort(cv["rank"]) if len(accs) else np.array([], dtype=int)
            tied = [
                int(i) for i in order if accs.max() - accs[i] <= cv["se_of_gap_to_best"][i] + 1e-12
            ]
            for v, m in (("tied_top3", 3), ("tied_top5", 5)):
                members = []
                for i in tied[:m]:
                    params = {p: q for p, q in cv["params"][i].items() if p != "name"}
                    est = Candidate(**params).estimator(128, seed, "cpu").fit(feats, yy)
                    members.append(est.predict_proba(dev))
                probs[v] = np.mean(members, 0) if members else probs["hard_pick"]
            classes = np.array(task.classes)
            for v, p in probs.items():
                pred = classes[np.asarray(p).argmax(1)]
                acc.setdefault(v, []).append(100.0 * float((pred == y).mean()))
                bal.setdefault(v, []).append(100.0 * cm.balanced_accuracy(list(y), pred))
        mean = {v: float(np.mean(a)) for v, a in acc.items()}
        best = max(cm.BASELINES, key=lambda m: mean[m])
        cells[str(k)] = {
            "accuracy": mean,
            "balanced_accuracy": {v: float(np.mean(a)) for v, a in bal.items()},
            "best_baseline": best,
            "margin": {v: round(mean[v] - mean[best], 2) for v in VARIANTS},
        }
        print(
            f"[{name}] {k}-shot margins: "
            + ", ".join(f"{v} {cells[str(k)]['margin'][v]:+.1f}" for v in VARIANTS),
            file=sys.stderr,
        )
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=list(cm.TASKS), choices=list(cm.TASKS))
    ap.add_argument("--data-dir", type=Path, default=cm.DATA)
    ap.add_argument(
        "--cache-dir", type=Path, default=Path.home() / ".cache" / "dect-maas" / "compare"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    source = cm.FeatureSource(args.cache_dir, None)
    res = {name: run_set(name, source, args.data_dir) for name in args.sets}
    cells = [c for r in res.values() for c in r.values()]
    lines = [
        "| variant | cells ≥ best − 1 | mean margin | mean balanced accuracy |",
        "|---|---|---|---|",
    ]
    for v in VARIANTS:
        m = [c["margin"][v] for c in cells]
        b = np.mean([c["balanced_accuracy"][v] for c in cells])
        lines.append(
            f"| {v} | {sum(x >= -1 for x in m)} of {len(m)} | {np.mean(m):+.2f} | {b:.1f} |"
        )
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

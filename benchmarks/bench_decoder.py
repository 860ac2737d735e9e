"""Decoder speed: median DecTClassifier.fit time and predict throughput, printed as JSON.

Synthetic float32 features with D = 1024 (RoBERTa-large's hidden size), the paper's defaults
(d = 128, 30 full-batch Adam steps, calibration on). Targets (issue 2, on the 2-core dev machine):
fit 16 shots x 2 classes <= 40 ms, 16 x 14 <= 80 ms, 256 x 14 <= 600 ms; predict >= 200,000 rows/s
on 100,000 x 1024. A straightforward torch loop measured 47 / 98 / 840 ms there.

    python benchmarks/bench_decoder.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from dect_maas import DecTClassifier, FeatureMeta, Features

DIM = 1024
FIT_CASES = [(16, 2), (16, 14), (256, 14)]
FIT_TARGETS_MS = {"16x2": 40.0, "16x14": 80.0, "256x14": 600.0}
NAIVE_MS = {"16x2": 47.0, "16x14": 98.0, "256x14": 840.0}
PREDICT_ROWS = 100_000
PREDICT_TARGET = 200_000.0


def make_features(n: int, n_classes: int, seed: int) -> tuple[Features, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(n_classes), n // n_classes + 1)[:n]
    means = rng.normal(size=(n_classes, DIM)).astype(np.float32)
    hidden = means[y] + rng.normal(size=(n, DIM)).astype(np.float32)
    scores = rng.normal(size=(n, n_classes)).astype(np.float32)
    cf = rng.uniform(1.0, 2.0, size=n_classes).astype(np.float32)
    meta = FeatureMeta(classes=tuple(f"c{i}" for i in range(n_classes)), score_kind="logits")
    return Features(scores, hidden, content_free=cf, meta=meta), y


def time_fit(shots: int, n_classes: int, repeats: int) -> dict[str, float]:
    features, y = make_features(shots * n_classes, n_classes, seed=shots * 100 + n_classes)
    DecTClassifier(random_state=0).fit(features, y)  # warm-up
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        DecTClassifier(random_state=i).fit(features, y)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def time_predict(repeats: int) -> dict[str, float]:
    train, y = make_features(16 * 14, 14, seed=1)
    model = DecTClassifier(random_state=0).fit(train, y)
    test, _ = make_features(PREDICT_ROWS, 14, seed=2)
    model.predict(test[:1000])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(test)
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {
        "median_s": med,
        "rows_per_s": PREDICT_ROWS / med,
        "best_rows_per_s": PREDICT_ROWS / min(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fit = {}
    for shots, n_classes in FIT_CASES:
        key = f"{shots}x{n_classes}"
        fit[key] = time_fit(shots, n_classes, args.repeats)
        fit[key]["target_ms"] = FIT_TARGETS_MS[key]
        fit[key]["naive_loop_ms"] = NAIVE_MS[key]
        fit[key]["meets_target"] = fit[key]["median_ms"] <= FIT_TARGETS_MS[key]
    predict = time_predict(max(3, args.repeats // 2))
    predict["target_rows_per_s"] = PREDICT_TARGET
    predict["meets_target"] = predict["rows_per_s"] >= PREDICT_TARGET
    out = {
        "benchmark": "decoder",
        "hidden_dim": DIM,
        "fit": fit,
        "predict_100k": predict,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

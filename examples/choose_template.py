"""Choose the demo's template and label words on training data only (never a test file).

    python examples/choose_template.py [--n 100] [--cache-dir DIR]

Starts the local server with its default model, scores each candidate prompt on the first N examples
of the bundled training pool, and ranks the candidates by calibrated zero-shot accuracy (the
prompt's own quality, before any decoder is trained). Every query is cached, so re-running is free.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dect_maas import CacheConfig, Client, Task, ZeroShotClassifier, accuracy, load_examples
from dect_maas.adapters import LocalAdapter
from dect_maas.experiments.demo import local_server, prepare_model

HERE = Path(__file__).resolve().parent
CANDIDATES = [
    ("{text} In summary, it was {mask}", {"negative": ["terrible"], "positive": ["great"]}),
    ("{text} In summary, it was {mask}", {"negative": ["bad"], "positive": ["good"]}),
    ("{text} Overall, the movie was {mask}", {"negative": ["terrible"], "positive": ["great"]}),
    ("Review: {text}\nSentiment: {mask}", {"negative": ["negative"], "positive": ["positive"]}),
    (
        "{text} In summary, it was {mask}",
        {"negative": ["terrible", "bad"], "positive": ["great", "good"]},
    ),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="training examples to score")
    ap.add_argument(
        "--cache-dir", type=Path, default=Path("~/.cache/dect-maas/demo/cache").expanduser()
    )
    args = ap.parse_args()
    train = load_examples(HERE / "data" / "movies_train.jsonl")[: args.n]
    prepare_model(None, quiet=True)
    rows = []
    with local_server() as url:
        client = Client(
            LocalAdapter(base_url=url, max_inputs_per_request=16),
            cache=CacheConfig(args.cache_dir),
            timeout=600,
        )
        try:
            for template, words in CANDIDATES:
                task = Task(template, words)
                feats = client.features(task, list(train.texts))
                for cal in ("none", "auto"):
                    pred = ZeroShotClassifier(calibration=cal).fit(feats).predict(feats)
                    rows.append(
                        {
                            "template": template,
                            "label_words": words,
                            "calibration": cal,
                            "train_accuracy": round(accuracy(list(train.labels), pred), 4),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            client.close()
    best = max((r for r in rows if r["calibration"] == "auto"), key=lambda r: r["train_accuracy"])
    print("best (calibrated, on training data):", json.dumps(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Re-create the bundled movie-sentiment sample in examples/data/ (reproducibly).

    python examples/make_sample.py [SOURCE_DIR]

SOURCE_DIR holds movies_binary_{train,test}.jsonl (default: examples/data/movies_full, written by
examples/fetch_movies.py).
The sample is drawn with a fixed seed: 400 training examples (the pool few-shot sets are drawn from)
and 400 test examples, each split sampled only from its own file.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20231
SIZES = {"train": 400, "test": 400}
CSV_ROWS = 40


def main(argv: list[str]) -> int:
    source = Path(argv[1]) if len(argv) > 1 else HERE / "data" / "movies_full"
    out_dir = HERE / "data"
    out_dir.mkdir(exist_ok=True)
    for split, n in SIZES.items():
        lines = (source / f"movies_binary_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        picked = random.Random(f"{SEED}-{split}").sample(rows, n)
        out = out_dir / f"movies_{split}.jsonl"
        with out.open("w", encoding="utf-8") as fh:
            for row in picked:
                keep = {k: row[k] for k in ("id", "text", "label")}
                fh.write(json.dumps(keep, ensure_ascii=False) + "\n")
        counts: dict[str, int] = {}
        for row in picked:
            counts[row["label"]] = counts.get(row["label"], 0) + 1
        print(f"{out.relative_to(HERE.parent)}: {n} examples {counts}")
        write_csv(picked[:CSV_ROWS], out_dir / f"custom_reviews_{split}.csv")
    return 0


def write_csv(rows: list[dict[str, str]], path: Path) -> None:
    """The custom-CSV example's data: other column names and class names than the JSONL."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["review_id", "review", "verdict"])
        for row in rows:
            w.writerow([row["id"], row["text"], "good" if row["label"] == "positive" else "bad"])
    print(f"{path.relative_to(HERE.parent)}: {len(rows)} rows")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

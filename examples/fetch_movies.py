"""Fetch the full movie-review evaluation files for examples/movies_full.toml (public data, cached).

    python examples/fetch_movies.py [--sdist PATH] [--cache-dir DIR]

The sentences and ratings are public: Hutto & Gilbert's movie-review snippets with mean human
ratings, shipped inside the MIT-licensed ``vaderSentiment`` 3.3.2 source package on PyPI. This
script downloads that package once (pinned URL and sha256) into ``~/.cache/dect-maas/data`` (or
``--cache-dir``; ``--sdist`` uses a copy you already have, for machines with no network), keeps the
snippets rated at least 0.5 away from neutral, and writes the project's fixed split, listed by
snippet id in ``examples/data/movies_full_split.json``, to ``examples/data/movies_full/``:
``movies_binary_train.jsonl`` (8,070) and ``movies_binary_test.jsonl`` (2,000). Running it again
only rewrites the two files from the cached package. The bundled 400/400 sample in
``examples/data/`` was drawn from these files (``examples/make_sample.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
SPLIT = HERE / "data" / "movies_full_split.json"
OUT_DIR = HERE / "data" / "movies_full"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/77/8c/"
    "4a48c10a50f750ae565e341e697d74a38075a3e43ff0df6f1ab72e186902/" + SDIST_NAME
)
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MIN_ABS_RATING = 0.5  # snippets rated closer to neutral than this have no binary label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help=f"a local copy of {SDIST_NAME}")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/dect-maas/data"))
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    try:
        sdist = args.sdist or cached_sdist(args.cache_dir.expanduser())
        data = sdist.read_bytes()
        if hashlib.sha256(data).hexdigest() != SDIST_SHA256:
            raise ValueError(f"{sdist} is not {SDIST_NAME} (sha256 differs); delete it and rerun")
        write_split(rated_snippets(data), args.out_dir)
    except (OSError, ValueError, httpx.HTTPError) as exc:
        print(f"fetch_movies: {exc}", file=sys.stderr)
        return 1
    return 0


def cached_sdist(cache_dir: Path) -> Path:
    """The package from the cache, downloaded first if absent (the only network access)."""
    path = cache_dir / SDIST_NAME
    if not path.exists():
        print(f"downloading {SDIST_URL}", file=sys.stderr)
        response = httpx.get(SDIST_URL, follow_redirects=True, timeout=60)
        response.raise_for_status()
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(response.content)
        partial.replace(path)  # a half-written download never looks cached
    return path


def rated_snippets(sdist: bytes) -> dict[int, tuple[str, float]]:
    """Snippet id -> (text, mean rating) from the ratings file nested in the package."""
    with tarfile.open(fileobj=io.BytesIO(sdist)) as outer:
        inner_file = outer.extractfile(INNER_TAR)
        if inner_file is None:
            raise ValueError(f"{INNER_TAR} missing from {SDIST_NAME}")
        with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
            snippets_file = inner.extractfile(SNIPPETS)
            if snippets_file is None:
                raise ValueError(f"{SNIPPETS} missing from {SDIST_NAME}")
            lines = snippets_file.read().decode("utf-8").splitlines()
    rows: dict[int, tuple[str, float]] = {}
    for line in lines:
        if line.strip():
            snippet_id, rating, text = line.split("\t", 2)
            rows[int(snippet_id)] = (text, float(rating))
    return rows


def write_split(rows: dict[int, tuple[str, float]], out_dir: Path) -> None:
    """Write train and test in the split file's order (it fixes which examples k-shot draws see)."""
    split: dict[str, list[int]] = json.loads(SPLIT.read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, ids in split.items():
        path = out_dir / f"movies_binary_{name}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for snippet_id in ids:
                text, rating = rows[snippet_id]
                if abs(rating) < MIN_ABS_RATING:
                    raise ValueError(
                        f"snippet {snippet_id} is rated {rating}: not a binary example"
                    )
                label = "positive" if rating > 0 else "negative"
                row = {
                    "id": f"movieReviewSnippets-{snippet_id}",
                    "text": text,
                    "score": round(rating, 4),
                    "label": label,
                }
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path}: {len(ids)} examples", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())

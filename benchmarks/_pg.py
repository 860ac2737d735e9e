"""A PostgreSQL server for the storage benchmarks: $DECT_MAAS_BENCH_POSTGRES_URL, or one started by
the ``pgserver`` wheel (dev extras) in a temporary folder on this machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

from dect_maas_server.testing import run_server

__all__ = ["fresh_schema", "postgres", "run_server", "write_config"]

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    given = os.environ.get("DECT_MAAS_BENCH_POSTGRES_URL")
    if given:
        yield given
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver  # type: ignore[import-untyped]

        folder = tempfile.mkdtemp(prefix="dect-maas-bench-pg-")
        server = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def fresh_schema(url: str) -> str:
    """The server's URL with a new, empty schema (a new ledger and cache)."""
    return f"{url}{'&' if '?' in url else '?'}schema=b_{uuid.uuid4().hex[:12]}"


def write_config(
    path: Path, url: str, store: str, *, limit: int | None, test: Path, n_test: int
) -> Path:
    """A zero-shot run of ``n_test`` examples from ``test`` with ledger and cache at ``store``
    (a folder or a postgresql:// URL)."""
    budget = f"[budget]\nmax_queries = {limit}\n" if limit is not None else ""
    path.write_text(
        f"""
name = "bench"
shots = [1]
seeds = [0]
methods = ["zero_shot"]
cache_dir = "{store if "://" in store else Path(store) / "cache"}"
ledger_dir = "{store if "://" in store else Path(store) / "ledger"}"
output_dir = "runs"
{budget}
[provider]
kind = "local"
base_url = "{url}"
max_concurrency = 4

[task]
template = "{{text}} In summary, it was {{mask}}"
label_words = {{ negative = "terrible", positive = "great" }}

[data.train]
path = "{DATA / "movies_train.jsonl"}"

[data.test]
path = "{test}"
limit = {n_test}
""",
        encoding="utf-8",
    )
    return path

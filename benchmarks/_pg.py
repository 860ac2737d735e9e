"""A PostgreSQL server for the storage benchmarks: $DECT_MAAS_BENCH_POSTGRES_URL, or one started by
the ``pgserver`` wheel (dev extras) in a temporary folder on this machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

from dect_maas_server.testing import run_server

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from movie_config import DATA, local_provider, write_movie_config  # noqa: E402

__all__ = ["DATA", "REPO", "fresh_schema", "postgres", "run_server", "write_config"]


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
    where = store if "://" in store else None
    return write_movie_config(
        path,
        local_provider(url, max_concurrency=4),
        name="bench",
        n_test=n_test,
        test=test,
        cache_dir=where or Path(store) / "cache",
        ledger_dir=where or Path(store) / "ledger",
        max_queries=limit,
    )

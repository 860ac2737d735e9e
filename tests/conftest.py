"""Test settings shared by the library's tests."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator

import pytest
from hypothesis import settings

# CI runs each property test on the same examples every time: a failure there is reproducible and
# never a matter of luck. Locally the examples vary from run to run and find new cases.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


# -- a real PostgreSQL server for the storage tests ----------------------------------------------


POSTGRES_URL_ENV = "DECT_MAAS_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the session: $DECT_MAAS_TEST_POSTGRES_URL when set (an existing
    server; each test uses its own schema there), else one started by the ``pgserver`` wheel in
    a temporary folder (about 3 s). Skips, saying why, only when neither is available."""
    given = os.environ.get(POSTGRES_URL_ENV)
    if given:
        yield given
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR not set
            import pgserver  # type: ignore[import-untyped]
    except ImportError:
        pytest.skip(f"no PostgreSQL: install the dev extras (pgserver) or set {POSTGRES_URL_ENV}")
    # A folder of its own, not under pytest's basetemp: pgserver opens the permissions of every
    # folder above it (when run as root), and pytest prunes old basetemps of concurrent runs.
    folder = tempfile.mkdtemp(prefix="dect-maas-test-pg-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(folder, cleanup_mode="stop")
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_schema_url(postgres_url: str) -> str:
    """The session's server with a schema of this test's own (tests never see each other)."""
    sep = "&" if "?" in postgres_url else "?"
    return f"{postgres_url}{sep}schema=t_{uuid.uuid4().hex[:12]}"

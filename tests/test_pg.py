"""What only the PostgreSQL backend has: URLs without passwords, a server that is down, read-only
or full, and the command line on a database URL. Against a real server (conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import psycopg
import pytest

from dect_maas import BudgetLimits, CacheError, ConfigError, Ledger, LedgerError, Usage
from dect_maas.cli import main
from dect_maas.client.cache import CacheConfig, ResponseCache, cache_key
from dect_maas.client.ledger import LedgerRecord
from dect_maas.client.storage import connect_kwargs, parse_database_url
from dect_maas.experiments.config_file import ExperimentConfig


def _sql(url: str, *statements: str) -> None:
    parsed = parse_database_url(url)
    with psycopg.connect(parsed.conninfo, **connect_kwargs(parsed, {}), autocommit=True) as c:
        for statement in statements:
            c.execute(statement)  # type: ignore[arg-type]


def _record() -> LedgerRecord:
    return LedgerRecord(provider="p", model="m", endpoint="e")


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://dm:hunter2@db.example/team",
        "postgresql://dm@db.example/team?password=hunter2",
        "postgres://db.example/team?sslmode=require&PASSWORD=hunter2",
    ],
)
def test_a_password_in_the_url_is_refused_and_never_shown(url: str) -> None:
    for attempt in (
        lambda: Ledger(url),
        lambda: CacheConfig(url),
        lambda: ExperimentConfig.from_dict(_config(ledger_dir=url)),
    ):
        with pytest.raises((ConfigError, ValueError)) as info:
            attempt()
        assert "hunter2" not in str(info.value)
        assert "password" in str(info.value)
        assert any(w in str(info.value) for w in ("ledger_dir", "URL", "CacheConfig"))


def _config(**extra: str) -> dict[str, object]:
    return {
        "provider": {"base_url": "http://127.0.0.1:1"},
        "task": {"template": "{text} It was {mask}", "label_words": {"a": "x", "b": "y"}},
        "data": {"train": {"path": "t.jsonl"}, "test": {"path": "u.jsonl"}},
        **extra,
    }


def test_our_parameters_are_split_off_and_the_url_is_shown_without_secrets() -> None:
    url = "postgresql://dm@db.example:5433/team?sslmode=require&password_env=DM_PW&schema=lab_a"
    parsed = parse_database_url(url)
    assert parsed.schema == "lab_a"
    assert parsed.password_env == "DM_PW"
    assert parsed.conninfo == "postgresql://dm@db.example:5433/team?sslmode=require"
    assert parsed.display == url
    assert connect_kwargs(parsed, {"DM_PW": "s3cret"})["password"] == "s3cret"
    with pytest.raises(ConfigError, match=r"DM_PW .* is not set"):
        connect_kwargs(parsed, {})
    with pytest.raises(ConfigError, match="schema must be"):
        parse_database_url("postgresql://h/db?schema=Robert');DROP")
    resolved = ExperimentConfig.from_dict(_config(ledger_dir=url, cache_dir=url))
    assert resolved.ledger_dir == url  # a URL is not a relative path
    assert resolved.cache_dir == url


def test_the_password_comes_from_the_named_variable(
    pg_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    role = "pw_" + os.urandom(4).hex()
    _sql(pg_schema_url, f"CREATE ROLE {role} LOGIN PASSWORD 'p4ss' SUPERUSER")
    url = pg_schema_url.replace("postgres:@", f"{role}@", 1) + "&password_env=DM_TEST_PW"
    monkeypatch.setenv("DM_TEST_PW", "p4ss")
    with Ledger(url) as ledger:
        ledger.record_hits(1, provider="p", model="m", endpoint="e")
        assert "p4ss" not in repr(ledger) + ledger.location
    # (the test server trusts local connections, so a wrong password is not tested here)


# -- faults ------------------------------------------------------------------------------------


def test_an_unreachable_server_is_one_line_naming_it() -> None:
    url = "postgresql://dm@127.0.0.1:1/team?connect_timeout=2"
    with pytest.raises(LedgerError) as info:
        Ledger(url)
    text = str(info.value)
    # the one redaction (_secrets.mask_url) masks user info and every query value in a message
    assert text.startswith("cannot reach the ledger database postgresql://***@127.0.0.1:1/team")
    assert "\n" not in text
    with pytest.raises(CacheError, match="cannot reach the response cache database"):
        ResponseCache(CacheConfig(url))


def test_a_read_only_database_refuses_writes_and_nothing_is_sent(pg_schema_url: str) -> None:
    with Ledger(pg_schema_url) as ledger:
        ledger.record_hits(2, provider="p", model="m", endpoint="e")
    ResponseCache(CacheConfig(pg_schema_url)).close()
    schema = parse_database_url(pg_schema_url).schema
    role = "ro_" + os.urandom(4).hex()
    _sql(
        pg_schema_url,
        f"CREATE ROLE {role} LOGIN",
        f"ALTER ROLE {role} SET default_transaction_read_only = on",
        f"GRANT USAGE ON SCHEMA {schema} TO {role}",
        f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}",
    )
    url = pg_schema_url.replace("postgres:@", f"{role}@", 1)
    with Ledger(url, BudgetLimits(max_queries=10)) as ledger:  # reading works
        assert ledger.summary().cache_hits == 2
        with pytest.raises(LedgerError, match=r"read-only .*nothing sent"):
            ledger.reserve(Usage(1, 1))
        assert ledger.reserved() == Usage()
    with (
        ResponseCache(CacheConfig(url)) as cache,
        pytest.raises(CacheError, match=r"response cache database .* read-only"),
    ):
        cache.set(cache_key({"i": 1}), {"s": [1.0]})


def test_a_full_database_names_the_store_and_keeps_what_it_holds(pg_schema_url: str) -> None:
    # The server's own disk_full error (SQLSTATE 53100), raised by the server inside the insert:
    # filling a real disk under PostgreSQL needs a mount this test cannot make.
    with Ledger(pg_schema_url) as ledger:
        ledger.settle(ledger.reserve(Usage(1, 1)), Usage(1, 1), _record())
    ResponseCache(CacheConfig(pg_schema_url)).close()
    _sql(
        pg_schema_url,
        "CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'could not extend file: No space left on device' "
        "USING ERRCODE = 'disk_full'; END $$",
        "CREATE TRIGGER full_disk BEFORE INSERT ON reservations "
        "FOR EACH ROW EXECUTE FUNCTION full_disk()",
        "CREATE TRIGGER full_disk BEFORE INSERT ON cache_entries "
        "FOR EACH ROW EXECUTE FUNCTION full_disk()",
    )
    with Ledger(pg_schema_url) as ledger:
        with pytest.raises(LedgerError, match=r"ledger database .* disk is full.*nothing sent"):
            ledger.reserve(Usage(1, 1))
        assert ledger.spent() == Usage(1, 1)  # what was stored stays
        assert len(ledger.records()) == 1
    with (
        ResponseCache(CacheConfig(pg_schema_url)) as cache,
        pytest.raises(CacheError, match=r"response cache database .* disk is full"),
    ):
        cache.set(cache_key({"i": 1}), {"s": [1.0]})


def test_a_server_that_stops_mid_run_is_one_line() -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver  # type: ignore[import-untyped]
    except ImportError:
        pytest.skip("needs the pgserver wheel (dev extras) to stop a server of its own")
    folder = tempfile.mkdtemp(prefix="dect-maas-test-pg-stop-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(folder, cleanup_mode="stop")
        url = str(server.get_uri())
        ledger = Ledger(url)
        ledger.record_hits(1, provider="p", model="m", endpoint="e")
        server.cleanup()  # the server stops under the open pool
        with pytest.raises(LedgerError) as info:
            ledger.reserve(Usage(1, 1))
        assert "ledger database postgresql://" in str(info.value)
        assert "\n" not in str(info.value)
        ledger.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the command line ----------------------------------------------------------------------------


def test_ledger_commands_work_on_a_url(
    pg_schema_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Ledger(pg_schema_url, run_id="r1") as ledger:
        ledger.settle(ledger.reserve(Usage(3, 1)), Usage(3, 1), _record())
    assert main(["ledger", "summary", "--ledger-dir", pg_schema_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["queries_paid"] == 3
    assert main(["ledger", "runs", pg_schema_url]) == 0
    assert capsys.readouterr().out.split() == ["r1"]
    assert main(["ledger", "export", pg_schema_url, "--format", "jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == 3
    assert main(["ledger", "reset", pg_schema_url]) == 2


def test_storage_copy_moves_a_ledger_and_cache_into_postgresql(
    tmp_path: Path, pg_schema_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Ledger(tmp_path / "ledger", run_id="laptop") as ledger:
        ledger.settle(ledger.reserve(Usage(2, 1, 0, 0.5)), Usage(2, 1, 0, 0.5), _record())
        ledger.record_hits(4, provider="p", model="m", endpoint="e")
        ledger.reserve(Usage(1, 1))  # still open: it must stay counted
        before = ledger.summary().to_dict()
    keys = [cache_key({"i": i}) for i in range(2500)]
    with ResponseCache(CacheConfig(tmp_path / "cache")) as cache:
        cache.set_many({k: {"s": [float(i)] * 20} for i, k in enumerate(keys)})
    args = ["storage", "copy", "--ledger-dir", str(tmp_path / "ledger")]
    args += ["--cache-dir", str(tmp_path / "cache"), "--to", pg_schema_url]
    code = subprocess.run(
        [sys.executable, "-m", "dect_maas", *args], capture_output=True, text=True, timeout=300
    )
    assert code.returncode == 0, code.stderr
    assert "copied 2 records, 1 run totals and 1 open reservations" in code.stderr
    assert "copied 2500 entries (0 were there already)" in code.stderr
    with Ledger(pg_schema_url) as copied:
        assert copied.summary().to_dict() == before
        assert copied.spent() == Usage(2, 1, 0, 0.5)
        assert copied.reserved() == Usage(1, 1)
    with ResponseCache(CacheConfig(pg_schema_url)) as cache:
        assert len(cache) == 2500
        assert cache.get(keys[7]) == {"s": [7.0] * 20}
    again = main([*args[:4], "--to", pg_schema_url])  # the ledger only, a second time
    assert again == 2
    assert "not empty" in capsys.readouterr().err


# -- examples in flight --------------------------------------------------------------------------


def test_a_claimed_example_is_waited_for_not_paid_again(pg_schema_url: str) -> None:
    keys = [cache_key({"i": i}) for i in range(6)]
    first = ResponseCache(CacheConfig(pg_schema_url))
    second = ResponseCache(CacheConfig(pg_schema_url))
    try:
        assert first.claim_many(keys[:4]) == {}  # misses: claimed by first, which pays
        result: dict[str, object] = {}

        def other_machine() -> None:
            result.update(second.claim_many(keys))  # waits for keys 0-3, claims 4 and 5

        waiter = threading.Thread(target=other_machine)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # still waiting for the first's answers
        first.set_many({k: {"s": [float(i)] * 20} for i, k in enumerate(keys[:4])})
        waiter.join(30)
        assert not waiter.is_alive()
        assert sorted(result) == sorted(keys[:4])  # answers it did not pay for
    finally:
        second.close()  # releases 4 and 5
        first.close()


_CLAIMER = textwrap.dedent(
    """
    import os, sys
    from dect_maas.client.cache import CacheConfig, ResponseCache, cache_key
    cache = ResponseCache(CacheConfig(sys.argv[1]))
    cache.claim_many([cache_key({"i": 0})])
    os._exit(0)  # dies holding the claim
    """
)


def test_a_claim_of_a_dead_process_is_taken_over(pg_schema_url: str) -> None:
    subprocess.run([sys.executable, "-c", _CLAIMER, pg_schema_url], check=True, timeout=60)
    with ResponseCache(CacheConfig(pg_schema_url)) as cache:
        start = time.monotonic()
        assert cache.claim_many([cache_key({"i": 0})]) == {}  # ours now, no wait
        assert time.monotonic() - start < 5

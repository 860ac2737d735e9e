"""SIGTERM and Ctrl-C during `dect-maas run`: stop sending, settle what is in flight, one line,
a distinct exit code; a real CLI process against a real loopback server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultserver import FaultServer
from movie_config import local_provider, write_movie_config

from dect_maas import Ledger, Usage

REPO = Path(__file__).resolve().parent.parent


def config(folder: Path, url: str) -> Path:
    provider = local_provider(url, max_prompts_per_request=1, max_concurrency=2)
    return write_movie_config(folder / "exp.toml", provider, name="signals", n_test=40)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_sending_settles_in_flight_and_exits_with_one_line(
    tmp_path: Path, signum: int, code: int
) -> None:
    server = FaultServer(rate=1.0, faults=("slow",), slow_s=0.2, paths=("/v1/features",))
    with server.run() as url:
        cfg = config(tmp_path, url)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "dect_maas", "run", str(cfg), "--no-progress"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + 60
        while sum(server.computed_inputs.values()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signum)
        started = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
        answered = sum(server.computed_inputs.values())
    assert proc.returncode == code, err
    assert took < 10  # in flight: at most one slow answer per worker
    lines = [line for line in err.splitlines() if line.startswith("dect-maas:")]
    assert len(lines) == 1, err  # besides the run's one info line, nothing but this
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    assert f"stopped by {name}" in lines[0]
    for noise in ("Traceback", "Event loop is closed", "Task was destroyed"):
        assert noise not in err
    with Ledger(tmp_path / "ledger") as ledger:
        assert ledger.reserved() == Usage()  # nothing left reserved
        summary = ledger.summary()
    assert 4 <= answered < 40
    # every answered query is on the ledger, settled ok (the answers were stored)
    assert summary.queries_paid + summary.queries_unknown >= answered
    assert summary.queries_unknown == 0
    assert out == ""

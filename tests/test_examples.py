"""Every example in examples/ is loaded, and run (small) against a real server on loopback.

The OpenAI-compatible example runs against the project's local server, which also speaks
/v1/completions and /v1/embeddings. No text-embeddings-inference server is available here, so the
TEI example runs against a small loopback stand-in that answers POST /embed the way TEI does.

Reaches inside for the config reader, to load each example as the CLI does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dect_maas import Experiment, Ledger
from dect_maas.experiments.config_file import load_config

pytest.importorskip("dect_maas_server")
from dect_maas_server.testing import make_tiny_model, run_server
from faultserver import serve

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.toml"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("causal", tmp_path_factory.mktemp("tiny") / "causal")


@pytest.fixture(scope="module")
def server_url(tiny_model: Path) -> Iterator[str]:
    with run_server(tiny_model) as url:
        yield url


def small(tmp_path: Path, **more: Any) -> dict[str, Any]:
    """Overrides that keep a run to seconds and inside tmp_path."""
    return {
        "shots": [1, 2],
        "seeds": [0],
        "cache_dir": str(tmp_path / "cache"),
        "ledger_dir": str(tmp_path / "ledger"),
        "output_dir": str(tmp_path / "runs"),
        **more,
    }


def post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.train.path is not None
    assert cfg.data.train.path.is_absolute()
    if "movies_full" not in str(cfg.data.train.path):  # the bundled data ships with the repository
        assert cfg.data.train.path.exists()
        assert cfg.data.test.path is not None
        assert cfg.data.test.path.exists()
    assert cfg.provider.api_key_env is None


def test_full_run_config_points_at_the_fetched_data() -> None:
    cfg = load_config(EXAMPLES / "movies_full.toml")
    full = EXAMPLES / "data" / "movies_full"
    assert cfg.data.train.path == (full / "movies_binary_train.jsonl").resolve()
    assert cfg.data.test.path == (full / "movies_binary_test.jsonl").resolve()
    assert cfg.shots == [1, 4, 16, 64]
    assert cfg.seeds == [0, 1, 2]
    assert cfg.data.test.limit is None


def test_full_split_is_fixed_and_disjoint() -> None:
    split = json.loads((EXAMPLES / "data" / "movies_full_split.json").read_text())
    assert [len(split["train"]), len(split["test"])] == [8070, 2000]
    assert len(set(split["train"]) | set(split["test"])) == 10070  # no snippet in both splits
    lines = (EXAMPLES / "data" / "movies_test.jsonl").read_text(encoding="utf-8").splitlines()
    bundled = [json.loads(line) for line in lines]
    test_ids = {f"movieReviewSnippets-{i}" for i in split["test"]}
    assert {row["id"] for row in bundled} <= test_ids  # the demo's test sample is drawn from test


def test_fetch_movies_refuses_a_file_that_is_not_the_pinned_package(tmp_path: Path) -> None:
    fake = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    fake.write_bytes(b"not the package")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "fetch_movies.py"), "--sdist", str(fake)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"fetch_movies: {fake} is not vaderSentiment-3.3.2.tar.gz " + (
        "(sha256 differs); delete it and rerun"
    )
    assert not (tmp_path / "movies_full").exists()


def test_sentiment_local_script(tmp_path: Path, server_url: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "sentiment_local.py"),
            "--base-url",
            server_url,
            "--shots",
            "1",
            "--seeds",
            "0",
            "--test-limit",
            "8",
            "--home",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "DecT" in proc.stdout
    assert "queries paid this run: " in proc.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "report.json").read_text())["config"]["name"] == "sentiment-local"


def test_openai_compatible_example_against_the_local_server(
    tmp_path: Path, server_url: str
) -> None:
    served = json.loads(urllib.request.urlopen(f"{server_url}/v1/models", timeout=30).read())
    model = served["data"][0]["id"]
    ids = {
        w: post(f"{server_url}/v1/tokenize", {"text": w})["data"][0]["ids"]
        for w in (" negative", " positive")
    }
    overrides = small(
        tmp_path,
        provider={
            "base_url": server_url,
            "embeddings_base_url": server_url,
            "model": model,
            "embeddings_model": model,
            "tokenize_api": "none",
            "label_token_ids": ids,
            # the tiny model ranks the label words outside any top-k: ask for their exact
            # logprobs as vLLM's logprob_token_ids extension does (the local server has it)
            "exact_token_ids": True,
        },
        data={"test": {"limit": 8}},
    )
    result = Experiment.from_config(EXAMPLES / "openai_compatible.toml", overrides=overrides).run()
    n = result.plan.n_test + result.plan.n_train_union
    # two endpoints: scores (+ the content-free prompt) and vectors are separate queries, and
    # the embeddings endpoint's one-time batching check pays 4 (two texts together, then alone)
    assert result.queries_paid == 2 * n + 1 + 4
    assert {r.method for r in result.runs} == {
        "dect",
        "zero_shot",
        "calibrated_zero_shot",
        "prototype",
        "linear_probe",
    }
    assert result.output_dir is not None
    report = json.loads((result.output_dir / "report.json").read_text())
    assert report["config"]["provider"]["kind"] == "openai"


class _TEIStandIn(BaseHTTPRequestHandler):
    """POST /embed -> [[float]]: hashed bag-of-words vectors, L2-normalised (TEI's default)."""

    dim = 64

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/embed":
            self.send_error(404)
            return
        out = json.dumps([self.embed(t) for t in body["inputs"]]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def embed(self, text: str) -> list[float]:
        v = [0.0] * self.dim
        for word in re.findall(r"[a-z']+", text.lower()):
            h = int(hashlib.sha256(word.encode()).hexdigest(), 16)
            v[h % self.dim] += 1.0 if (h >> 8) % 2 else -1.0
        norm = math.sqrt(sum(x * x for x in v)) or 1.0
        return [x / norm for x in v]

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tei_url() -> Iterator[str]:
    with serve(ThreadingHTTPServer(("127.0.0.1", 0), _TEIStandIn)) as url:
        yield url


def test_embeddings_only_example_against_a_tei_stand_in(tmp_path: Path, tei_url: str) -> None:
    overrides = small(tmp_path, provider={"base_url": tei_url}, data={"test": {"limit": 20}})
    result = Experiment.from_config(EXAMPLES / "embeddings_tei.toml", overrides=overrides).run()
    # vectors only: no content-free prompt
    # + 4: the endpoint's one-time batching check (two texts together, then each alone)
    assert result.queries_paid == result.plan.n_test + result.plan.n_train_union + 4
    assert {r.method for r in result.runs} == {"prototype", "linear_probe"}
    again = Experiment.from_config(EXAMPLES / "embeddings_tei.toml", overrides=overrides).run()
    assert again.queries_paid == 0


def test_custom_csv_example(tmp_path: Path, server_url: str) -> None:
    overrides = small(tmp_path, provider={"base_url": server_url})
    result = Experiment.from_config(EXAMPLES / "custom_csv.toml", overrides=overrides).run()
    assert result.classes == ("bad", "good")
    assert result.plan.n_test == 40
    assert {r.shots for r in result.runs} == {1, 2}
    assert result.output_dir is not None
    saved = [r.model_file for r in result.runs if r.model_file]
    assert saved
    assert all((result.output_dir / f).exists() for f in saved)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # two server starts and runs: about a minute on 2 busy cores
def test_demo_runs_and_its_second_run_pays_zero(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dect_maas.cli import main

    port = str(_free_port())
    argv = [
        "demo",
        "--model",
        str(tiny_model),
        "--output",
        str(tmp_path),
        "--port",
        port,
        "--shots",
        "1",
        "2",
        "--seeds",
        "0",
        "--test-limit",
        "12",
    ]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "| " not in first.out  # plain table on the terminal
    assert "DecT" in first.out
    assert "DecT, auto (CV)" in first.out  # the auto-tuned DecT runs beside the paper's
    assert "queries paid this run: 0" not in first.out
    assert main(argv) == 0
    second = capsys.readouterr()
    assert "queries paid this run: 0;" in second.out
    assert "this run paid zero queries" in second.out
    ledger = Ledger(tmp_path / "ledger")
    try:
        runs = ledger.runs()
        assert len(runs) == 2
        assert sorted(ledger.summary(r).queries_paid for r in runs)[0] == 0
    finally:
        ledger.close()
    assert len(list((tmp_path / "runs").iterdir())) == 2

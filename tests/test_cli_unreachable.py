"""When nothing answers, ``run`` and ``predict`` say so in one line: the URL that failed, and the
server to start (``dect-maas serve --port N`` for the local provider) or the setting to check.
A URL nobody ever answered at fails within seconds (no restart ride-out)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from movie_config import write_movie_config

from dect_maas.cli import EXIT_OK, EXIT_PROVIDER, main

dect_maas_server = pytest.importorskip("dect_maas_server")
from dect_maas_server.testing import make_tiny_model, run_server  # noqa: E402


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


def config(folder: Path, provider: str) -> Path:
    return write_movie_config(folder / "exp.toml", provider, name="unreachable", methods=["dect"])


def last_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("dect-maas: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_run_names_the_local_server_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = closed_port()
    cfg = config(tmp_path, f'kind = "local"\nbase_url = "http://127.0.0.1:{port}"')
    t0 = time.monotonic()
    assert main(["run", str(cfg), "--no-progress"]) == EXIT_PROVIDER
    assert time.monotonic() - t0 < 30  # max_attempts, not the 60 s restart ride-out
    line = last_error(capsys.readouterr().err)
    assert line == (
        f"dect-maas: error: nothing answers at http://127.0.0.1:{port}/v1/models (ConnectError): "
        f"start the local server with `dect-maas serve --port {port}` "
        "(or correct provider.base_url)"
    )


def test_run_names_the_url_that_failed_for_other_providers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port, vectors_port = closed_port(), closed_port()
    cfg = config(
        tmp_path,
        f'kind = "openai_chat"\nbase_url = "http://127.0.0.1:{port}/v1"\nmodel = "m"\n'
        f'embeddings_base_url = "http://127.0.0.1:{vectors_port}/v1"',
    )
    assert main(["run", str(cfg), "--no-progress"]) == EXIT_PROVIDER
    line = last_error(capsys.readouterr().err)
    # whichever role's request failed first: its URL and its own setting
    if f":{vectors_port}/" in line:
        url, setting = f"http://127.0.0.1:{vectors_port}/v1/embeddings", "embeddings_base_url"
    else:
        url, setting = f"http://127.0.0.1:{port}/v1/chat/completions", "base_url"
    assert line == (
        f"dect-maas: error: nothing answers at {url} (ConnectError): "
        f"start the server there, or correct provider.{setting}"
    )


def test_predict_after_the_server_stopped_says_which_server_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tiny_model("causal", tmp_path / "tiny")
    with run_server(model) as url:
        cfg = config(tmp_path / "exp", f'kind = "local"\nbase_url = "{url}"')
        assert main(["run", str(cfg), "--no-progress", "--json"]) == EXIT_OK
        report = json.loads(capsys.readouterr().out)
    saved = [r for r in report["runs"] if r.get("model_file")]
    run_dir = next((tmp_path / "exp" / "runs").iterdir())
    inputs = tmp_path / "new.jsonl"
    inputs.write_text(json.dumps({"text": "A text no one has asked about yet."}) + "\n")
    code = main(["predict", str(run_dir / saved[0]["model_file"]), "--input", str(inputs)])
    assert code == EXIT_PROVIDER
    port = url.rsplit(":", 1)[1].strip("/")
    line = last_error(capsys.readouterr().err)
    assert line.startswith(f"dect-maas: error: nothing answers at {url}/v1/")
    assert line.endswith(f"start the local server with `dect-maas serve --port {port}` "
                         "(or correct provider.base_url)")  # fmt: skip

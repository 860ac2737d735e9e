"""``dect-maas demo``: the whole product on one machine, in a few minutes.

The local server is reached like any provider, over HTTP: it runs as a child process
(``python -m dect_maas_server``), never imported. The demo prefers one fixed loopback port, because
the cache key covers the endpoint URL: on the same port a second run is answered from the cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dect_maas._exceptions import ConfigError, DectError

logger = logging.getLogger("dect_maas.demo")

__all__ = ["DEMO_PORT", "demo_config", "find_examples_dir", "local_server", "run_demo"]

DEMO_PORT = 47623
DEMO_TEMPLATE = "Review: {text}\nSentiment: {mask}"
# Chosen on the training pool only (examples/choose_template.py: calibrated zero-shot accuracy on
# its first 100 examples, 0.83 against 0.68 for "{text} In summary, it was {mask}" with
# terrible/great); never on test data.
DEMO_LABEL_WORDS = {"negative": ["negative"], "positive": ["positive"]}
SERVER_INSTALL_HINT = (
    "the local server package is not installed: run `pip install -e ./providers` in a dect-maas "
    "checkout (or `make setup`)"
)
_LISTEN = re.compile(r"listening on (https?://[0-9.]+:\d+)")


class ServerStartError(DectError):
    """The local server could not be prepared or started."""


def find_examples_dir() -> Path:
    """The repository's ``examples/`` folder (the demo data ships there, next to the package)."""
    env = os.environ.get("DECT_MAAS_EXAMPLES_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "examples")
    for c in candidates:
        if (c / "data" / "movies_train.jsonl").exists():
            return c
    raise ConfigError(
        "the demo's data sample (examples/data/movies_*.jsonl) was not found; run the demo from a "
        "dect-maas checkout installed with `pip install -e .`, or set DECT_MAAS_EXAMPLES_DIR"
    )


def demo_home(output: Path | None) -> Path:
    if output is not None:
        return output.expanduser().resolve()
    env = os.environ.get("DECT_MAAS_DEMO_DIR")
    return Path(env).expanduser().resolve() if env else Path("~/.cache/dect-maas/demo").expanduser()


def demo_config(
    base_url: str,
    home: Path,
    *,
    shots: Sequence[int] = (1, 4, 16),
    seeds: Sequence[int] = (0, 1, 2),
    test_limit: int | None = None,
) -> Any:
    from .config_file import METHOD_NAMES, ExperimentConfig

    data = find_examples_dir() / "data"
    test: dict[str, Any] = {"path": str(data / "movies_test.jsonl")}
    if test_limit is not None:
        test["limit"] = test_limit
    return ExperimentConfig.from_dict(
        {
            "name": "movies-demo",
            # Small requests and a long timeout: on 2 busy cores a request of 64 long prompts
            # can wait behind others for over a minute.
            "provider": {
                "kind": "local",
                "base_url": base_url,
                "max_prompts_per_request": 16,
                "max_concurrency": 4,
                "timeout_s": 600,
            },
            "task": {
                "name": "movie-sentiment",
                "template": DEMO_TEMPLATE,
                "label_words": DEMO_LABEL_WORDS,
            },
            "data": {"train": {"path": str(data / "movies_train.jsonl")}, "test": test},
            "shots": list(shots),
            "seeds": list(seeds),
            # the paper's DecT, the auto-tuned DecT (settings chosen by cross-validation on the
            # training shots) and every baseline, all on the same features
            "methods": [*METHOD_NAMES, "auto_dect"],
            "cache_dir": str(home / "cache"),
            "ledger_dir": str(home / "ledger"),
            "output_dir": str(home / "runs"),
        },
        source="demo settings",
        base_dir=home,
    )


def _port_free(port: int) -> bool:
    """Whether nothing listens on the port (a socket of a stopped server in TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def prepare_model(model: str | None, *, quiet: bool) -> None:
    """Obtain and convert the server's default model if it is missing (a no-op once cached)."""
    if model is not None:
        return
    cmd = [sys.executable, "-m", "dect_maas_server", "--prepare-only"]
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if quiet else sys.stderr,
        stderr=subprocess.PIPE if quiet else None,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
        why = f": {tail[0]}" if tail else ""
        raise ServerStartError(f"could not prepare the default model (exit {proc.returncode}){why}")


@contextlib.contextmanager
def local_server(
    model: str | None = None,
    *,
    port: int | None = None,
    startup_timeout: float = 300.0,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Start ``python -m dect_maas_server`` on loopback; yield its base URL; stop it on exit."""
    if importlib.util.find_spec("dect_maas_server") is None:
        raise ConfigError(SERVER_INSTALL_HINT)
    chosen = DEMO_PORT if port is None else port
    if chosen and not _port_free(chosen):
        logger.warning(
            "port %d is taken; using a free one (answers cached under the usual port's URL are "
            "not reused: the cache key covers the endpoint)",
            chosen,
        )
        chosen = 0
    cmd = [sys.executable, "-m", "dect_maas_server", "--host", "127.0.0.1", "--port", str(chosen)]
    if model is not None:
        cmd += ["--model", model]
    cmd += list(extra_args)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    url_box: list[str] = []
    found = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = _LISTEN.search(line)
            if m and not url_box:
                url_box.append(m.group(1))
                found.set()

    reader = threading.Thread(target=pump, name="dect-maas-demo-server", daemon=True)
    reader.start()

    def failed(why: str) -> ServerStartError:
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
        return ServerStartError(f"the local server {why}" + (f": {last}" if last else ""))

    try:
        deadline = time.monotonic() + startup_timeout
        while not found.wait(0.05):
            if proc.poll() is not None:
                reader.join(timeout=2)
                raise failed(f"exited with code {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise failed(f"did not start within {startup_timeout:.0f} s")
        url = url_box[0]
        while not _healthy(url):
            if proc.poll() is not None:
                raise failed(f"exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise failed("did not answer /health")
            time.sleep(0.05)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        reader.join(timeout=2)
        if proc.stderr is not None:
            proc.stderr.close()


def run_demo(
    *,
    output: Path | None = None,
    shots: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    model: str | None = None,
    test_limit: int | None = None,
    progress: bool = False,
    verbose: bool = False,
    port: int | None = None,
) -> int:
    """The ``dect-maas demo`` command; prints the table on stdout, progress on stderr."""
    from .report import summary_lines
    from .runner import Experiment

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    home = demo_home(output)
    find_examples_dir()  # fail early, before starting anything
    say(f"dect-maas demo: cache, ledger and reports under {home}")
    prepare_model(model, quiet=not verbose and not progress)
    with local_server(model, port=port) as url:
        say(f"local server at {url}")
        cfg = demo_config(
            url, home, shots=shots or (1, 4, 16), seeds=seeds or (0, 1, 2), test_limit=test_limit
        )
        result = Experiment(cfg).run(progress=progress, on_event=say)
    print("\n".join(summary_lines(result)))
    say(f"demo finished in {time.perf_counter() - t0:.1f} s (server start and stop included)")
    return 0

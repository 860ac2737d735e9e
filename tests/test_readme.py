"""The README's Python quickstart, run as written against a real server with a tiny causal model.

Only the server URL and the cache/ledger folders are swapped for the test's own; the data files are
the bundled sample the README names. A tiny random model scores at chance, so the test checks what
the code promises (queries paid once, scores in range, a loadable model), not accuracy.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

from dect_maas import DecTClassifier, Ledger, MultiTokenLabelWarning

server_testing = pytest.importorskip("dect_maas_server.testing")
pytestmark = pytest.mark.slow  # starts a server process

ROOT = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    marker = readme.index("<!-- quickstart:")
    block = re.search(r"```python\n(.*?)```", readme[marker:], re.S)
    assert block is not None, "the README lost its quickstart block"
    return block.group(1)


def test_readme_quickstart_runs_and_a_rerun_pays_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = quickstart()
    for needle in (
        '"http://127.0.0.1:8000"',
        '"~/.cache/dect-maas/cache"',
        '"~/.cache/dect-maas/ledger"',
    ):
        assert needle in code, f"the quickstart no longer contains {needle}"
    model_dir = server_testing.make_tiny_model("causal", tmp_path / "tiny")
    with server_testing.run_server(model_dir) as url:
        code = (
            code.replace('"http://127.0.0.1:8000"', repr(url))
            .replace('"~/.cache/dect-maas/cache"', repr(str(tmp_path / "cache")))
            .replace('"~/.cache/dect-maas/ledger"', repr(str(tmp_path / "ledger")))
            .replace('"dect-16shot.npz"', repr(str(tmp_path / "dect-16shot.npz")))
        )
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            for _ in range(2):
                with warnings.catch_warnings():
                    # the tiny model's tokenizer splits " negative" into several tokens
                    warnings.simplefilter("ignore", MultiTokenLabelWarning)
                    exec(compile(code, "README.md quickstart", "exec"), {})
        finally:
            os.chdir(cwd)
    out = capsys.readouterr().out
    for name in ("DecT", "auto DecT", "calibrated zero-shot"):
        score = float(re.search(rf"{name}: ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
        assert 0.0 <= score <= 1.0
    ledger = Ledger(tmp_path / "ledger")
    runs = ledger.runs()
    assert len(runs) == 2
    first, second = (ledger.spent(r).queries for r in runs)
    assert first == 32 + 1 + 100  # 16 shots x 2 classes, the content-free prompt, 100 test texts
    assert second == 0  # the second run is answered from the cache
    assert DecTClassifier.load(tmp_path / "dect-16shot.npz").classes_.tolist() == [
        "negative",
        "positive",
    ]

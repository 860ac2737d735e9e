"""Every Python block in docs/*.md runs as written, like the README's quickstart.

Each page runs in its own namespace, blocks in order, in a scratch folder. The test swaps only what
a reader would: ``http://127.0.0.1:8000`` for a real local server with a tiny model on loopback,
and ``~/.cache/dect-maas`` for a scratch folder. A block preceded by ``<!-- file: NAME -->`` is
written to NAME first (the config a later block reads); ``<!-- not run: why -->`` exempts a block
that cannot run here, and must say why.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from dect_maas import MultiTokenLabelWarning

server_testing = pytest.importorskip("dect_maas_server.testing")
pytestmark = pytest.mark.slow  # starts a server process

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:<!--\s*(?P<note>[^>]*?)\s*-->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """(language, note above the block, code) for every fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    return [(m["lang"], m["note"] or "", m["code"]) for m in BLOCK.finditer(text)]


def runnable(page: Path) -> bool:
    found = (lang == "python" and not note.startswith("not run") for lang, note, _ in blocks(page))
    return any(found)


PAGES = sorted(p for p in DOCS.glob("*.md") if runnable(p))


def test_every_page_is_linked_from_the_index_and_exemptions_say_why() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"
        for lang, note, _ in blocks(page):
            if lang == "python" and note.startswith("not run"):
                assert note.removeprefix("not run").strip(" :"), f"{page.name}: say why not"
    assert {"client.md", "costs.md", "experiments.md"} <= {p.name for p in PAGES}


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = server_testing.make_tiny_model("causal", tmp_path_factory.mktemp("tiny") / "causal")
    with server_testing.run_server(model) as url:
        yield url


def scratch_data(folder: Path) -> None:
    """data/train.jsonl and data/test.jsonl, as the config block on experiments.md names them."""
    (folder / "data").mkdir()
    for split, n in (("train", 100), ("test", 40)):
        lines = (ROOT / "examples" / "data" / f"movies_{split}.jsonl").read_text(encoding="utf-8")
        (folder / "data" / f"{split}.jsonl").write_text(
            "\n".join(lines.splitlines()[:n]) + "\n", encoding="utf-8"
        )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_python_blocks_run(
    page: Path, server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "cache-home"

    def localise(code: str) -> str:
        return code.replace("http://127.0.0.1:8000", server_url).replace(
            "~/.cache/dect-maas", str(home)
        )

    work = tmp_path / "work"
    work.mkdir()
    scratch_data(work)
    monkeypatch.chdir(work)
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    ran = 0
    for i, (lang, note, code) in enumerate(blocks(page)):
        if note.startswith("file:"):
            name = note.removeprefix("file:").split()[0]
            (work / name).write_text(localise(code), encoding="utf-8")
        if lang != "python" or note.startswith("not run"):
            continue
        with warnings.catch_warnings():
            # the tiny model's tokenizer splits most label words into several tokens
            warnings.simplefilter("ignore", MultiTokenLabelWarning)
            exec(compile(localise(code), f"{page.name} block {i}", "exec"), namespace)
        ran += 1
    assert ran >= 1
    if page.name == "experiments.md":
        reports = list((work / "runs").glob("*/report.json"))
        assert len(reports) == 1
        report = json.loads(reports[0].read_text(encoding="utf-8"))
        assert report["config"]["shots"] == [1, 4, 16]

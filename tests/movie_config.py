"""An experiment config on the bundled movie sample, written as the TOML file a user would write.

For the tests and benchmarks that run the real ``dect-maas`` command (a dict would skip the
config reader they exercise). Benchmarks import it as they import ``faultserver``, with
``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


def local_provider(url: str, **settings: int | str) -> str:
    """The ``[provider]`` lines for the local server at ``url``, plus any ``key = value``."""
    lines = ['kind = "local"', f"base_url = {json.dumps(url)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines)


def write_movie_config(
    path: Path,
    provider: str,
    *,
    name: str = "test",
    shots: Sequence[int] = (1,),
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] | None = ("zero_shot",),
    n_test: int = 4,
    train: Path | str = DATA / "movies_train.jsonl",
    test: Path | str = DATA / "movies_test.jsonl",
    cache_dir: Path | str = "cache",
    ledger_dir: Path | str = "ledger",
    output_dir: str | None = "runs",
    max_queries: int | None = None,
    template: str = "{text} In summary, it was {mask}",
    extra: str = "",
) -> Path:
    """Write a movies-binary experiment to ``path`` (folders made) and return ``path``.

    ``provider`` is the ``[provider]`` table's body (see ``local_provider``); ``extra`` goes in
    at the top level after the other keys, so it may open tables of its own. ``methods=None`` and
    ``output_dir=None`` leave those keys out, to exercise their defaults.
    """
    top = [
        f"name = {json.dumps(name)}",
        f"shots = {json.dumps(list(shots))}",
        f"seeds = {json.dumps(list(seeds))}",
        f"cache_dir = {json.dumps(str(cache_dir))}",
        f"ledger_dir = {json.dumps(str(ledger_dir))}",
    ]
    if methods is not None:
        top.append(f"methods = {json.dumps(list(methods))}")
    if output_dir is not None:
        top.append(f"output_dir = {json.dumps(output_dir)}")
    if max_queries is not None:
        extra = f"{extra}\n[budget]\nmax_queries = {max_queries}\n"
    text = f"""{chr(10).join(top)}
{extra}

[provider]
{provider}

[task]
template = {json.dumps(template)}
label_words = {{ negative = "terrible", positive = "great" }}

[data.train]
path = {json.dumps(str(train))}

[data.test]
path = {json.dumps(str(test))}
limit = {n_test}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

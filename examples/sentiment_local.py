"""DecT on the local server from Python: the two calls behind `dect-maas run`.

dect-maas serve &                      # the local server on port 8000
python examples/sentiment_local.py     # [--base-url URL] [--shots 1 4] [--test-limit N]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dect_maas import Experiment

CONFIG = Path(__file__).with_name("sentiment_local.toml")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="server URL (default: the config's)")
    ap.add_argument("--shots", type=int, nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--test-limit", type=int)
    ap.add_argument("--home", type=Path, help="folder for cache, ledger and reports")
    args = ap.parse_args(argv)

    overrides: dict[str, Any] = {}
    if args.base_url:
        overrides["provider"] = {"base_url": args.base_url}
    if args.shots:
        overrides["shots"] = args.shots
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.test_limit:
        overrides["data"] = {"test": {"limit": args.test_limit}}
    if args.home:
        home = args.home.resolve()
        overrides |= {
            "cache_dir": str(home / "cache"),
            "ledger_dir": str(home / "ledger"),
            "output_dir": str(home / "runs"),
        }

    result = Experiment.from_config(CONFIG, overrides=overrides).run(progress=True)
    print(result.table())
    print(result.cost_summary())
    print(f"report: {result.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

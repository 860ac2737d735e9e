"""Run every ``benchmarks/bench_*.py`` in turn, each in its own process; print one JSON object.

Keys are the script names; each value is the JSON the script printed, or the error when it failed
(a non-zero exit or output that is not JSON). Exits non-zero if any script failed.

    python benchmarks/run_all.py [--timeout SECONDS] [NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_one(script: Path, timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE.parent,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = round(time.perf_counter() - start, 2)
    if proc.returncode != 0:
        return {
            "error": f"exit code {proc.returncode}",
            "stderr_tail": proc.stderr[-2000:],
            "wall_s": wall,
        }
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": "output is not JSON", "stdout_tail": proc.stdout[-2000:], "wall_s": wall}
    return {"result": result, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description="Run all benchmarks and print one JSON object.")
    parser.add_argument("names", nargs="*", help="only these scripts (e.g. bench_decoder)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per script, seconds")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.names:
        wanted = {n.removesuffix(".py") for n in args.names}
        scripts = [s for s in scripts if s.stem in wanted]
    results = {s.stem: run_one(s, args.timeout) for s in scripts}
    print(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""One BBT run's curve and paid time from its logs, when it was cut short and resumed.

    .venv/bin/python benchmarks/bbt_log_summary.py /tmp/bbt-full7.log /tmp/bbt-full8.log \\
        --since 2026-12-05T21:14 --json /tmp/bbt-full-combined.json

``bbt_curve.py`` reports the timings of its own process. A run started again replays its paid
calls from the cache in seconds, so the second process's ``train_query_seconds`` and the curve's
``seconds`` miss the first leg. The logs keep both: one ``bbt {...}`` line a generation and one
line per paid request with its query count and seconds. Give the legs in order; ``--since`` drops
lines older than the first leg (an earlier, abandoned start in the same file).

A paid request is a BBT training call when its query count is the run's call size (k·C + 1: the
most common count after the ``bbt:`` line); the curve's test evaluations and DecT's queries have
other sizes. Prints JSON: the combined curve (each point once, with seconds on one clock that
leaves out each later leg's replay), the paid training calls and their summed seconds, and per
leg how many calls it paid and replayed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

_PAID = re.compile(r": (\d+) queries, (\d+) tokens, \d+ attempt\(s\), ([\d.]+)s$")
_BBT_START = re.compile(r" bbt: \d+ shots, seed \d+$")


def _stamp(line: str) -> str:
    return line[:10] + "T" + line[11:19]


def read_leg(path: Path, since: str | None) -> dict[str, Any]:
    """The generation points and paid requests (queries, seconds) of one log, after ``bbt:``."""
    points: list[dict[str, Any]] = []
    paid: list[tuple[int, float]] = []
    in_bbt = False
    for line in path.read_text().splitlines():
        if since and _stamp(line) < since:
            continue
        if _BBT_START.search(line):
            in_bbt = True
        elif " bbt {" in line:
            points.append(json.loads(line[line.index("{") :]))
        elif in_bbt and (m := _PAID.search(line)):
            paid.append((int(m.group(1)), float(m.group(3))))
    return {"path": str(path), "points": points, "paid": paid}


def combine(legs: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = Counter(q for leg in legs for q, _ in leg["paid"])
    if not sizes:
        raise SystemExit("no paid BBT request in these logs: give the logs of the run's legs")
    call_size = sizes.most_common(1)[0][0]
    curve: dict[int, dict[str, Any]] = {}
    offset = 0.0
    per_leg = []
    for leg in legs:
        reached = max(curve, default=0)
        replay_end = 0.0
        for point in leg["points"]:
            if point["calls"] <= reached:
                replay_end = point["seconds"]
                continue
            curve[point["calls"]] = {
                **point,
                "seconds": round(offset + point["seconds"] - replay_end, 1),
            }
        calls = [s for q, s in leg["paid"] if q == call_size]
        per_leg.append(
            {
                "log": leg["path"],
                "replayed_to_calls": reached,
                "replay_seconds": replay_end,
                "paid_training_calls": len(calls),
                "paid_training_call_seconds": round(sum(calls), 1),
                "paid_other_requests": sum(1 for q, _ in leg["paid"] if q != call_size),
            }
        )
        if leg["points"]:
            offset += leg["points"][-1]["seconds"] - replay_end
    paid_calls = sum(leg["paid_training_calls"] for leg in per_leg)
    paid_s = sum(leg["paid_training_call_seconds"] for leg in per_leg)
    return {
        "call_size_queries": call_size,
        "calls": max(curve, default=0),
        "paid_training_calls": paid_calls,
        "paid_training_call_seconds": round(paid_s, 1),
        "seconds_per_call": round(paid_s / paid_calls, 3) if paid_calls else None,
        "legs": per_leg,
        "curve": [curve[c] for c in sorted(curve) if "test_accuracy" in curve[c]],
    }


def markdown(summary: dict[str, Any], every: int) -> str:
    rows = [
        "| calls | best training loss | training accuracy | test accuracy | seconds |",
        "|---|---|---|---|---|",
    ]
    for p in summary["curve"]:
        if p["calls"] % every == 0:
            rows.append(
                f"| {p['calls']:,} | {p['train_loss']:.4f} | {p['train_acc']:.3f} "
                f"| {100 * p['test_accuracy']:.0f} % | {p['seconds']:,.0f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path, help="the run's logs, first leg first")
    p.add_argument("--since", help="ignore lines before this time (YYYY-MM-DDTHH:MM[:SS])")
    p.add_argument("--table-every", type=int, default=500, help="calls between table rows")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)
    summary = combine([read_leg(path, args.since) for path in args.logs])
    text = json.dumps(summary, indent=1)
    print(text)
    print(markdown(summary, args.table_every))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

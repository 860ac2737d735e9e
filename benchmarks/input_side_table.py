"""One table from several ``input_side.py --json`` outputs of the same server and cache.

    .venv/bin/python benchmarks/input_side_table.py dect.json icl.json bbt.json --json all.json

A long comparison is best run in parts (DecT first, then ICL and BBT, each part resumable from
the cache), but the paper's ratios need DecT's figures from the part that paid its queries: a
later part answers them from the cache, at no time. This merges the parts, each method's rows
from the first file that has them (list the file that paid DecT's queries first), recomputes
the ratios against those DecT rows, and prints Markdown: accuracy (mean ± std over seeds) and the
cost on one footing per set, method and shot count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_side import ratios

ORDER = ("dect", "auto_dect", "icl", "calibrated_icl", "bbt")


def pool(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One row from two runs of the same method and shots on other seeds: the accuracies pooled,
    every other number the mean weighted by seeds (what one run over all the seeds reports)."""
    acc = [*a["accuracies"], *b["accuracies"]]
    out = dict(a)
    for key, va in a.items():
        vb = b.get(key)
        if isinstance(va, int | float) and isinstance(vb, int | float) and va != vb:
            out[key] = (va * a["seeds"] + vb * b["seeds"]) / (a["seeds"] + b["seeds"])
    out.update(
        accuracies=acc,
        seed_list=[*a["seed_list"], *b["seed_list"]],
        seeds=len(acc),
        accuracy_mean=float(np.mean(acc)),
        accuracy_std=float(np.std(acc, ddof=1)),
    )
    if "curves" in a:
        out["curves"] = [*a["curves"], *b.get("curves", [])]
    return out


def _other_seeds(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether ``a`` and ``b`` both name their seeds and share none."""
    if "seed_list" not in a or "seed_list" not in b:
        return False
    return not set(a["seed_list"]) & set(b["seed_list"])


def merge(outputs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per set (``+bbt`` runs folded in), its method rows: the first file's row for each key, or
    the rows of runs on other seeds pooled (``pool``)."""
    sets: dict[str, dict[str, Any]] = {}
    for out in outputs:
        for key, part in out["sets"].items():
            rows = sets.setdefault(key.split("+")[0], {})
            for mk, row in part.get("methods", {}).items():
                old = rows.get(mk)
                if old is None:
                    rows[mk] = row
                elif _other_seeds(old, row):
                    rows[mk] = pool(old, row)
    for rows in sets.values():
        ratios(rows, {k: v for k, v in rows.items() if k.startswith("dect@")})
    return sets


def _pct(row: dict[str, Any]) -> str:
    mean, std = 100 * row["accuracy_mean"], 100 * row["accuracy_std"]
    return f"{mean:.1f} ± {std:.1f}" if row["seeds"] > 1 else f"{mean:.1f} (1 seed)"


def markdown(sets: dict[str, dict[str, Any]]) -> str:
    """An accuracy table and a cost table."""
    shots = sorted({int(k.split("@")[1]) for rows in sets.values() for k in rows})
    acc = ["| set | method | " + " | ".join(f"{k}-shot" for k in shots) + " | test rows |"]
    acc.append("|" + "---|" * (len(shots) + 3))
    cost = [
        "| set | method | shots | training queries | training s (querying + local) "
        "| tokens / prediction | vs DecT |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in sets.items():
        for m in ORDER:
            cells = [rows.get(f"{m}@{k}") for k in shots]
            present = [c for c in cells if c is not None]
            if not present:
                continue
            acc.append(
                f"| {name} | {m} | "
                + " | ".join(_pct(c) if c else "–" for c in cells)
                + f" | {present[0].get('n_test', '')} |"
            )
            for k, c in zip(shots, cells, strict=True):
                if c is None:
                    continue
                vs = []
                if "ratio_train_queries_over_dect" in c:
                    vs.append(f"queries {c['ratio_train_queries_over_dect']:.0f}x")
                    vs.append(f"wall {c['ratio_train_wall_over_dect']:.0f}x")
                if "ratio_tokens_per_prediction_over_dect" in c:
                    vs.append(f"tokens/pred {c['ratio_tokens_per_prediction_over_dect']:.1f}x")
                tpp = c.get("tokens_per_prediction")
                cost.append(
                    f"| {name} | {m} | {k} | {c['train_queries']:.0f} | "
                    f"{c['train_query_seconds']:.1f} + {c['train_local_seconds']:.1f} | "
                    f"{tpp:.1f} | {', '.join(vs)} |"
                    if tpp
                    else f"| {name} | {m} | {k} | {c['train_queries']:.0f} | "
                    f"{c['train_query_seconds']:.1f} + {c['train_local_seconds']:.1f} | – | |"
                )
    return "\n".join(acc) + "\n\n" + "\n".join(cost) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outputs", nargs="+", type=Path, help="input_side.py --json files, DecT's first")
    p.add_argument("--json", help="write the merged rows here")
    args = p.parse_args(argv)
    sets = merge([json.loads(f.read_text()) for f in args.outputs])
    print(markdown(sets))
    if args.json:
        Path(args.json).write_text(json.dumps({"sets": sets}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

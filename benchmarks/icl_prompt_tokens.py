"""ICL's tokens per prediction without any cut, against DecT's (the zero-shot prompt), by tokenizer.

    .venv/bin/python benchmarks/icl_prompt_tokens.py [--model FOLDER] [--test-rows 12]

No model forward and no query: the full ICL prompts of ``input_side.py`` (every demonstration of
the k-shot set, in the documented order) are tokenized with the model's tokenizer, so the figure
holds for prompts too long to score on a CPU. Prints one JSON object per set and shot count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import DATA, TASKS

from dect_maas import Task, load_examples, sample_k_shot
from dect_maas.experiments.icl import ICLTask, demonstration, demonstration_order


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="tokenizer folder (default: the prepared default model)")
    p.add_argument("--test-rows", type=int, default=12)
    p.add_argument("--dect-rows", type=int, default=200)
    args = p.parse_args()
    from transformers import AutoTokenizer

    folder = args.model or str(next((Path.home() / ".cache/dect-maas/models").glob("SmolLM2*")))
    tok = AutoTokenizer.from_pretrained(folder)
    for name, spec in TASKS.items():
        task = Task(spec["template"], spec["label_words"])
        train = load_examples(DATA / f"{name}_train.jsonl")
        test = load_examples(DATA / f"{name}_test.jsonl")
        labels = [str(y) for y in train.labels]
        plain = [len(tok(task.render(t))["input_ids"]) for t in test.texts[: args.dect_rows]]
        dect = sum(plain) / len(plain)
        for k in (4, 16):
            n = []
            for seed in (0, 1, 2):
                order = demonstration_order(sample_k_shot(labels, k, seed), seed)
                demos = "".join(
                    demonstration(task, train.texts[i], None, labels[i]) + "\n\n" for i in order
                )
                icl = ICLTask(task.template, task.label_words, demonstrations=demos)
                n += [len(tok(icl.render(t))["input_ids"]) for t in test.texts[: args.test_rows]]
            mean = sum(n) / len(n)
            row = {"set": name, "shots": k, "icl_tokens_per_prediction": mean}
            row.update(dect_tokens_per_prediction=dect, ratio=mean / dect)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# DecT against ICL and BBT on a larger model, on one GPU: the comparison of docs/input_side.md
# ("On a GPU") in one command. Not run in CI; needs a CUDA torch in .venv and the model on disk
# (the GPU machine has no network: copy the folder there first).
#
#   MODEL=/models/SmolLM2-1.7B-Instruct OUT=/tmp/gpu-input-side bash benchmarks/gpu_input_side.sh
#
# DATA: the folder with {movies_binary,movies_5way,drugs_3way}_{train,test}.jsonl (default
# ../shared/data beside the repository). Writes $OUT/concurrency.json (BBT calls per second, one
# call in flight against the whole population), $OUT/bbt_full.json + bbt_full.log (BBT at the
# BBT paper's 8,000 calls on movies binary, 4 shots, beside DecT) and $OUT/table.json (the three
# sets, 4 and 16 shots x 3 seeds: DecT, auto DecT, ICL uncut, BBT at 500 calls with its curve).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local model folder (a causal LM: BBT needs soft prompts)}"
OUT=${OUT:-/tmp/gpu-input-side}
DATA=${DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -c 'import torch, cma; assert torch.cuda.is_available(), "no CUDA device"'
"$PY" benchmarks/bbt_concurrency.py --model "$MODEL" --device cuda --budget 100 \
  --json "$OUT/concurrency.json" > /dev/null
"$PY" benchmarks/bbt_curve.py --model "$MODEL" --device cuda --budget 8000 --curve-every 500 \
  --shots 4 --bbt-test-limit 400 --work "$OUT/work" --log "$OUT/bbt_full.log" \
  --json "$OUT/bbt_full.json" > /dev/null
"$PY" benchmarks/input_side.py --model "$MODEL" --device cuda --data-dir "$DATA" \
  --sets movies_binary movies_5way drugs_3way --shots 4 16 --seeds 0 1 2 \
  --bbt-sets movies_binary movies_5way drugs_3way --bbt-budget 500 --bbt-curve-every 100 \
  --bbt-test-limit 400 --work "$OUT/work" --json "$OUT/table.json" > /dev/null
echo "wrote $OUT/concurrency.json $OUT/bbt_full.json $OUT/table.json"

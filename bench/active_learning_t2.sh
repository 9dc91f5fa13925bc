#!/bin/bash
# Issue 18's scenario benchmark on skull-off T2 (docs/benchmarks.md, "Learning from corrected labels"),
# as run in session 10 (the defaults: 64 rehearsal studies, averaged weights, the tie rule). Every figure
# there comes from one of these commands; each fine-tune takes 13-20 min of one core.
# Usage: bench/active_learning_t2.sh data|seeds|table|merge [OUT] (OUT: runs/al_t2 by default).
#   data   generates the studies it reads (deterministic seeds; skipped where a folder exists)
#   seeds  least_sure with 10 labels, fine-tune seeds 0-3 (two processes at a time)
#   table  least_sure at 5 and 20 labels, random draws 0 and 1 at 5, 10 and 20 (draw k: fine-tune seed k)
#   merge  one results.json and plot (OUT/all) of every run above
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
export OMP_NUM_THREADS=1 XAI_NUM_THREADS=1
OUT=${2:-runs/al_t2}
mkdir -p "$OUT"
# The request a radiologist's server would get for a new contrast (POST /train/seg_head_finetune).
S='{"parts": "all", "lr": 0.001, "max_epochs": 50, "patience": 50, "kfold_below": 5, "replay_distill_weight": 1.0}'
COMMON=(--pool data/al/pool_off_t2 --heldout data/r16/held/off_t2 --original data/heldout --condition skull-off-T2
        --replay data/al/replay_orig64 --replay-n 64 --check data/val --check-skip 16 --check-n 48 --settings "$S")

gen() {  # folder, then make-brain options
  local out=$1; shift
  [ -f "$out/manifest.csv" ] || xai data make-brain --workers 2 --out "$out" "$@"
}

jobs_of() {  # STRATEGY LABELS DRAW ..., one after another; each run in its own folder
  while [ $# -ge 3 ]; do
    local name=$1_$2_r$3
    python bench/active_learning.py "${COMMON[@]}" --strategies "$1" --budgets "$2" --repeats $(($3 + 1)) \
      --repeat-from "$3" --seed 0 --out "$OUT/$name" > "$OUT/$name.log" 2>&1
    shift 3
  done
}

case ${1:-} in
  data)
    gen data/al/pool_off_t2 --n 40 --seed 7200 --templates icbm09a --skull off --contrasts t2
    gen data/r16/held/off_t2 --n 24 --seed 6005 --templates icbm09a --skull off --contrasts t2
    gen data/heldout --n 30 --seed 3000
    gen data/val --n 64 --seed 2000
    gen data/al/replay_orig64 --n 64 --seed 9300
    ;;
  seeds)
    for pair in "0 1" "2 3"; do
      for seed in $pair; do
        python bench/active_learning.py "${COMMON[@]}" --strategies least_sure --budgets 0 10 --seed "$seed" \
          --out "$OUT/seed$seed" > "$OUT/seed$seed.log" 2>&1 &
      done
      wait
    done
    ;;
  table)
    jobs_of random 10 0 least_sure 5 0 random 5 0 least_sure 20 0 &
    jobs_of random 10 1 random 20 0 random 20 1 random 5 1 &
    wait
    ;;
  merge)
    python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
docs = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json")) if p.parent.name != "all"]
# Rows of one strategy and label count (least_sure's four seeds) are averaged by the table and the plot.
merged = {**docs[0], "rows": [r for d in docs for r in d["rows"]]}
base = docs[0]["base"]  # the 0-label point of every strategy: the shipped weights
for strategy in sorted({r["strategy"] for r in merged["rows"]} - {r["strategy"] for r in merged["rows"] if r["labels"] == 0}):
    merged["rows"].append({"strategy": strategy, "repeat": 0, "labels": 0, "published": False, "reason": "no labels",
                           "heldout_dice": round(base["heldout"], 4), "original_dice": round(base["original"], 4)})
(out / "all").mkdir(exist_ok=True)
(out / "all" / "results.json").write_text(json.dumps(merged, indent=1))
PY
    python bench/active_learning.py "${COMMON[@]}" --plot-only --out "$OUT/all"
    ;;
  *)
    echo "usage: $0 data|seeds|table|merge [OUT]" >&2
    exit 2
    ;;
esac

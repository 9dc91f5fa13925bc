#!/bin/bash
# Issue 18's scenario benchmark on skull-off T2 (docs/benchmarks.md, "Learning from corrected labels"),
# as run in session 9. Every figure there comes from one of these commands; each fine-tune takes 14-20 min
# of one core. Usage: bench/active_learning_t2.sh data|seeds|table [OUT] (OUT: runs/al_t2 by default).
#   data   generates the studies it reads (deterministic seeds; skipped where a folder exists)
#   seeds  least_sure with 10 labels, fine-tune seeds 0-3 (two processes at a time)
#   table  least_sure at 5, 10 and 20 labels and random draws at 5, 10 and 20, for the strategy comparison
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
    python bench/active_learning.py "${COMMON[@]}" --strategies least_sure --budgets 0 5 10 20 \
      --out "$OUT/least_sure" > "$OUT/least_sure.log" 2>&1 &
    python bench/active_learning.py "${COMMON[@]}" --strategies random --repeats 3 --budgets 5 10 20 \
      --out "$OUT/random" > "$OUT/random.log" 2>&1 &
    wait
    ;;
  *)
    echo "usage: $0 data|seeds|table [OUT]" >&2
    exit 2
    ;;
esac

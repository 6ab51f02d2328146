#!/usr/bin/env bash
# SynFoC and its baselines on the complete real BUSI set, under a reduced protocol that fits a
# 2-core CPU (see benchmarks/busi/RESULTS.md for why). Same iterations, sizes and batches for every
# method. Usage: bash benchmarks/busi/run_reduced.sh [LABELED_DOMAIN] [ITERS]
# Runs go to runs/busi-<domain>/<method>/, logs to runs/busi-<domain>/<method>.log; a finished run
# (summary.json present) is skipped, an interrupted one resumes.
set -u
DATA=${BUSI:-../shared/data/busi}
DOMAIN=${1:-benign}
ITERS=${2:-300}
OUT=runs/busi-$DOMAIN
mkdir -p "$OUT"
COMMON=(--preset busi --dataset "$DATA" --labeled-domain "$DOMAIN" --labeled-ratio 0.125
        --iters "$ITERS" --unet-size 128 --unet-width 16 --foundation litemedsam --image-size 128
        --batch-labeled 2 --batch-unlabeled 2 --no-progress)
for METHOD in suponly-unet base-unet samed base-foundation synfoc; do
  RUN=$OUT/$METHOD
  if [ -f "$RUN/summary.json" ]; then echo "$METHOD: done, skipping"; continue; fi
  START=$(date +%s)
  if [ -f "$RUN/checkpoint.pt" ]; then
    synfoc train --resume "$RUN" --no-progress > "$OUT/$METHOD.log" 2>&1
  else
    synfoc train "${COMMON[@]}" --method "$METHOD" --out "$RUN" > "$OUT/$METHOD.log" 2>&1
  fi
  echo "$METHOD: exit $? after $(( $(date +%s) - START )) s" | tee -a "$OUT/walltimes.txt"
done
python benchmarks/busi/tables.py "$OUT" > "$OUT/tables.md" && cat "$OUT/tables.md"
# Both labeled domains (the Table 6 layout), once both have run:
#   python benchmarks/busi/tables.py runs/busi-benign runs/busi-malignant

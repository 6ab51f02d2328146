#!/usr/bin/env bash
# SynFoC and its baselines on the complete real BUSI set under the CPU protocol of
# benchmarks/results/busi/README.md: 1,000 iterations, LiteMedSAM at 128 + U-Net width 16 at 128, batch
# 2+2, 64 labels (1/8), both labeled domains, three seeds, the paper's hyperparameters otherwise.
#
# Usage: [METHODS="..."] bash benchmarks/busi/run_protocol.sh [SEEDS] [DOMAINS]
#        (defaults: all five methods, "1337 1338 1339", "benign malignant")
# Runs go to $RUNS/<method>/<domain>/seed<N>/ (default runs/busi; the layout of `synfoc sweep
# --seeds`); after each run its small files (summary.json, config.yaml, history.jsonl,
# environment.jsonl, per_case.csv, labeled.txt) are copied to $KEEP (default
# benchmarks/results/busi; the protocol's second round, at the code of 1447e54, keeps its files in
# benchmarks/results/busi/v2) with the same layout, to be committed. A
# finished run is skipped and an interrupted one resumes, so the script can be stopped and started
# again across sessions. The tables are `synfoc sweep --tables-only` over those files, for every seed
# with a kept run (TABLES_ONLY=1 bash benchmarks/busi/run_protocol.sh: the tables alone, nothing
# trained).
# To keep the code fixed while the tree changes, run it with a python that imports synfoc from a
# worktree at a fixed commit (PY=...; -P keeps the current folder off the import path;
# environment.jsonl records the commit).
set -u
DATA=${BUSI:-../shared/data/busi}
SEEDS=${1:-1337 1338 1339}
DOMAINS=${2:-benign malignant}
METHODS=${METHODS:-suponly-unet base-unet samed base-foundation synfoc}
RUNS=${RUNS:-runs/busi}
KEEP=${KEEP:-benchmarks/results/busi}
COMMON=(--preset busi --dataset "$DATA" --labeled-ratio 0.125 --iters 1000 --unet-size 128 --unet-width 16
        --foundation litemedsam --image-size 128 --batch-labeled 2 --batch-unlabeled 2 --no-progress)
ALL_METHODS=(suponly-unet base-unet samed base-foundation synfoc)
kept_seeds() {  # every seed with at least one run kept here
  ls -d "$KEEP"/*/*/seed* 2>/dev/null | sed 's/.*seed//' | sort -un | paste -sd, -
}
tables() {  # sweep.md (the paper's Table 6 layout, mean ± std over seeds, paired differences), sweep_seeds.csv
  # Every seed with a kept run: a cell averaged over fewer seeds than the others is marked `*`, and a
  # paired difference counts the seeds where both of its runs are in. The tables come from the
  # checkout's synfoc (TABLES_PY; default the checkout's .venv/bin/python where there is one, since a
  # runner started without the environment activated reaches a python without synfoc), not from PY's
  # fixed training code.
  local seeds py; seeds=$(kept_seeds)
  if [ -z "$seeds" ]; then echo "tables: no run kept in $KEEP yet" >&2; return 0; fi
  py=${TABLES_PY:-python}
  if [ -z "${TABLES_PY:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
  if ! "$py" -P -c "import synfoc" 2>/dev/null; then
    echo "tables: $py cannot import synfoc; set TABLES_PY to a python that has this checkout installed" >&2
    return 1
  fi
  "$py" -P -m synfoc sweep --tables-only "${COMMON[@]}" --out "$KEEP" \
    --methods "$(IFS=,; echo "${ALL_METHODS[*]}")" --labeled-domains benign,malignant --seeds "$seeds,"   # a list, also for one seed (a bare number is a count)
}
if [ -n "${TABLES_ONLY:-}" ]; then tables; exit; fi
for SEED in $SEEDS; do
  for DOMAIN in $DOMAINS; do
    for METHOD in $METHODS; do
      RUN=$RUNS/$METHOD/$DOMAIN/seed$SEED
      DEST=$KEEP/$METHOD/$DOMAIN/seed$SEED
      if [ -f "$DEST/summary.json" ]; then echo "$METHOD $DOMAIN seed $SEED: done"; continue; fi
      mkdir -p "$RUN"
      START=$(date +%s)
      if [ -f "$RUN/checkpoint.pt" ]; then
        "${PY:-python}" -P -m synfoc train --resume "$RUN" --no-progress >> "$RUN.log" 2>&1
      else
        "${PY:-python}" -P -m synfoc train "${COMMON[@]}" --labeled-domain "$DOMAIN" --seed "$SEED" --method "$METHOD" --out "$RUN" > "$RUN.log" 2>&1
      fi
      CODE=$?
      echo "$METHOD $DOMAIN seed $SEED: exit $CODE after $(( $(date +%s) - START )) s" | tee -a "$RUNS/walltimes.txt"
      if [ $CODE -eq 0 ]; then
        mkdir -p "$DEST"
        cp "$RUN"/{summary.json,config.yaml,history.jsonl,environment.jsonl,per_case.csv,labeled.txt} "$DEST"/
        tables > /dev/null
      fi
    done
  done
done

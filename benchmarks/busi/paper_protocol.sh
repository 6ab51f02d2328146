#!/usr/bin/env bash
# The paper's BUSI protocol (Table 6) for users with a GPU: 30k iterations, batch 4+4, U-Net at 256
# (width 64), the foundation model at 512 with LoRA rank 4, labeled ratio 1/8 (64 labels) or 1/4
# (129), one run per labeled domain, SynFoC and the baselines, then the paper-style tables.
#
# Usage: bash benchmarks/busi/paper_protocol.sh BUSI_DIR OUT_DIR [MEDSAM_CHECKPOINT] [RATIO]
#   With MEDSAM_CHECKPOINT (medsam_vit_b.pth, segment_anything format) the foundation model is
#   MedSAM ViT-B as in the paper; without it, the bundled LiteMedSAM.
# The sweep is resumable: run the same command again after an interruption.
set -euo pipefail
BUSI=${1:?give the folder holding Dataset_BUSI_with_GT}
OUT=${2:?give an output folder}
CKPT=${3:-}
RATIO=${4:-0.125}
FOUNDATION=(--foundation litemedsam)
[ -n "$CKPT" ] && FOUNDATION=(--foundation medsam_vit_b --checkpoint "$CKPT")
synfoc sweep --preset busi --dataset "$BUSI" --out "$OUT" "${FOUNDATION[@]}" --labeled-ratio "$RATIO" \
  --methods synfoc,suponly-unet,base-unet,base-foundation,samed,fixmatch --labeled-domains benign,malignant \
  --device cuda

#!/usr/bin/env bash
# The shipped `simclr` (issue 12), trained on this project's 2-core CPU in one session (no GPU lent): SimCLR's
# recipe (two RandomResizedCrop(0.08, 1) views, NT-Xent at temperature 0.2, LARS, wd 1e-5) with the projector
# 1024-128 that keeps the file under 25 MB, for 6 epochs over all 50,000 CIFAR-10 train images, batch 128 (twice
# the optimiser steps of batch 256 in the same time; lr 0.4 x 128/256 = 0.2), a half-epoch warm-up, bf16
# autocast where the CPU has bf16 units (about 15 min per epoch with AVX512-BF16). Then the shipped file (with its
# heads: z is there), its card (central view on the full protocol, float32, as the other central cards) and its
# figures, each with its random-init control (as `make figures` makes them), and the claims table.
# It ran before the simclr row became solo-learn's CIFAR SimCLR (2026-12-05: ColorJitter(0.8, 0.8, 0.8, 0.2), blur
# p=0.5, wd 1e-4, LARS eta 0.02 clipped, projector 2048-256): the flags after --batch-size give back the row it had
# (VICReg's jitter, no blur, wd 1e-5, facebookresearch/vicreg's LARS: eta 0.001, unclipped).
#   benchmarks/simclr_cpu.sh                              # all steps (about 2 h)
#   STEPS="card figures" benchmarks/simclr_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/simclr-cpu-6ep}
STEPS=${STEPS:-train ship card figures}
DEVICE=${FIGURES_DEVICE:-cpu}
STORE=${FIGURES_STORE:-$HOME/.cache/ssl_patch_analysis/evaluate-store}

train() {
  local resume=""
  [ -f "$RUN/resume.pt" ] && resume=--resume
  $py -m ssl_patch_analysis.train --method simclr --projector 1024-128 --epochs 6 --warmup-epochs 0.5 \
      --batch-size 128 --jitter 0.4,0.4,0.2,0.1 --blur-p 0 --weight-decay 1e-5 --lars-eta 0.001 --no-lars-clip \
      --device cpu --time-limit 6600 --run-dir "$RUN" $resume
}

ship() {
  $py pretrained/ship.py "$RUN/checkpoint.pt" pretrained/simclr-resnet18-cifar10.pt --overwrite
  cp "$RUN/log.jsonl" pretrained/simclr-resnet18-cifar10.log.jsonl
}

card() {
  $py pretrained/model_card.py pretrained/simclr-resnet18-cifar10.pt --device cpu --no-progress \
      --json pretrained/simclr-resnet18-cifar10.card.json
}

# the simclr figures of `make figures` (the model and its own random-init controls), then the claims table
figures() {
  make figures-simclr claims PY="$py" FIGURES_DEVICE="$DEVICE" FIGURES_STORE="$STORE"
}

for step in $STEPS; do
  echo "== $step $(date +%T)"
  "$step"
done
echo "== done $(date +%T)"

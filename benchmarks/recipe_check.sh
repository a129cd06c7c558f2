#!/usr/bin/env bash
# The vicreg and simclr rows against the recipe that trained the shipped models (before 2026-12-05: crops (0.08, 1),
# facebookresearch/vicreg's LARS eta 0.001 unclipped, VICReg's jitter, no solarization; simclr wd 1e-5, projector
# 2048-128), side by side on the same short CPU run: 2 epochs over a fixed 10,000-image subset of CIFAR-10 train,
# batch 128, half an epoch of warm-up, bf16 autocast where the CPU has bf16 units; online weighted k-NN (5,000-image
# bank, 1,000 test images) after each epoch. A check that the solo-learn rows train (no divergence, k-NN rising),
# not a measure of where they end: solo-learn's numbers are after 1,000 epochs. About 10 min per run alone on 2 cores
# with bf16 units; a run folder left by an interrupted call resumes.
#   benchmarks/recipe_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/recipe-check}

# one run: <run name> <trainer flags...>; skipped when finished, resumed when interrupted
run() {
  local dir=$RUNS/$1 resume=""
  [ -f "$dir/checkpoint.pt" ] && [ ! -f "$dir/resume.pt" ] && return 0
  [ -f "$dir/resume.pt" ] && resume=--resume
  $py -m ssl_patch_analysis.train "${@:2}" --train-size 10000 --epochs 2 --batch-size 128 --warmup-epochs 0.5 \
      --device cpu --run-dir "$dir" $resume
}

run vicreg-solo-learn --method vicreg
run vicreg-before --method vicreg --scale 0.08,1 --solarize-p 0 --lars-eta 0.001 --no-lars-clip
run simclr-solo-learn --method simclr
run simclr-before --method simclr --jitter 0.4,0.4,0.2,0.1 --blur-p 0 --lars-eta 0.001 --no-lars-clip \
    --weight-decay 1e-5 --projector 2048-128

# one table: k-NN after each epoch and the loss of the first and last epochs, per run
$py - "$RUNS" <<'PY'
import sys
from pathlib import Path
from ssl_patch_analysis.train import read_log
print("| run | k-NN after epoch 1 / 2 (%) | loss epoch 1 -> 2 | s/epoch |")
print("|---|---|---|---:|")
for run in sorted(Path(sys.argv[1]).iterdir()):
    epochs = [r for r in read_log(run / "log.jsonl") if "epoch" in r and "loss" in r]
    knn = " / ".join(f"{r['knn_top1']:.1f}" for r in epochs if r.get("knn_top1") is not None)
    wall = sum(r.get("epoch_time_s", 0) for r in epochs) / max(len(epochs), 1)
    print(f"| {run.name} | {knn} | {epochs[0]['loss']:.3f} -> {epochs[-1]['loss']:.3f} | {wall:.0f} |")
PY

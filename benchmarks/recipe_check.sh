#!/usr/bin/env bash
# The vicreg and simclr rows against the recipe that trained the shipped models (before 2026-12-05: crops (0.08, 1),
# facebookresearch/vicreg's LARS eta 0.001 unclipped, VICReg's jitter, no solarization; simclr wd 1e-5, projector
# 2048-128), side by side on one short CPU run each: a narrow ResNet-18 (--width 0.25, a sixteenth of the compute)
# for 10 epochs over a fixed 10,000-image subset of CIFAR-10 train, batch 128 (780 steps), one epoch of warm-up, bf16
# autocast where the CPU has bf16 units; online weighted k-NN (5,000-image bank, 1,000 test images) after every
# other epoch; and how far each run moved its backbone's weights. A check that the solo-learn rows train and how
# they compare early on, not a measure of where they end (solo-learn's numbers are after 1,000 epochs of the full
# width). A run folder left by an interrupted call resumes.
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
  $py -m ssl_patch_analysis.train "${@:2}" --width 0.25 --train-size 10000 --epochs 10 --batch-size 128 \
      --warmup-epochs 1 --knn-every 2 --device cpu --run-dir "$dir" $resume
}

run vicreg-solo-learn --method vicreg
run vicreg-before --method vicreg --scale 0.08,1 --solarize-p 0 --lars-eta 0.001 --no-lars-clip
run simclr-solo-learn --method simclr
run simclr-before --method simclr --jitter 0.4,0.4,0.2,0.1 --blur-p 0 --lars-eta 0.001 --no-lars-clip \
    --weight-decay 1e-5 --projector 2048-128

# one table: k-NN after each epoch, the loss of the first and last epochs, and how far training moved the backbone
# (the mean over its conv weights of |w - w0| / |w0|, w0 the run's initial weights, rebuilt from its seed), per run
$py - "$RUNS" <<'PY'
import sys
from pathlib import Path

import torch

from ssl_patch_analysis.checkpoints import load_model
from ssl_patch_analysis.models import randomly_initialised
from ssl_patch_analysis.train import TrainConfig, build_model, knn_sampler, knn_top1, load_training_data, read_log

print("| run | k-NN after epoch 2 / 4 / 6 / 8 / 10 (%) | loss epoch 1 -> 10 | backbone moved | s/epoch |")
print("|---|---|---|---:|---:|")
for run in sorted(Path(sys.argv[1]).iterdir()):
    records = read_log(run / "log.jsonl")
    epochs = [r for r in records if "epoch" in r and "loss" in r]
    if not epochs:
        continue
    knn = " / ".join(f"{r['knn_top1']:.1f}" for r in epochs if r.get("knn_top1") is not None)
    wall = sum(r.get("epoch_time_s", 0) for r in epochs) / len(epochs)
    config = TrainConfig(**records[0]["args"])
    torch.manual_seed(config.seed)  # as the trainer does before it builds the model
    start = build_model(config, 32).backbone.state_dict()
    trained = load_model(run / "checkpoint.pt", device="cpu", verbose=False).backbone.state_dict()
    moved = [float((trained[k].float() - w).norm() / w.norm()) for k, w in start.items() if w.ndim == 4]
    print(f"| {run.name} | {knn} | {epochs[0]['loss']:.3f} -> {epochs[-1]['loss']:.3f} "
          f"| {sum(moved) / len(moved):.3f} | {wall:.0f} |")
# the control: the same narrow architecture with random weights (BatchNorm calibrated on 512 training images), the
# same online k-NN (its bank and test images and its protocol are the runs')
data = load_training_data(config, torch.device("cpu"), show=False)
control = randomly_initialised(build_model(config, 32), config.seed, calibration_images=data.images[:512])
knn = knn_top1(control, data, config.input_size, bool(config.amp), knn_sampler(config))
print(f"| random init | {knn:.1f} | | 0 | |")
PY

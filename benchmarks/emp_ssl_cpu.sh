#!/usr/bin/env bash
# EMP-SSL's recipe sized to one CPU session (issue 11, no GPU lent): one epoch over a fixed 10,000-image
# subset of CIFAR-10 train (100 steps of 100 images x 20 patches of 16x16 resized to 32; EMP-SSL's full
# epoch is 500 steps), then EMP-SSL's evaluation protocol (mean of random patches' 4096-d pre_feature,
# its patch augmentation, its SGD linear probe) with 4 patches per image instead of 20 and a 10,000-image
# class-stratified subset of train for the probe, on the full CIFAR-10 test set; the same for the
# random-init control. About 2 h of training and 20 min of evaluation on 2 cores without bf16 units.
#   benchmarks/emp_ssl_cpu.sh            # train (resumable with --resume by hand), then evaluate
#   STEPS=evaluate benchmarks/emp_ssl_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/emp-ssl-cpu-10k}
RESULTS=${RESULTS:-benchmarks/results}
STEPS=${STEPS:-train evaluate}

train() {
  $py -m ssl_patch_analysis.train --method emp-ssl --epochs 1 --train-size 10000 --device cpu --run-dir "$RUN"
}

evaluate() {
  cp "$RUN/checkpoint.pt" "$RUN/emp-ssl-cpu-10k.pt"   # outputs are named after the checkpoint file
  mkdir -p "$RESULTS"
  cp "$RUN/log.jsonl" "$RESULTS/emp-ssl-cpu-10k.log.jsonl"
  for control in "" "--random-init"; do
    $py -m ssl_patch_analysis.evaluate --model "$RUN/emp-ssl-cpu-10k.pt" --layers pre_feature --protocols 4 \
        --probe emp-ssl --augment-patches emp-ssl --train-size 10000 --k 20 --device cpu --no-progress \
        --out "$RESULTS" $control
  done
}

for step in $STEPS; do "$step"; done

#!/usr/bin/env bash
# EMP-SSL's recipe sized to one CPU session (issue 11, no GPU lent): one epoch over a fixed 10,000-image
# subset of CIFAR-10 train (100 steps of 100 images x 20 patches of 16x16 resized to 32; EMP-SSL's full
# epoch is 500 steps), then EMP-SSL's evaluation protocol (mean of random patches' 4096-d pre_feature,
# its patch augmentation, its SGD linear probe) with 4 patches per image instead of 20 and a 10,000-image
# class-stratified subset of train for the probe, on the full CIFAR-10 test set; the same for the
# random-init control. About 2 h of training and 20 min of evaluation on 2 cores without bf16 units.
#   benchmarks/emp_ssl_cpu.sh            # train (resumable with --resume by hand), then evaluate
#   STEPS=evaluate benchmarks/emp_ssl_cpu.sh
# A second CPU session (issue 12) continued that run for a second epoch over the same images: the schedule
# is stretched to two epochs (--epochs 2 on --resume), so its learning rate restarts at the two-epoch
# cosine's midpoint (0.15) and decays to 0 over the second epoch's 100 steps (78 min). Then the shipped
# model (backbone only: EMP-SSL's heads alone are 46 MB in float16) and its cards:
#   STEPS="second ship_second evaluate_second" benchmarks/emp_ssl_cpu.sh
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

SECOND=${SECOND:-runs/emp-ssl-cpu-10k-2ep}
second() {
  [ -d "$SECOND" ] || { cp -a "$RUN" "$SECOND" && rm -f "$SECOND"/emp-ssl-cpu-10k.pt; }
  $py -m ssl_patch_analysis.train --method emp-ssl --epochs 2 --train-size 10000 --device cpu --run-dir "$SECOND" \
      --resume
}

ship_second() {
  $py pretrained/ship.py "$SECOND/checkpoint.pt" pretrained/emp-ssl-resnet18-cifar10.pt --backbone-only
  cp "$SECOND/log.jsonl" pretrained/emp-ssl-resnet18-cifar10.log.jsonl
}

evaluate_second() {
  # the card's protocols on a 2,000-image bank and test set (the bagssl card beside it was made the same way)
  $py pretrained/model_card.py pretrained/emp-ssl-resnet18-cifar10.pt --device cpu --max-images 2000 \
      --json "$RESULTS/card-2k_emp-ssl-resnet18-cifar10.json"
  $py pretrained/model_card.py pretrained/bagssl-resnet18-cifar10.pt --device cpu --max-images 2000 \
      --json "$RESULTS/card-2k_bagssl-resnet18-cifar10.json"
  # EMP-SSL's protocol as above (its random-init control is the first session's: same architecture and seed)
  cp "$SECOND/checkpoint.pt" "$SECOND/emp-ssl-cpu-10k-2ep.pt"
  $py -m ssl_patch_analysis.evaluate --model "$SECOND/emp-ssl-cpu-10k-2ep.pt" --layers pre_feature --protocols 4 \
      --probe emp-ssl --augment-patches emp-ssl --train-size 10000 --k 20 --device cpu --no-progress \
      --out "$RESULTS"
  # the central view on the full protocol: all 50,000 training images as the bank, 10,000 test images
  $py pretrained/model_card.py pretrained/emp-ssl-resnet18-cifar10.pt --device cpu --protocols central \
      --json pretrained/emp-ssl-resnet18-cifar10.card.json
}

for step in $STEPS; do "$step"; done

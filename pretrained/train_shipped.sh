#!/usr/bin/env bash
# The commands that made the shipped models (pretrained/README.md). Full-width CIFAR ResNet-18 on
# CIFAR-10 train (JPEG copy), one GPU, epochs sized to one short device session. The projector
# (1024-512) keeps each float16 file under 25 MB. They ran before the vicreg and bagssl rows became solo-learn's
# CIFAR recipe (2026-12-05): the flags after --projector give back the rows they had (crops (0.08, 1), no
# solarization, facebookresearch/vicreg's LARS: eta 0.001, unclipped).
# Usage: pretrained/train_shipped.sh RUNS_DIR [extra trainer flags, e.g. --device cpu --train-size 512]
set -euo pipefail
runs=${1:?usage: train_shipped.sh RUNS_DIR [flags]}
shift
python=${PYTHON:-python3}
$python -m ssl_patch_analysis.train --method vicreg --data cifar10 --arch resnet18 --projector 1024-512 \
    --scale 0.08,1 --solarize-p 0 --lars-eta 0.001 --no-lars-clip \
    --epochs 18 --warmup-epochs 2 --batch-size 256 --time-limit 115 --run-dir "$runs/vicreg" "$@"
$python -m ssl_patch_analysis.train --method bagssl --data cifar10 --arch resnet18 --projector 1024-512 \
    --solarize-p 0 --lars-eta 0.001 --no-lars-clip \
    --patch-size 16 --num-patches 16 --epochs 7 --warmup-epochs 1 --batch-size 256 --time-limit 125 \
    --run-dir "$runs/bagssl" "$@"

#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the training of the shipped models, their model-card
# numbers, then the extraction benchmark, all written under $OUT.
# Data travel in the ignored folder .gpu_data (CIFAR-10 and a 400-image Imagenette subset), made by
# benchmarks/make_gpu_data.py; the call: run(command="bash benchmarks/gpu_session.sh", carry=[".gpu_data"]).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 SSL_PATCH_ANALYSIS_DATA=$PWD/.gpu_data SSL_PATCH_ANALYSIS_CACHE=/tmp/cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } \
  | tee "$OUT/session.log"
mkdir -p /tmp/ship
PYTHON=$py pretrained/train_shipped.sh /tmp/runs --device "$DEVICE" ${TRAIN_FLAGS:-} > /tmp/ship/train.log 2>&1
tail -4 /tmp/ship/train.log | tee -a "$OUT/session.log"
for m in vicreg bagssl; do
  [ -f /tmp/runs/$m/checkpoint.pt ] || continue
  $py pretrained/ship.py /tmp/runs/$m/checkpoint.pt /tmp/ship/$m-resnet18-cifar10.pt
  split -b 15m /tmp/ship/$m-resnet18-cifar10.pt "$OUT/$m.part-"
  cp /tmp/runs/$m/log.jsonl "/tmp/ship/$m-log.jsonl"
done
tar czf "$OUT/logs.tgz" -C /tmp/ship train.log $(cd /tmp/ship && ls *.jsonl 2>/dev/null) || true
$py pretrained/model_card.py /tmp/ship/*-resnet18-cifar10.pt --device "$DEVICE" --amp-check --json "$OUT/model_card.json" \
  ${CARD_FLAGS:-} 2>&1 | tail -8 | tee -a "$OUT/session.log"
[ -n "${SKIP_BENCH:-}" ] || $py benchmarks/extract.py --device "$DEVICE" --scale "${BENCH_SCALE:-5}" --repeats 5 2>&1 | tail -8 | tee -a "$OUT/session.log"
ls -la "$OUT"

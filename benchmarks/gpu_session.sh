#!/usr/bin/env bash
# One prepared run on a lent GPU machine; every result is written under $OUT.
# Data travel in the ignored folder .gpu_data (CIFAR-10 and a 400-image Imagenette subset), made by
# benchmarks/make_gpu_data.py; the call: run(command="bash benchmarks/gpu_session.sh", carry=[".gpu_data"]).
#
# STEPS (space-separated, run in this order) picks the work; the default fits about 10 minutes on an H200:
#   bench_train  benchmarks/train.py on the GPU: EMP-SSL's loop vs the trainer vs the bare step, eager
#                and with --compile (issue 11)
#   emp_ssl      EMP-SSL's one-epoch CIFAR-10 recipe with --method emp-ssl, then its evaluation (mean of
#                20 augmented patches' 4096-d pre_feature, EMP-SSL's linear probe), the model in $OUT (issue 11)
#   ship         train the shipped vicreg/bagssl models and measure their model cards (issue 12)
#   bench_extract  benchmarks/extract.py on the GPU
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 SSL_PATCH_ANALYSIS_DATA=$PWD/.gpu_data SSL_PATCH_ANALYSIS_CACHE=/tmp/cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-bench_train emp_ssl}
py=${PYTHON:-python3}
log() { tee -a "$OUT/session.log"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"; } | log

bench_train() {
  $py benchmarks/train.py --device "$DEVICE" --emp-batch 100 --vicreg-batch 1024 --steps 20 \
      --json "$OUT/bench_train.json" 2>&1 | grep -v "epoch \|checkpoint:" | tail -5 | log
  $py benchmarks/train.py --device "$DEVICE" --emp-batch 100 --vicreg-batch 1024 --steps 20 --compile \
      --json "$OUT/bench_train_compile.json" 2>&1 | grep -v "epoch \|checkpoint:" | tail -5 | log
}

emp_ssl() {
  local run=/tmp/runs/emp-ssl
  $py -m ssl_patch_analysis.train --method emp-ssl --data cifar10 --epochs 1 --schedule-epochs 2 \
      --knn-test-size 10000 --run-dir "$run" 2>&1 | tail -3 | log
  cp "$run/log.jsonl" "$OUT/emp-ssl-log.jsonl"
  $py pretrained/ship.py "$run/checkpoint.pt" /tmp/emp-ssl.pt && split -b 15m /tmp/emp-ssl.pt "$OUT/emp-ssl.part-"
  $py -m ssl_patch_analysis.evaluate --model "$run/checkpoint.pt" --data cifar10 --layers pre_feature \
      --protocols 20 --k 20,200 --probe emp-ssl --augment-patches emp-ssl --out "$OUT/emp-ssl-eval" \
      --no-progress 2>&1 | tail -12 | log
}

ship() {
  mkdir -p /tmp/ship
  PYTHON=$py pretrained/train_shipped.sh /tmp/runs --device "$DEVICE" ${TRAIN_FLAGS:-} > /tmp/ship/train.log 2>&1
  tail -4 /tmp/ship/train.log | log
  for m in vicreg bagssl; do
    [ -f /tmp/runs/$m/checkpoint.pt ] || continue
    $py pretrained/ship.py /tmp/runs/$m/checkpoint.pt /tmp/ship/$m-resnet18-cifar10.pt
    split -b 15m /tmp/ship/$m-resnet18-cifar10.pt "$OUT/$m.part-"
    cp /tmp/runs/$m/log.jsonl "/tmp/ship/$m-log.jsonl"
  done
  tar czf "$OUT/logs.tgz" -C /tmp/ship train.log $(cd /tmp/ship && ls *.jsonl 2>/dev/null) || true
  $py pretrained/model_card.py /tmp/ship/*-resnet18-cifar10.pt --device "$DEVICE" --amp-check \
      --json "$OUT/model_card.json" ${CARD_FLAGS:-} 2>&1 | tail -8 | log
}

bench_extract() {
  $py benchmarks/extract.py --device "$DEVICE" --scale "${BENCH_SCALE:-5}" --repeats 5 2>&1 | tail -8 | log
}

for step in $STEPS; do
  echo "== $step $(date +%T)" | log
  "$step"
done
echo "== done $(date +%T)" | log
ls -la "$OUT"

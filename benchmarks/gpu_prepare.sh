#!/usr/bin/env bash
# Before a device call: what travels to the device machine (tracked files, untracked files git does not
# ignore, and the carried .gpu_data) must stay under 64 MiB. The shipped models (pretrained/*.pt, about 110 MB)
# and the committed figures (figures/, about 7 MB) are tracked and the device needs neither (the 'models' step
# trains new models; no step reads the figures), so they leave the index for the call and come back after it.
# Do not commit in between.
#   benchmarks/gpu_prepare.sh            # .gpu_data (CIFAR-10; IMAGENETTE=400 adds Imagenette), untrack the
#                                        # models and figures, check the size that travels
#   device run(command="bash benchmarks/gpu_session.sh", carry=[".gpu_data"], timeout_s=...)
#   benchmarks/gpu_prepare.sh restore    # models and figures back in the index (copy new models over them first)
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-common-dir)/info/exclude
mkdir -p "$(dirname "$exclude")"; touch "$exclude"
LIMIT=$((64 * 1024 * 1024))

if [ "${1:-}" = restore ]; then
  sed -i -e '\#^/pretrained/\*\.pt$#d' -e '\#^/figures/$#d' "$exclude"
  git reset -q -- pretrained figures
  git status --short pretrained figures
  exit 0
fi

grep -qxF '/.gpu_data/' "$exclude" || echo '/.gpu_data/' >> "$exclude"
[ -f .gpu_data/cifar10_jpeg.npz ] || ${PYTHON:-.venv/bin/python} benchmarks/make_gpu_data.py \
    --imagenette-images "${IMAGENETTE:-0}"
grep -qxF '/pretrained/*.pt' "$exclude" || echo '/pretrained/*.pt' >> "$exclude"
grep -qxF '/figures/' "$exclude" || echo '/figures/' >> "$exclude"
git rm -q --cached --ignore-unmatch pretrained/*.pt
git rm -q -r --cached --ignore-unmatch figures
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb | tail -1 | cut -f1)
data=$(du -sb .gpu_data | cut -f1)
echo "travels: working tree $((tree / 1048576)) MiB + .gpu_data $((data / 1048576)) MiB = $(((tree + data) / 1048576)) MiB (limit 64)"
if [ $((tree + data)) -ge $LIMIT ]; then
  echo "error: over the device tool's 64 MiB; run 'benchmarks/gpu_prepare.sh restore', then make less travel" >&2
  exit 1
fi

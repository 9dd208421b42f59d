#!/usr/bin/env bash
# The GPU checks, as one prepared script for the lent device machine (see ../shared/notes/device.md):
# DeepSpeed fp16 training throughput (issue: trainer) and batched serving throughput (issue: serving), each
# against its plain diffusers baseline, on the random SD-1.5-sized model. Tables go to stdout, JSON to $OUT.
#
#   here:   ../shared/tools/device-bundle.sh .gpu && cp .venv/lib/python3*/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz .gpu/
#           echo /.gpu/ >> .git/info/exclude
#   device: run(command="bash bench/device_run.sh", carry=[".gpu"], timeout_s=600)
#
# About 8 minutes on an H200: model build ~1 min, serving ~2 min, training ~4-5 min. `ONLY=serve|train` runs one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash .gpu/install.sh >/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
vocab=(--clip-bpe .gpu/bpe_simple_vocab_16e6.txt.gz)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
only=${ONLY:-all}
if [ "$only" = all ] || [ "$only" = serve ]; then
  python bench/serve_throughput.py --model sd15 "${vocab[@]}" --out "$OUT/serve_throughput.json" 2>&1 | grep -v "it/s]"
fi
if [ "$only" = all ] || [ "$only" = train ]; then
  python bench/train_throughput.py --model sd15 --precision fp16 "${vocab[@]}" --out "$OUT/train_throughput.json" 2>&1 |
    grep -v "it/s]"
fi

#!/usr/bin/env bash
# bench/reproduce_small.py at GPU scale, meant to fit in 10 minutes of one H100: a ViT-Tiny (12 blocks, width 192) on
# 128 px layouts in 8 x 8 patches of 16 px, 8,192 training images, 40 epochs at batch 256 in bf16, 3 seeds, both
# variants, evaluated on the GPU. Prints the same table as the CPU run; docs/experiments.md says what to expect.
#   bash bench/reproduce_gpu.sh            (PYTHON=... picks the interpreter; more options go to the script)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null; then
    echo "reproduce_gpu: nvidia-smi not found; this is the GPU-scale run (bench/reproduce_small.py is the CPU one)" >&2
    exit 2
fi
exec $python bench/reproduce_small.py --out runs/reproduce_gpu --img-size 128 --images 8192 --epochs 40 \
    --probe-epochs 90 --seg-epochs 25 "$@" model.size=tiny model.patch_size=16 engine.precision=bf16 \
    optim.global_batch=256 optim.micro_batch=256 optim.warmup_epochs=4 data.num_workers=8 checkpoint.every_epochs=10

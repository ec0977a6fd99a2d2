#!/usr/bin/env bash
# One-shot check of a GPU machine, under 5 minutes on one H100 / H200, installing nothing and reaching no network:
# bf16 matches fp32 through the DeepSpeed engine; images/s and MFU of ViT-B/16 vanilla vs proxy (MaskFeat and BEiT
# targets, batch 256, 224 px), eager and compiled; the training engine's own speed; the FFCV loader's rate.
#   bash bench/gpu_check.sh            (PYTHON=... to pick the interpreter; the project must be importable)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$SECONDS
if ! $python -c "import deepspeed, timm, smim_dist" 2>/dev/null; then
    echo "gpu_check: '$python' cannot import deepspeed, timm and smim_dist; run it with the project's environment" \
        "(pip install -e . or the docker image), or point PYTHON at one" >&2
    exit 2
fi
if ! command -v nvidia-smi >/dev/null; then
    echo "gpu_check: nvidia-smi not found; this check is for a machine with an NVIDIA GPU and its driver" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
failed=()
part() {  # one failing part does not stop the others: the whole report comes back from one run
    local name=$1
    shift
    echo "== $name"
    "$@" || failed+=("$name")
}
part "numerics and the training engine" $python bench/gpu_check.py --batch 256
part "step: vanilla vs proxy, eager bf16" $python bench/step.py --sizes base --batch 256 --dtype bf16 \
    --targets maskfeat beit --warmup 3 --rounds 3 --steps 5
part "step: vanilla vs proxy, torch.compile bf16" $python bench/step.py --sizes base --batch 256 --dtype bf16 \
    --targets maskfeat --compile --warmup 3 --rounds 3 --steps 5
if $python -c "import ffcv" 2>/dev/null; then
    part "loader" $python bench/loader.py --images 1024 --workers "$(nproc)" --batch 256
else
    echo "== loader"
    echo "FFCV is not importable with $python: loader rate skipped (the project's docker image has it)"
fi
echo "gpu_check finished in $((SECONDS - start)) s"
if ((${#failed[@]})); then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi

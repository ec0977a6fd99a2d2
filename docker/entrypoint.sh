#!/usr/bin/env bash
# The image's entrypoint: sets up what smim_dist needs at run time, then execs the command it is given, so that the
# command receives SIGTERM (docker stop, Kubernetes, SLURM) directly. See docs/launching.md, "Containers".
set -euo pipefail

usage() {
  cat <<'EOF'
usage: docker run [docker options] IMAGE COMMAND [ARGS...]   (or: apptainer run IMAGE.sif COMMAND [ARGS...])
The commands are the same as outside the container, run from /opt/smim_dist, for example:
  smim-train --config configs/demo_cpu.yaml
  python launchers/local.py --nproc 8 --config configs/beit_proxy.yaml data.path=/data/in1k_train.beton
  smim-eval knn --checkpoint runs/demo_cpu
  torchrun --nnodes 2 --nproc_per_node 8 ... -m smim_dist.train --config ...
Mount data and runs: -v /data:/data -v "$PWD/runs":/opt/smim_dist/runs (docs/launching.md, "Containers").
EOF
}
case "${1:-}" in ""|-h|--help) usage; exit 0 ;; esac

# Apptainer and Enroot may hand the host's PATH to the container.
venv=${SMIM_VENV:-/opt/venv}
case ":$PATH:" in *":$venv/bin:"*) ;; *) [ -d "$venv/bin" ] && PATH="$venv/bin:$PATH" ;; esac
export PATH

# Another uid than smim's (docker --user, Kubernetes runAsUser) may have no writable home; the caches below need one.
if ! { [ -n "${HOME:-}" ] && mkdir -p "$HOME" && [ -w "$HOME" ]; } 2>/dev/null; then
  export HOME=${TMPDIR:-/tmp}/smim-home-$(id -u)
  mkdir -p "$HOME"
fi
# DeepSpeed's JIT-compiled ops and numba's compiled functions (the project's source in the image is read-only).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$HOME/.cache/numba}
DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
export DS_ACCELERATOR

exec "$@"

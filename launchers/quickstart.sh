#!/usr/bin/env bash
# Sets everything up on a fresh Debian/Ubuntu machine (root, Python 3.11) and runs the CPU demo or the test suite:
#   bash launchers/quickstart.sh demo [config overrides...]
#   bash launchers/quickstart.sh test [pytest args...]   (the full suite: both tiers, as CI runs it)
# Idempotent: system packages and the virtual environment (.venv) are installed once and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
[ $# -gt 0 ] && shift
case "$mode" in demo|test) ;; *) echo "usage: bash launchers/quickstart.sh demo|test [args...]" >&2; exit 2 ;; esac

log() { printf '[quickstart] %s\n' "$*" >&2; }
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

# System packages: a C++ toolchain and Python headers (DeepSpeed JIT-compiles a small communication op on first use;
# FFCV builds against the system's OpenCV and libjpeg-turbo and links them at run time), venv support for Debian's
# own Python.
need=()
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
command -v pkg-config >/dev/null || need+=(pkg-config)
pkg-config --exists libturbojpeg 2>/dev/null || need+=(libturbojpeg0-dev)
pkg-config --exists opencv4 2>/dev/null || need+=(libopencv-dev)
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  || need+=(python3-dev)
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  log "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# Python environment, reinstalled only when the project's requirements change.
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log "creating .venv and installing smim_dist with its dependencies (first time: a few minutes)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(.venv/bin/python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}

if [ "$mode" = demo ]; then
  log "pre-training the demo (configs/demo_cpu.yaml); run directory runs/demo_cpu"
  exec .venv/bin/smim-train --config configs/demo_cpu.yaml "$@"
fi
log "lint (ruff, configured in pyproject.toml)"
.venv/bin/ruff check --quiet smim_dist launchers bench tests || exit 1
set +e
# three workers on two cores (many end-to-end tests wait on jobs, signals and schedulers); tests sharing the SLURM
# cluster or a module's reference runs stay on one (tests/conftest.py)
.venv/bin/python -m pytest --full -n 3 --dist loadgroup -m "not container" "$@"
rest=$?
log "the container image (tests/container): built with podman, then run; alone, as its build takes both cores"
.venv/bin/python -m pytest --full -m container "$@"
image=$?
[ $rest -eq 5 ] && [ $image -eq 5 ] && { log "pytest collected no tests: that is a failure"; exit 1; }
for status in $rest $image; do [ $status -ne 0 ] && [ $status -ne 5 ] && exit $status; done
exit 0

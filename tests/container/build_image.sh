#!/usr/bin/env bash
# Builds docker/Dockerfile with rootful podman on a Debian machine with no Docker engine and no registry reachable,
# only Debian's archive and PyPI (CI's), and tags it; does nothing when the tag exists (the same inputs were built).
#   bash tests/container/build_image.sh CONTEXT_DIR TAG      (root; CONTEXT_DIR: the build context, staged by the test)
# Prints the build's figures on stderr. SMIM_CONTAINER_WORK (default /var/tmp/smim-container) keeps podman's settings.
set -euo pipefail
context=$(cd "$1" && pwd)
tag=$2
work=${SMIM_CONTAINER_WORK:-/var/tmp/smim-container}
mkdir -p "$work"
log() { printf '[build_image] %s\n' "$*" >&2; }

# podman, and runc instead of podman's default crun, which refuses these machines' hybrid cgroup layout ("cgroups in
# hybrid mode not supported"); mmdebstrap for the base image.
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v runc >/dev/null; then
  log "installing podman, buildah, runc and mmdebstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -q podman buildah runc mmdebstrap >/dev/null
fi

# Settings through CONTAINERS_CONF, nothing written to /etc/containers. Without CAP_SYS_RESOURCE podman's default
# rlimits (nofile 1048576) fail with "setrlimit ... Operation not permitted": ask for what is allowed here.
cat > "$work/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$work/containers.conf

if podman image exists "$tag"; then
  log "$tag exists (built from the same inputs): not built again"
  exit 0
fi

# The Dockerfile's base, python:3.11.14-slim-bookworm, when a registry serves it; else a stand-in: Debian 12 minbase
# with Debian's Python 3.11 (python-is-python3: the Dockerfile calls `python`; python3-dev: Python.h for FFCV).
base=docker.io/library/python:3.11.14-slim-bookworm
if ! podman image exists "$base" && ! timeout 60 podman pull -q "$base" >/dev/null 2>&1; then
  base=localhost/debian-py311:bookworm
  if ! podman image exists "$base"; then
    log "no registry: making $base with mmdebstrap"
    rm -f "$work/rootfs.tar"
    mmdebstrap --quiet --variant=minbase \
      --include=python3.11,python3-venv,python3-pip,python-is-python3,python3-dev,ca-certificates \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
      bookworm "$work/rootfs.tar" \
      'deb http://deb.debian.org/debian bookworm main' \
      'deb http://deb.debian.org/debian bookworm-updates main' \
      'deb http://deb.debian.org/debian-security bookworm-security main'
    podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$work/rootfs.tar" "$base" >/dev/null
    rm -f "$work/rootfs.tar"
  fi
fi

# This machine's network intercepts TLS: pip in the build trusts the host's CA bundle, mounted into the RUN steps
# only. --format docker: with the default OCI format buildah ignores the Dockerfile's SHELL (pipefail) with a warning.
# PyPI's torch for Linux x86_64 is the CUDA build the image wants; PyTorch's own index is not reachable here.
cat > "$work/pip.conf" <<'CONF'
[global]
cert = /etc/ssl/host-ca.crt
default-timeout = 180
CONF
log "building $tag from $context on $base"
start=$(date +%s)
(cd "$context" && podman build --pull=never --format docker -f docker/Dockerfile -t "$tag" \
  --build-arg BASE_IMAGE="$base" --build-arg TORCH_INDEX=https://pypi.org/simple \
  --build-arg REVISION="${SMIM_REVISION:-unknown}" \
  -v "$work/pip.conf:/etc/pip.conf:ro" -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro \
  .) > "$work/build.log" 2>&1 || { tail -n 60 "$work/build.log" >&2; log "build failed (log: $work/build.log)"; exit 1; }
log "built in $(( $(date +%s) - start )) s: $(podman image inspect "$tag" --format '{{.Size}}') bytes"
# Earlier test images go; the builder stage's layers (about 8 GB) stay a day, as the cache of the next build.
podman images --format '{{.Repository}}:{{.Tag}}' | { grep "^${tag%%:*}:" || true; } | { grep -vx "$tag" || true; } \
  | xargs -r podman rmi >/dev/null
podman image prune -f --filter until=24h >/dev/null

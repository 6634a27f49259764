#!/usr/bin/env bash
# Build the image with Podman on a machine without a Docker engine or registry:
# the base comes from image/make-base.sh (debootstrap + podman import, cached).
#
# Usage: image/build.sh [TAG] [extra podman build args...]
#   default TAG localhost/copilot_here-secure:test
# Env: SP_BASE_IMAGE (skip make-base and use this base), SP_PIP_CA (CA bundle for
#      pip and npm inside the build; default /etc/ssl/certs/ca-certificates.crt when
#      present), SP_INSTALL_COPILOT (default false: the debootstrap base has no npm).
# Prints the tag on stdout; podman's output goes to stderr.
#
# --runtime runc: crun refuses this machine's hybrid cgroups. The explicit ulimits:
# Podman's default RLIMIT_NOFILE is above the hard limit here, runc fails with
# "error setting rlimit type 7". --format docker keeps the HEALTHCHECK.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/copilot_here-secure:test}
shift || true

base=${SP_BASE_IMAGE:-$(image/make-base.sh)}
ca=${SP_PIP_CA:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[[ -s $ca ]] && secret=(--secret "id=pip_ca,src=$ca")

echo "[build] $TAG on $base" >&2
podman build \
  --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --format docker --layers \
  --build-arg "BASE_IMAGE=$base" \
  --build-arg "INSTALL_COPILOT=${SP_INSTALL_COPILOT:-false}" \
  --build-arg "VCS_REF=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "${secret[@]}" \
  --tag "$TAG" \
  "$@" . >&2
echo "$TAG"

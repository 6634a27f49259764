#!/usr/bin/env bash
# A stand-in for node:20-bookworm-slim (which this machine cannot pull): the
# debootstrap base (image/make-base.sh) with Debian's nodejs and npm. Used to measure
# what the runtime adds to a base that has Node (BENCHMARKS.md, "Image size"):
#
#   base=$(image/make-node-base.sh)
#   SP_BASE_IMAGE=$base image/build.sh localhost/copilot_here-secure:node
#
# Usage: image/make-node-base.sh [TAG]   (default localhost/bookworm-node)
# Prints the image reference on stdout; podman's output goes to stderr. Reused when
# present for the same minbase key.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/bookworm-node}
minbase=$(image/make-base.sh)
ref="$TAG:${minbase##*:}"
if podman image exists "$ref"; then
  echo "[make-node-base] image $ref present" >&2
  echo "$ref"
  exit 0
fi
echo "[make-node-base] $minbase + nodejs npm -> $ref" >&2
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cat >"$ctx/Containerfile" <<CONTAINERFILE
FROM $minbase
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
CONTAINERFILE
podman build \
  --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --format docker --tag "$ref" "$ctx" >&2
podman tag "$ref" "$TAG:latest"
echo "$ref"

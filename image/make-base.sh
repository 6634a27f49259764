#!/usr/bin/env bash
# Make (or reuse) a Debian bookworm base image for Podman without a registry:
#   debootstrap --variant=minbase bookworm  ->  tarball  ->  podman import.
#
# Usage: image/make-base.sh [TAG]          (default localhost/bookworm-minbase)
# Prints the image reference (TAG:KEY) on stdout; progress goes to stderr.
#
# The rootfs tarball is cached under $SP_IMAGE_CACHE (default
# /var/cache/secure-proxy-image), keyed by the debootstrap config and the ISO week,
# so a warm run takes a second and a cold one refreshes security fixes weekly.
# Set SP_BASE_KEY to pin a key (e.g. to reuse an older tarball offline).
set -euo pipefail

TAG=${1:-localhost/bookworm-minbase}
SUITE=${SP_BASE_SUITE:-bookworm}
# The Debian mirrors this machine's apt already uses (a corporate mirror works
# the same way), unless given.
host_mirror() {  # $1: debian | debian-security; prints nothing when there is none
  local sources
  sources=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  grep -E '^(URIs:|deb )' <<<"$sources" | grep -oE "https?://[^ ]+/$1/?( |\$)" \
    | head -n 1 | tr -d ' ' || true
}
MIRROR=${SP_BASE_MIRROR:-$(host_mirror debian)}
SECURITY_MIRROR=${SP_BASE_SECURITY_MIRROR:-$(host_mirror debian-security)}
if [[ -z $MIRROR || -z $SECURITY_MIRROR ]]; then
  echo "[make-base] no Debian mirror in /etc/apt sources: set SP_BASE_MIRROR and SP_BASE_SECURITY_MIRROR" >&2
  exit 1
fi
CACHE=${SP_IMAGE_CACHE:-/var/cache/secure-proxy-image}
PODMAN=(podman)

log() { echo "[make-base] $*" >&2; }

for tool in debootstrap podman; do
  if ! command -v "$tool" >/dev/null; then
    log "installing $tool"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      podman runc debootstrap uidmap >/dev/null
    break
  fi
done

config="suite=$SUITE variant=minbase mirror=$MIRROR arch=$(dpkg --print-architecture)"
hash=$(printf '%s' "$config" | sha256sum | cut -c1-10)
KEY=${SP_BASE_KEY:-$(date -u +%G-w%V)-$hash}
tarball="$CACHE/$SUITE-minbase-$KEY.tar"
ref="$TAG:$KEY"

if "${PODMAN[@]}" image exists "$ref"; then
  log "image $ref present"
  "${PODMAN[@]}" tag "$ref" "$TAG:latest"
  echo "$ref"
  exit 0
fi

mkdir -p "$CACHE"
if [[ ! -s "$tarball" ]]; then
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  log "debootstrap $config -> $root"
  start=$SECONDS
  debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # Like the official debian images: no apt lists or package caches in the base,
  # security and updates suites enabled, no docs/locales pulled in by later installs.
  cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES
  cat >"$root/etc/dpkg/dpkg.cfg.d/01-container-nodoc" <<'NODOC'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
NODOC
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$root/etc/apt/apt.conf.d/01-container-norecommends"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  # Drop the host's resolv.conf/hostname copied by debootstrap: the engine supplies them.
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  tar --numeric-owner --xattrs -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$root"
  trap - EXIT
  log "rootfs cached in $tarball ($((SECONDS - start))s)"
  # Keep the cache small: older keys of the same suite go.
  find "$CACHE" -maxdepth 1 -name "$SUITE-minbase-*.tar" ! -name "$(basename "$tarball")" -delete
fi

log "podman import $tarball -> $ref"
"${PODMAN[@]}" import \
  --change 'CMD ["/bin/bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --message "debootstrap --variant=minbase $SUITE ($KEY)" \
  "$tarball" "$ref" >/dev/null
"${PODMAN[@]}" tag "$ref" "$TAG:latest"
echo "$ref"

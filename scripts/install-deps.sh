#!/usr/bin/env bash
# Installs the Debian packages nixstorefs and its tests need. Idempotent; run as root.
#   fuse3            fusermount3 and mount.fuse3, /dev/fuse permissions
#   erofs-utils      fsck.erofs and dump.erofs, to check the images mkimage writes
#   busybox-static   a static shell for test guests
set -euo pipefail

packages=(fuse3 erofs-utils busybox-static)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The FUSE device: present when the module is loaded (built in on most kernels).
if [ ! -e /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
fi
if [ ! -e /dev/fuse ]; then
  echo "install-deps: /dev/fuse is missing and the fuse module cannot be loaded" >&2
  exit 1
fi

#!/usr/bin/env bash
# Installs what nixstorefs and its tests need. Idempotent; run as root.
# With --runtime, only what the nixstorefs daemon itself needs (fuse3).
#   fuse3              fusermount3 and mount.fuse3, /dev/fuse permissions
#   erofs-utils        fsck.erofs and dump.erofs, to check the images mkimage writes
#   busybox-static     a static shell for test guests
#   qemu-system-x86    the test guests (TCG: no KVM needed)
#   linux-image-amd64  the guest kernel and its modules (virtiofs, erofs, overlay)
#   libcap-ng-dev, libseccomp-dev   to build virtiofsd from crates.io
#   gcc                builds the liblz4 that mkimage -z links (lz4-sys)
#   virtiofsd          (cargo install) serves a nixstorefs mount to guests
set -euo pipefail

runtime_only=false
[ "${1:-}" = "--runtime" ] && runtime_only=true

packages=(fuse3)
$runtime_only || packages+=(erofs-utils busybox-static qemu-system-x86 linux-image-amd64
  libcap-ng-dev libseccomp-dev pkg-config gcc)

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

# virtiofsd is not packaged for Debian 12; crates.io has it. 1.14 builds with the
# toolchain here.
if ! $runtime_only && ! command -v virtiofsd >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" ]; then
  cargo install --locked virtiofsd --version 1.14.0
fi


#!/usr/bin/env bash
# Installs what nixstorefs and its tests need. Idempotent; run as root.
# With --runtime, only what building and running the nixstorefs daemon needs.
#   fuse3              fusermount3 and mount.fuse3, /dev/fuse permissions
#   libcap-ng-dev      links nixstorefs's virtio-fs transport (virtiofsd's library binds
#                      libcap-ng), and builds virtiofsd from crates.io
#   erofs-utils        fsck.erofs and dump.erofs, to check the images mkimage writes
#   busybox-static     a static shell for test guests
#   qemu-system-x86    the test guests (TCG: no KVM needed)
#   linux-image-amd64  the guest kernel and its modules (virtiofs, erofs, overlay)
#   cpio, kmod         guest-init/mkinitramfs.sh builds the test guests' initramfs with them
#   xfsprogs, btrfs-progs   root filesystems for the guest tests of root=
#   libseccomp-dev     to build virtiofsd from crates.io
#   strace             to see that mkimage syncs the output directory after its rename
#   nix-bin            a real Nix (nix-build, nix-store --gc, nix-daemon) for the garbage
#                      collection tests, which use private store and state directories
#   gcc                builds the liblz4 that mkimage -z links (lz4-sys)
#   virtiofsd          (cargo install) serves a nixstorefs mount to guests
set -euo pipefail

runtime_only=false
[ "${1:-}" = "--runtime" ] && runtime_only=true

packages=(fuse3 libcap-ng-dev)
$runtime_only || packages+=(erofs-utils busybox-static qemu-system-x86 linux-image-amd64
  libseccomp-dev pkg-config nix-bin strace cpio kmod xfsprogs btrfs-progs gcc)

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


# A second guest kernel whose modules ship compressed (.ko.xz), as the kernels most
# distributions boot do: Debian's bookworm-backports kernel, extracted under
# $NIXSTOREFS_KERNELS (not installed as a host kernel). The guest tests boot both.
if ! $runtime_only; then
  kernels="${NIXSTOREFS_KERNELS:-/var/tmp/nixstorefs-kernels}"
  if ! ls "$kernels"/6.12/boot/vmlinuz-6.12* >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "install-deps: need root to add bookworm-backports for the 6.12 guest kernel" >&2
      exit 1
    fi
    backports=/etc/apt/sources.list.d/nixstorefs-bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      # The same mirror as the machine's own Debian source.
      mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null)
      [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
      [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" >"$backports"
      apt-get update -qq
    fi
    # The newest generic (not -rt or -cloud) 6.12 image package; its name carries the ABI.
    # Debian serves 6.12 for bookworm from bookworm-security as well as from backports,
    # so either suite may be the one that has it.
    package=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+[a-z0-9.]+-amd64$' |
      awk '{print $1}' | sort -V | tail -n 1)
    if [ -z "$package" ]; then
      echo "install-deps: bookworm-backports has no linux-image-6.12*-amd64 package" >&2
      exit 1
    fi
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true # apt downloads as _apt where it can
    (cd "$tmp" && apt-get download -qq "$package")
    rm -rf "$kernels/6.12.partial"
    mkdir -p "$kernels"
    dpkg-deb -x "$tmp"/*.deb "$kernels/6.12.partial"
    # The package leaves modules.dep to its postinst: make it as that would.
    for dir in "$kernels"/6.12.partial/lib/modules/*; do
      depmod -b "$kernels/6.12.partial" "$(basename "$dir")"
    done
    rm -rf "$tmp" "$kernels/6.12"
    mv "$kernels/6.12.partial" "$kernels/6.12"
  fi
fi

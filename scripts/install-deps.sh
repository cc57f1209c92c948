#!/usr/bin/env bash
# Installs what nixstorefs and its tests need. Idempotent; run as root.
# With --runtime, only what building and running the nixstorefs daemon needs.
#   fuse3              fusermount3 and mount.fuse3, /dev/fuse permissions
#   libcap-ng-dev      links nixstorefs's virtio-fs transport (virtiofsd's library binds
#                      libcap-ng), and builds virtiofsd from crates.io
#   erofs-utils        fsck.erofs and dump.erofs, to check the images mkimage writes
#   busybox-static     a static shell for test guests
#   qemu-system-x86    the test guests (TCG: no KVM needed)
#   linux-image-amd64  the guest kernel and its modules (virtiofs, erofs, overlay); two
#                      more are extracted below
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


# Guest kernels besides the host's, extracted from Debian's packages under
# $NIXSTOREFS_KERNELS (never installed as host kernels); the guest tests boot them all:
#   6.12/    Debian 12's 6.12 (bookworm-backports, or bookworm-security where newer), whose
#            modules ship compressed (.ko.xz), as the kernels most distributions boot do;
#   newest/  the newest Linux Debian 13's backports carry (linux-binary-*, linux-modules-*
#            and linux-base-*, laid out under /usr/lib/modules), .ko.xz, virtio-fs built in.
# apt fetches them with a configuration of its own (a sources list, package lists and a
# download cache under $kernels/.apt/NAME): the machine's apt sources are never changed.
if ! $runtime_only; then
  kernels="${NIXSTOREFS_KERNELS:-/var/tmp/nixstorefs-kernels}"
  # Earlier versions of this script added bookworm-backports to the machine's sources.
  rm -f /etc/apt/sources.list.d/nixstorefs-bookworm-backports.sources 2>/dev/null || true

  # The same mirrors as the machine's own Debian sources.
  debian_uri() { # SUFFIX (debian or debian-security) DEFAULT
    local uri
    uri=$(awk -v s="$1" '/^URIs:/ && $2 ~ ("/" s "/?$") {print $2; exit}' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk -v s="$1" '$1 == "deb" && $2 ~ ("/" s "/?$") {print $2; exit}' \
      /etc/apt/sources.list 2>/dev/null || true)
    echo "${uri:-$2}"
  }
  mirror=$(debian_uri debian http://deb.debian.org/debian)
  security=$(debian_uri debian-security http://deb.debian.org/debian-security)

  # private_apt NAME "URI SUITE"...: a private apt configuration for these suites (main
  # only), its package lists updated; sets apt_opts for apt-get and apt-cache.
  private_apt() {
    local dir="$kernels/.apt/$1" line
    shift
    mkdir -p "$dir/lists/partial" "$dir/archives/partial"
    : >"$dir/sources.list"
    for line in "$@"; do
      printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s main\n' \
        "$line" >>"$dir/sources.list"
    done
    # apt downloads as _apt where it can.
    chown -R _apt "$dir/lists" "$dir/archives" 2>/dev/null || true
    # No binary caches either: the machine's /var/cache/apt keeps describing its own
    # sources.
    apt_opts=(-o "Dir::Etc::sourcelist=$dir/sources.list" -o Dir::Etc::sourceparts=-
      -o "Dir::State::lists=$dir/lists" -o "Dir::Cache::archives=$dir/archives"
      -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Architecture=amd64)
    apt-get "${apt_opts[@]}" update -qq
  }

  # extract NAME PACKAGE...: downloads the packages and unpacks them into $kernels/NAME,
  # with boot/vmlinuz-<release> and lib/modules/<release>/modules.dep as an installed
  # kernel has them.
  extract() {
    local name=$1 tmp partial="$kernels/$1.partial" dir release
    shift
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "$@")
    rm -rf "$partial"
    mkdir -p "$partial"
    for deb in "$tmp"/*.deb; do
      dpkg-deb -x "$deb" "$partial"
    done
    # Newer packages keep everything under /usr/lib/modules/<release>: give them the
    # merged-/usr link and /boot layout that depmod, modprobe and the tests look for.
    if [ -d "$partial/usr/lib/modules" ] && [ ! -e "$partial/lib" ]; then
      ln -s usr/lib "$partial/lib"
    fi
    for dir in "$partial"/lib/modules/*; do
      release=$(basename "$dir")
      if [ ! -e "$partial/boot/vmlinuz-$release" ]; then
        mkdir -p "$partial/boot"
        for image in "$dir/vmlinuz" "$dir/vmlinuz.unsigned"; do
          [ -f "$image" ] && ln -f "$image" "$partial/boot/vmlinuz-$release" && break
        done
      fi
      # The packages leave modules.dep to their postinst: make it as that would.
      depmod -b "$partial" "$release"
    done
    ls "$partial"/boot/vmlinuz-* >/dev/null 2>&1 || {
      echo "install-deps: no kernel image in $*" >&2
      exit 1
    }
    rm -rf "$tmp" "$kernels/$name"
    mv "$partial" "$kernels/$name"
  }

  if ! ls "$kernels"/6.12/boot/vmlinuz-6.12* >/dev/null 2>&1; then
    # Debian serves 6.12 for bookworm from bookworm-security as well as from backports:
    # the newest of either.
    private_apt bookworm-6.12 "$mirror bookworm-backports" "$security bookworm-security"
    # The newest generic (not -rt or -cloud) image package; its name carries the ABI.
    package=$(apt-cache "${apt_opts[@]}" search --names-only \
      '^linux-image-6\.12\.[0-9]+\+[a-z0-9.]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
    if [ -z "$package" ]; then
      echo "install-deps: bookworm-backports has no linux-image-6.12*-amd64 package" >&2
      exit 1
    fi
    extract 6.12 "$package"
  fi

  if ! ls "$kernels"/newest/boot/vmlinuz-* >/dev/null 2>&1; then
    private_apt trixie-backports "$mirror trixie-backports"
    # The newest generic release; its image is linux-binary-<release> (signed) or
    # linux-binary-unsigned-<release>, beside linux-modules-<release> and
    # linux-base-<release> (modules.builtin).
    release=$(apt-cache "${apt_opts[@]}" search --names-only \
      '^linux-modules-[0-9]+\.[0-9.]+\+[a-z0-9.]+-amd64$' | awk '{print $1}' |
      sed 's/^linux-modules-//' | sort -V | tail -n 1)
    if [ -z "$release" ]; then
      echo "install-deps: trixie-backports has no linux-modules-*-amd64 package" >&2
      exit 1
    fi
    binary=linux-binary-$release
    apt-cache "${apt_opts[@]}" show "$binary" >/dev/null 2>&1 ||
      binary=linux-binary-unsigned-$release
    extract newest "$binary" "linux-modules-$release" "linux-base-$release"
  fi
fi

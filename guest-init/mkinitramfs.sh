#!/usr/bin/env bash
# Builds an initramfs with guest-init as /init for one kernel, its modules copied as the
# kernel package ships them (.ko, .ko.xz, .ko.zst or .ko.gz).
#
#   guest-init/mkinitramfs.sh GUEST_INIT MODULES_DIR OUTPUT [MODULE...]
#
# MODULES_DIR is the kernel's /lib/modules/<version> (installed, or extracted from a
# package anywhere). The store's modules are always included; list more (the root's
# filesystem, e.g. ext4) after OUTPUT. Needs modprobe (kmod) and cpio.
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 GUEST_INIT MODULES_DIR OUTPUT [MODULE...]" >&2
  exit 2
fi
guest_init=$1 modules_dir=${2%/} output=$3
shift 3
version=$(basename "$modules_dir")
# modprobe wants the directory that holds lib/modules/<version>.
base=$(dirname "$(dirname "$(dirname "$modules_dir")")")
[ -f "$modules_dir/modules.dep" ] || { echo "$0: no $modules_dir/modules.dep" >&2; exit 1; }
[ -x "$guest_init" ] || { echo "$0: $guest_init is not an executable" >&2; exit 1; }

tree=$(mktemp -d)
partial="$output.partial"
trap 'rm -rf "$tree" "$partial"' EXIT

mkdir -p "$tree/dev" "$tree/proc" "$tree/sys" "$tree/run" "$tree/nix" "$tree/tmp" \
  "$tree/lib/modules/$version"
cp "$guest_init" "$tree/init"
# The kernel opens /dev/console for init's output before devtmpfs is mounted.
mknod -m 600 "$tree/dev/console" c 5 1
for index in modules.dep modules.softdep modules.alias modules.builtin; do
  [ -f "$modules_dir/$index" ] && cp "$modules_dir/$index" "$tree/lib/modules/$version/"
done

# The store's modules, what they depend on and their soft dependencies, as modprobe would
# load them; built-in ones have no file. Optional ones (missing from this kernel) are
# skipped one by one. virtio_pmem (with libnvdimm and nd_virtio) and nd_pmem serve
# nixstore=pmem: an image mapped with DAX from a virtio-pmem device.
wanted=(virtio_pci virtio_mmio virtio_blk virtiofs fuse erofs overlay loop crc32c_generic
  virtio_pmem nd_pmem "$@")
for module in "${wanted[@]}"; do
  if ! deps=$(modprobe -d "$base" -S "$version" --show-depends "$module" 2>/dev/null); then
    # crc32c_generic: erofs's checksum, a module up to Linux 6.1, library code since.
    # virtio_pmem, nd_pmem: a kernel without them still serves every other store.
    case " virtio_mmio loop crc32c_generic virtio_pmem nd_pmem " in
      *" $module "*) continue ;;
    esac
    echo "$0: kernel $version has no module $module" >&2
    exit 1
  fi
  awk '$1 == "insmod" {print $2}' <<<"$deps" | while read -r file; do
    # Relative to the module directory, whatever spelling of it modprobe printed.
    rel=${file#*/lib/modules/"$version"/}
    mkdir -p "$tree/lib/modules/$version/$(dirname "$rel")"
    cp "$file" "$tree/lib/modules/$version/$rel"
  done
done

(cd "$tree" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$partial"
mv "$partial" "$output"

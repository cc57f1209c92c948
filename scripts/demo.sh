#!/usr/bin/env bash
# The main job on a sample store, no Nix needed: build, make a sample store, mount exactly
# its closure, look around, unmount. Run as root (or with sudo) on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "demo: cargo is missing; install a Rust toolchain first (https://rustup.rs)" >&2
  exit 1
fi
scripts/install-deps.sh --runtime

cargo build --locked --release --workspace --bins
bin=target/release

sample=${SAMPLE_DIR:-$PWD/sample}
rm -rf "$sample"
"$bin/make-sample-store" --big-mib 64 "$sample"
store="$sample/store"
mnt="$sample/mnt"
mkdir -p "$mnt"

echo
echo "== the host store has $(ls -A "$store" | wc -l) entries; the closure lists $(wc -l < "$sample/closure.txt") paths"
"$bin/nixstorefs" --store-dir "$store" "$sample/closure.txt" "$mnt"
trap 'fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true' EXIT

echo "== mounted:"
grep " $mnt " /proc/self/mounts
echo "== the view shows exactly the closure:"
ls -la "$mnt"
echo "== a program from the closure runs from the mount:"
hello=$(ls -d "$mnt"/*-hello-2.12)
"$hello/bin/hello"
echo "== host files outside the closure are not there:"
for name in .links $(ls -A "$store" | grep -E '\.lock$' | head -2); do
  if [ -e "$mnt/$name" ]; then echo "LEAK: $name" >&2; exit 1; fi
  echo "   $name: absent"
done
echo "== the bytes are the host's:"
big=$(cd "$mnt" && find . -type f -size +1M | head -1)
sha256sum "$store/$big" "$mnt/$big"
echo "== writes fail:"
touch "$hello/new-file" 2>&1 || true
fusermount3 -u "$mnt"
trap - EXIT
echo "== unmounted"

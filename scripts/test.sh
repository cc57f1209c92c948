#!/usr/bin/env bash
# Installs what the tests need, then runs every test of the workspace: unit tests and the
# end-to-end tests of the real binaries (real FUSE mounts). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Mounts left by an earlier run that was killed before its guards ran: the tests mount
# on /tmp/nixstorefs-mnt.* only.
awk '$2 ~ "^/tmp/nixstorefs-mnt\\." {print $2}' /proc/self/mounts | sort -r |
  while read -r m; do umount -l "$m" 2>/dev/null || true; done

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
# --locked everywhere: the tests run against the dependencies the lock files name, never
# against whatever the registry serves that day, and a stale lock file fails the run.
cargo build --locked --workspace --all-targets
# guest-init runs as the /init of test guests: statically linked.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked -p guest-init --target x86_64-unknown-linux-gnu
# Fuzzing first, bounded (FUZZ_SECONDS per target, default 30), so that the test
# runner's summary is the last thing printed.
scripts/fuzz.sh

# FUSE over io_uring is a global switch of the fuse module, off by default: turn it on
# (as root, where the kernel has it) so that the mount tests run over the rings, and put
# the old value back at the end. Where it cannot be turned on, they run over /dev/fuse
# only.
ENABLE_URING=/sys/module/fuse/parameters/enable_uring
if [ -w "$ENABLE_URING" ]; then
  old_uring=$(cat "$ENABLE_URING")
  trap 'echo "$old_uring" > "$ENABLE_URING"' EXIT
  echo Y > "$ENABLE_URING"
fi
ring=dev-fuse
if [ "$(cat "$ENABLE_URING" 2>/dev/null)" = Y ]; then
  ring=io-uring
fi
# The tests that mount, run a second time forced over /dev/fuse (the first run uses the
# rings wherever the kernel offers them).
mount_tests='binary(fuse) | binary(gc) | binary(hostile) | binary(identity) | binary(options) | binary(update) | binary(mkimage) | binary(mkimage_compressed) | binary(bad_input)'

if cargo nextest --version >/dev/null 2>&1; then
  # The transport's own tests flip the switch for a moment: not beside mounts that
  # require the ring.
  NIXSTOREFS_TEST_FUSE_TRANSPORT=$ring \
    cargo nextest run --locked --workspace --profile ci -E 'not binary(fuse_uring)'
  cargo nextest run --locked --workspace --profile ci -E 'binary(fuse_uring)'
  if [ "$ring" != dev-fuse ]; then
    NIXSTOREFS_TEST_FUSE_TRANSPORT=dev-fuse \
      cargo nextest run --locked --workspace --profile ci -E "$mount_tests"
  fi
else
  cargo test --locked --workspace
  if [ "$ring" != dev-fuse ]; then
    NIXSTOREFS_TEST_FUSE_TRANSPORT=dev-fuse cargo test --locked -p nixstorefs-tests \
      --test fuse --test gc --test hostile --test identity --test options --test update \
      --test mkimage --test mkimage_compressed --test bad_input
  fi
fi

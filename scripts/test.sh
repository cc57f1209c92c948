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

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --profile ci
else
  cargo test --locked --workspace
fi

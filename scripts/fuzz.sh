#!/usr/bin/env bash
# Fuzzes the closure parser, the erofs writer and the virtio-fs device (cargo-fuzz, libFuzzer) for a bounded
# time: FUZZ_SECONDS per target (default 30; set it higher to fuzz on demand). Inputs that
# once crashed a target are replayed first (tests/fuzz/regressions). Run as root: the
# erofs target mounts every image it writes.
#
# cargo-fuzz wants a nightly compiler for its sanitizers; without a sanitizer the stable
# compiler does, given RUSTC_BOOTSTRAP for the coverage flags.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
seconds=${FUZZ_SECONDS:-30}

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
# cargo fuzz has no --locked: the fuzz targets' lock file is checked first, so that they
# build against the versions it names and a stale one stops the run instead of being
# rewritten (cargo leaves a lock file that already satisfies the manifests alone).
if ! cargo metadata --locked --format-version 1 --manifest-path tests/fuzz/Cargo.toml >/dev/null; then
  echo "fuzz: tests/fuzz/Cargo.lock is out of date; update it (cargo update --manifest-path tests/fuzz/Cargo.toml -p PACKAGE) and commit it" >&2
  exit 1
fi
fuzz=(cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none)

for target in closure erofs virtiofs; do
  if [ -d "tests/fuzz/regressions/$target" ]; then
    "${fuzz[@]}" "$target" "tests/fuzz/regressions/$target" -- -runs=0
  fi
  echo "fuzz: $target for ${seconds}s"
  log=$(mktemp)
  status=0
  "${fuzz[@]}" "$target" -- -max_total_time="$seconds" >"$log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
    echo "fuzz: $target found a failure (exit $status); the input is under tests/fuzz/artifacts/$target" >&2
    rm -f "$log"
    exit "$status"
  fi
  grep -E '^Done [0-9]+ runs' "$log" | sed "s/^/fuzz: $target: /"
  rm -f "$log"
done

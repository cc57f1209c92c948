#!/bin/sh
# Before/after comparison of sequential reads through the daemon (no passthrough): two
# nixstorefs binaries, each mounting the same closure afresh and reading one file whole
# with dd, interleaved run by run so both see the same moments of a noisy machine.
#
#   scripts/ab-read.sh OLD_BIN NEW_BIN STORE_DIR CLOSURE FILE [RUNS]
#
# FILE is relative to STORE_DIR. Prints one line per binary: its throughputs (dd's
# figures, sorted) and their median. Needs root and /dev/fuse.
set -eu

if [ $# -lt 5 ]; then
    echo "usage: $0 OLD_BIN NEW_BIN STORE_DIR CLOSURE FILE [RUNS]" >&2
    exit 2
fi
old=$1 new=$2 store=$3 closure=$4 file=$5 runs=${6:-7}
mnt=$(mktemp -d /tmp/nixstorefs-ab.XXXXXX)
out=$(mktemp /tmp/nixstorefs-ab-out.XXXXXX)
cleanup() {
    umount "$mnt" 2>/dev/null || true
    rmdir "$mnt"
    rm -f "$out"
}
trap cleanup EXIT INT TERM

i=0
while [ "$i" -lt "$runs" ]; do
    for which in old new; do
        eval bin=\$$which
        "$bin" --no-passthrough --store-dir "$store" "$closure" "$mnt"
        # dd's last line ends in "<rate> <unit>", e.g. "2.4 GB/s"; keep MB/s for sorting.
        rate=$(timeout 120 dd if="$mnt/$file" of=/dev/null bs=1M 2>&1 | tail -n 1 |
            awk '{ r = $(NF-1); u = $NF; if (u == "GB/s") r *= 1000; print r }')
        umount "$mnt"
        echo "$which $rate" >>"$out"
    done
    i=$((i + 1))
done

for which in old new; do
    grep "^$which " "$out" | awk '{ print $2 }' | sort -n | awk -v w="$which" '
        { v[NR] = $1 }
        END {
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            line = ""
            for (i = 1; i <= NR; i++) line = line " " v[i]
            printf "%s: median %s MB/s (runs:%s)\n", w, m, line
        }'
done

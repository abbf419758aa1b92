#!/usr/bin/env bash
# Basalt's iSCSI target against tgt (the baseline) exporting the same backing file, in
# one run, with libiscsi's iscsi-perf: 4 KiB random reads at QD32 and 1 MiB sequential
# reads. Prints a table with the ratio Basalt/tgt.
# Usage: bench/iscsi-vs-tgt.sh [--size-mib N] [--seconds S] [--dir DIR]
# Needs root (installs libiscsi-bin and tgt if missing, runs tgtd).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=1024; secs=10; dir=/tmp
while [ $# -gt 0 ]; do
    case "$1" in
        --size-mib) size_mib="$2"; shift 2 ;;
        --seconds) secs="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
for t in iscsi-perf tgtd; do
    command -v "$t" >/dev/null || apt-get install -y libiscsi-bin tgt || { apt-get update && apt-get install -y libiscsi-bin tgt; }
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-iscsi --example serve
img="$dir/iscsi-bench-lun.img"
[ -f "$img" ] || { truncate -s "${size_mib}M" "$img"; dd if=/dev/urandom of="$img" bs=1M count="$size_mib" conv=notrunc status=none; }
init=iqn.2026-11.test:bench
tgt_iqn=iqn.2026-11.test:tgt
basalt_iqn=iqn.2026-11.test:basalt
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
tgtd -f --iscsi portal=127.0.0.1:3270 >/dev/null 2>&1 & pids+=($!)
sleep 1
tgtadm --lld iscsi --op new --mode target --tid 1 -T "$tgt_iqn"
tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$img"
tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL
"$CARGO_TARGET_DIR/release/examples/serve" --portal 127.0.0.1:3271 --iqn "$basalt_iqn" \
    --file "$img" --initiator "$init" >/dev/null 2>&1 & pids+=($!)
sleep 1
# iscsi-perf ends with "iops average N (X MB/s)".
perf() { # URL BLOCKS [-r]
    timeout $((secs + 10)) iscsi-perf -i "$init" -m 32 -b "$2" -t "$secs" $3 "$1" 2>&1 | tr '\r' '\n' |
        grep -E 'iops average' | tail -1 | sed -E 's/.*iops average ([0-9]+) \(([0-9.]+) MB\/s\).*/\1 \2/'
}
printf '%-28s %14s %14s %8s\n' workload basalt tgt ratio
for w in "4k-randread-qd32 8 -r iops" "1m-seqread-qd32 2048 - mbps"; do
    set -- $w
    flag="$3"; [ "$flag" = "-" ] && flag=""
    b=$(perf "iscsi://127.0.0.1:3271/$basalt_iqn/0" "$2" "$flag")
    t=$(perf "iscsi://127.0.0.1:3270/$tgt_iqn/1" "$2" "$flag")
    if [ "$4" = iops ]; then bv=${b%% *}; tv=${t%% *}; unit=IOPS; else bv=${b##* }; tv=${t##* }; unit=MB/s; fi
    ratio=$(awk -v a="$bv" -v b="$tv" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    printf '%-28s %14s %14s %8s\n' "$1 ($unit)" "$bv" "$tv" "$ratio"
done

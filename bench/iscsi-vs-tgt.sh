#!/usr/bin/env bash
# Basalt's iSCSI target against tgt (the baseline) exporting the same backing file, in
# one run: 4 KiB random reads at QD32 and 1 MiB sequential reads at QD32 with libiscsi's
# iscsi-perf, 1 MiB sequential writes at QD32 with bench/iscsi-load.c (iscsi-perf 1.19
# only reads). Prints one table per mode with the ratio Basalt/tgt.
#
# Like for like: tgt's rdwr backing store reads and writes through the page cache,
# Basalt's UringFile uses O_DIRECT by default. Both modes are measured:
#   buffered  tgt: default rdwr backing store (pread/pwrite, page cache);
#             Basalt: serve --buffered (UringOptions { direct: DirectMode::Off }).
#             The file is read once before the mode starts, so both find it cached.
#   direct    tgt: --bsoflags direct (O_DIRECT); Basalt: serve (O_DIRECT).
# Each workload runs ROUNDS times per target, alternating Basalt and tgt, and the
# median is reported (the machine is shared; alternating spreads load changes over
# both). Beside the throughput, the CPU time each target process used per command
# (user + system, all threads, from /proc/PID/stat) is printed: it varies far less
# with the load of other processes than throughput does.
#
# Usage: bench/iscsi-vs-tgt.sh [--size-mib N] [--seconds S] [--rounds R] [--dir DIR]
#                              [--modes "buffered direct"] [--threads T]
# Needs root (installs libiscsi-bin, libiscsi-dev and tgt if missing, runs tgtd).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=1024; secs=10; dir=/tmp; rounds=3; modes="buffered direct"; threads=2
while [ $# -gt 0 ]; do
    case "$1" in
        --size-mib) size_mib="$2"; shift 2 ;;
        --seconds) secs="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        --modes) modes="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
for t in iscsi-perf tgtd; do
    command -v "$t" >/dev/null || apt-get install -y libiscsi-bin tgt || { apt-get update && apt-get install -y libiscsi-bin tgt; }
done
[ -f /usr/include/iscsi/iscsi.h ] || apt-get install -y libiscsi-dev || { apt-get update && apt-get install -y libiscsi-dev; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-iscsi --example serve
work=$(mktemp -d)
load="$work/iscsi-load"
cc -O2 -o "$load" bench/iscsi-load.c -liscsi
img="$dir/iscsi-bench-lun.img"
[ -f "$img" ] || { truncate -s "${size_mib}M" "$img"; dd if=/dev/urandom of="$img" bs=1M count="$size_mib" conv=notrunc status=none; }
init=iqn.2026-11.test:bench
tgt_iqn=iqn.2026-11.test:tgt
basalt_iqn=iqn.2026-11.test:basalt
tgt_port=3270; basalt_port=3271
# tgtd's own control port, so that tgtadm never talks to another tgtd on the machine.
ctl=3270
tgt_pid=""; basalt_pid=""
stop_all() {
    if [ -n "$tgt_pid" ]; then
        # tgtd ignores SIGTERM while it has targets.
        kill -9 "$tgt_pid" 2>/dev/null || true; wait "$tgt_pid" 2>/dev/null || true; tgt_pid=""
    fi
    if [ -n "$basalt_pid" ]; then
        kill "$basalt_pid" 2>/dev/null || true; wait "$basalt_pid" 2>/dev/null || true; basalt_pid=""
    fi
}
trap 'stop_all; rm -rf "$work"' EXIT
start_all() { # MODE
    local bsflags=() serveflags=()
    if [ "$1" = direct ]; then bsflags=(--bsoflags direct); else serveflags=(--buffered); fi
    tgtd -f -C "$ctl" --iscsi portal=127.0.0.1:$tgt_port >/dev/null 2>&1 & tgt_pid=$!
    sleep 1
    tgtadm -C "$ctl" --lld iscsi --op new --mode target --tid 1 -T "$tgt_iqn"
    tgtadm -C "$ctl" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$img" "${bsflags[@]}"
    tgtadm -C "$ctl" --lld iscsi --op bind --mode target --tid 1 -I ALL
    "$CARGO_TARGET_DIR/release/examples/serve" --portal 127.0.0.1:$basalt_port --iqn "$basalt_iqn" \
        --file "$img" --initiator "$init" --threads "$threads" "${serveflags[@]}" >/dev/null 2>&1 & basalt_pid=$!
    sleep 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# One measurement: prints "VALUE CPU_US_PER_COMMAND". iscsi-perf and iscsi-load both
# end with "iops average N (X MB/s)".
measure() { # PID URL BLOCKS KIND(read|randread|write) UNIT(iops|mbps)
    local pid=$1 url=$2 blocks=$3 kind=$4 unit=$5 out t0 t1 iops mbps
    t0=$(cpu_ticks "$pid")
    case "$kind" in
        randread) out=$(timeout $((secs + 20)) iscsi-perf -i "$init" -m 32 -b "$blocks" -t "$secs" -r "$url" 2>&1 | tr '\r' '\n') ;;
        read) out=$(timeout $((secs + 20)) iscsi-perf -i "$init" -m 32 -b "$blocks" -t "$secs" "$url" 2>&1 | tr '\r' '\n') ;;
        write) out=$(timeout $((secs + 20)) "$load" -i "$init" -m 32 -b "$blocks" -t "$secs" -w "$url" 2>&1) ;;
    esac
    t1=$(cpu_ticks "$pid")
    read -r iops mbps < <(echo "$out" | grep -E 'iops average' | tail -1 |
        sed -E 's/.*iops average ([0-9]+) \(([0-9.]+) MB\/s\).*/\1 \2/')
    local v=$iops; [ "$unit" = mbps ] && v=$mbps
    awk -v v="${v:-0}" -v i="${iops:-0}" -v s="$secs" -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" \
        'BEGIN { n = i * s; printf "%s %.1f\n", v, (n > 0) ? d / hz * 1e6 / n : 0 }'
}
median() { sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print 0; else print a[int((NR + 1) / 2)] }'; }
for mode in $modes; do
    stop_all
    sync
    if [ "$mode" = buffered ]; then cat "$img" >/dev/null; fi
    start_all "$mode"
    echo
    echo "mode: $mode  (tgt: $([ "$mode" = direct ] && echo '--bsoflags direct' || echo 'rdwr, page cache');" \
        "Basalt: $([ "$mode" = direct ] && echo 'O_DIRECT' || echo '--buffered'), $threads tokio workers)"
    printf '%-24s %12s %12s %7s   %14s %14s\n' workload basalt tgt ratio "basalt us/cmd" "tgt us/cmd"
    for w in "4k-randread-qd32 8 randread iops IOPS" "1m-seqread-qd32 2048 read mbps MB/s" \
             "1m-seqwrite-qd32 2048 write mbps MB/s"; do
        set -- $w
        name=$1; blocks=$2; kind=$3; unit=$4; label=$5
        : > "$work/b"; : > "$work/t"
        for _ in $(seq "$rounds"); do
            measure "$basalt_pid" "iscsi://127.0.0.1:$basalt_port/$basalt_iqn/0" "$blocks" "$kind" "$unit" >> "$work/b"
            measure "$tgt_pid" "iscsi://127.0.0.1:$tgt_port/$tgt_iqn/1" "$blocks" "$kind" "$unit" >> "$work/t"
        done
        bv=$(awk '{print $1}' "$work/b" | median); tv=$(awk '{print $1}' "$work/t" | median)
        bc=$(awk '{print $2}' "$work/b" | median); tc=$(awk '{print $2}' "$work/t" | median)
        ratio=$(awk -v a="$bv" -v b="$tv" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
        printf '%-24s %12s %12s %7s   %14s %14s\n' "$name ($label)" "$bv" "$tv" "$ratio" "$bc" "$tc"
        echo "  rounds basalt: $(awk '{printf "%s ", $1}' "$work/b")  tgt: $(awk '{printf "%s ", $1}' "$work/t")"
    done
done

#!/usr/bin/env bash
# Instructions per iSCSI command in Basalt's target, with callgrind (instruction counts
# are repeatable on a loaded machine, unlike wall-clock): `serve` runs under
# valgrind --tool=callgrind, bench/iscsi-load sends COUNT commands after a warm-up, and
# the counters are zeroed before and dumped after, so the dump holds the target's
# user-space instructions (every thread) for exactly COUNT commands plus one login and
# logout, on a memory LUN (valgrind cannot run the io_uring driver thread: it sleeps in
# io_uring_enter holding valgrind's thread lock). Kernel work is not counted: with
# --perf, `serve` runs natively instead (any LUN) and perf stat counts its CPU time
# (task-clock), context switches and system calls by kind over the COUNT commands.
# Usage: bench/iscsi-callgrind.sh [--lun mem|direct|buffered] [--blocks B] [--count N]
#        [--qd Q] [--write] [--out DIR] [--perf]
set -euo pipefail
cd "$(dirname "$0")/.."
lun=mem; blocks=8; count=20000; qd=32; write=""; out=/tmp/iscsi-callgrind; perf=""
while [ $# -gt 0 ]; do
    case "$1" in
        --lun) lun="$2"; shift 2 ;;
        --blocks) blocks="$2"; shift 2 ;;
        --count) count="$2"; shift 2 ;;
        --qd) qd="$2"; shift 2 ;;
        --write) write="-w"; shift ;;
        --out) out="$2"; shift 2 ;;
        --perf) perf=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-iscsi --example serve
mkdir -p "$out"
load="$out/iscsi-load"
cc -O2 -o "$load" bench/iscsi-load.c -liscsi
img="$out/lun.img"
[ -f "$img" ] || { truncate -s 1G "$img"; dd if=/dev/urandom of="$img" bs=1M count=1024 conv=notrunc status=none; }
case "$lun" in
    mem) src=(--mem-mib 1024) ;;
    direct) src=(--file "$img") ;;
    buffered) src=(--file "$img" --buffered) ;;
    *) echo "--lun mem|direct|buffered" >&2; exit 2 ;;
esac
port=3290
iqn=iqn.2026-11.test:callgrind
url="iscsi://127.0.0.1:$port/$iqn/0"
serve="$CARGO_TARGET_DIR/release/examples/serve"
rm -f "$out"/callgrind.out.*
[ -n "$perf" ] || [ "$lun" = mem ] || { echo "callgrind needs --lun mem (use --perf for files)" >&2; exit 2; }
if [ -n "$perf" ]; then
    "$serve" --portal 127.0.0.1:$port --iqn "$iqn" "${src[@]}" >/dev/null 2>&1 &
else
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out.%p" \
        "$serve" --portal 127.0.0.1:$port --iqn "$iqn" "${src[@]}" >"$out/serve.log" 2>&1 &
fi
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    "$load" -n 1 -m 1 -b "$blocks" "$url" >/dev/null 2>&1 && break
    sleep 0.5
done
"$load" -n 2000 -m "$qd" -b "$blocks" $write "$url" >/dev/null
if [ -n "$perf" ]; then
    ev=task-clock,context-switches,raw_syscalls:sys_enter
    for s in sendto sendmsg writev write recvfrom recvmsg readv read epoll_wait io_uring_enter futex; do
        ev="$ev,syscalls:sys_enter_$s"
    done
    perf stat -x, -e "$ev" -p $pid -o "$out/perf.txt" &
    perfpid=$!
    sleep 0.5
    "$load" -n "$count" -m "$qd" -b "$blocks" $write -r "$url"
    kill -INT $perfpid; wait $perfpid || true
    echo "per command (perf stat over $count commands):"
    awk -F, -v n="$count" '$1 ~ /^[0-9.]+$/ && $1 > 0 { u = ($3 == "task-clock") ? "us CPU" : ""; v = $1 / n; if (u != "") v = v * 1000; printf "  %-36s %10.3f %s\n", $3, v, u }' "$out/perf.txt"
    exit 0
fi
callgrind_control -z $pid >/dev/null
"$load" -n "$count" -m "$qd" -b "$blocks" $write -r "$url"
callgrind_control -d $pid >/dev/null
sleep 1
f=$(ls -t "$out"/callgrind.out.* | grep -v '\.[0-9]*$' | head -1 || true)
f=$(ls -t "$out"/callgrind.out.* | head -1)
total=$(callgrind_annotate "$f" 2>/dev/null | grep -m1 -E 'PROGRAM TOTALS' | awk '{gsub(",", "", $1); print $1}')
echo "file: $f"
echo "instructions: $total for $count commands: $((total / count)) per command"
callgrind_annotate "$f" 2>/dev/null | sed -n '1,60p' > "$out/top.txt"

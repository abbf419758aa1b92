#!/usr/bin/env bash
# Lock manager: uncontended acquire latency (CAW round trips and microseconds) and the
# takeover time after a killed host, against VMFS (16 s) and sanlock (140 s).
#
# Usage: bench/lockmgr-bench.sh [--device mem|PATH|iscsi://host/iqn/lun] [--iterations N]
#                               [--takeovers N]
# Without --device, starts Basalt's iSCSI target (targets/iscsi/examples/serve) on a
# file LUN in $LUN_DIR (default /var/tmp: a disk, so FUA writes reach it) on
# 127.0.0.1:$PORT and measures over iSCSI; the killed holder of the takeover runs is a
# `lockmgr-host` process. Any other target must implement COMPARE AND WRITE (tgt does
# not).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin lockmgr-bench --bin lockmgr-host
if [[ " $* " == *" --device "* ]]; then
  exec "$CARGO_TARGET_DIR/release/lockmgr-bench" "$@"
fi
cargo build --release -p basalt-iscsi --example serve
port="${PORT:-$((20000 + $$ % 10000))}"
iqn="iqn.2026-11.org.basalt:lockmgr-bench"
dir="$(mktemp -d "${LUN_DIR:-/var/tmp}/lockmgr-bench.XXXXXX")"
truncate -s 256M "$dir/lun.img"
"$CARGO_TARGET_DIR/release/examples/serve" --portal "127.0.0.1:$port" --iqn "$iqn" \
  --file "$dir/lun.img" 2> "$dir/serve.log" &
serve=$!
trap 'kill $serve 2>/dev/null; wait $serve 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do grep -q serving "$dir/serve.log" && break; sleep 0.1; done
grep -q serving "$dir/serve.log" || { cat "$dir/serve.log"; exit 1; }
echo "target: Basalt iSCSI (serve example), file LUN $dir/lun.img, portal 127.0.0.1:$port"
"$CARGO_TARGET_DIR/release/lockmgr-bench" --device "iscsi://127.0.0.1:$port/$iqn/0" "$@"

#!/usr/bin/env bash
# Lock manager: uncontended acquire latency (CAW round trips and microseconds) and the
# takeover time after a killed host, against VMFS (16 s) and sanlock (140 s).
# Usage: bench/lockmgr-bench.sh [--device mem|PATH|iscsi://host/iqn/lun] [--iterations N]
# The iSCSI target must implement COMPARE AND WRITE (tgt does not).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin lockmgr-bench
exec "$CARGO_TARGET_DIR/release/lockmgr-bench" "$@"

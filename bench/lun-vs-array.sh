#!/usr/bin/env bash
# Thin LUNs against the raw pool device ("the array"): 4 KiB random writes at QD 32 to
# the device, to a fully allocated thin LUN and to a fresh one (allocation on the path),
# on a memory device (CPU cost only) and on a file through io_uring, in one run, with
# ratios; then map lookups per second.
# Usage: bench/lun-vs-array.sh [--backend mem|file|both] [--region-mib N] [--runtime S] ...
# (all flags go to the binary; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin lun-vs-array
exec "$CARGO_TARGET_DIR/release/lun-vs-array" "$@"

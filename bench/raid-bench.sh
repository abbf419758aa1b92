#!/usr/bin/env bash
# RAID benchmarks, side by side with their baselines in one run:
#   raid-parity: P+Q generation and two-data-disk reconstruction (4+2 x 64 KiB, one core)
#                against ISA-L's pq_gen / ec_encode_data, and P alone against xor_gen;
#   raid-array:  a 6-disk RAID6 (sequential read/write, random writes, journal on/off,
#                rebuild rate) against its own members' bandwidth.
# Usage: bench/raid-bench.sh [parity|array|all] [-- flags for the binaries]
# Needs libisal2 (Debian) for the ISA-L side; installs it when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
shift || true
[ "${1:-}" = "--" ] && shift
if ! ldconfig -p | grep -q libisal.so.2; then
    apt-get install -y libisal2 || { apt-get update && apt-get install -y libisal2; } || true
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin raid-parity --bin raid-array
if [ "$what" = parity ] || [ "$what" = all ]; then
    "$CARGO_TARGET_DIR/release/raid-parity" "$@"
fi
if [ "$what" = array ] || [ "$what" = all ]; then
    "$CARGO_TARGET_DIR/release/raid-array" "$@"
fi

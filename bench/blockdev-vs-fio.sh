#!/usr/bin/env bash
# Basalt's io_uring block backend against fio on the same file, side by side.
# Usage: bench/blockdev-vs-fio.sh [--dir DIR] [--size-mib N] [--runtime S] [--rounds N] ...
# (all flags go to the binary; see --help). Needs root only to install fio.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v fio >/dev/null; then
    # Debian's package; refresh the package lists only if the plain install fails.
    apt-get install -y fio || { apt-get update && apt-get install -y fio; }
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin blockdev-vs-fio
exec "$CARGO_TARGET_DIR/release/blockdev-vs-fio" "$@"

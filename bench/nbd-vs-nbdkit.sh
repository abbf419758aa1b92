#!/usr/bin/env bash
# Basalt's NBD server against nbdkit (file plugin) and qemu-nbd on the same file, with
# fio's nbd engine, in one run; prints a ratio table (goal: basalt/nbdkit >= 1.2).
# Usage: bench/nbd-vs-nbdkit.sh [--dir DIR] [--size-mib N] [--runtime S] [--rounds N]
#        [--only NAME] [--servers nbdkit,qemu-nbd] [--compare OTHER-nbd-serve]
# (all flags go to the binary; see --help). Needs root only to install the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
if ((${#need[@]})); then
    # Debian's packages; refresh the package lists only if the plain install fails.
    apt-get install -y "${need[@]}" || { apt-get update && apt-get install -y "${need[@]}"; }
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin nbd-serve --bin nbd-vs-nbdkit
exec "$CARGO_TARGET_DIR/release/nbd-vs-nbdkit" "$@"

#!/usr/bin/env bash
# VM start time and VMM memory overhead: Basalt's built-in runner (KVM) and QEMU runner
# (TCG on hosts like this one) against Firecracker's published targets (<= 125 ms to
# guest init, <= 5 MiB VMM overhead) and QEMU's own overhead, side by side.
# Usage: bench/compute-boot.sh [--runs N] [--memory-mib M]   (flags go to the binary)
# Needs /dev/kvm, qemu-system-x86_64 (bookworm-backports) and the test guest, which this
# script builds with deploy/guest/build.sh (Debian packages, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null; then
    apt-get install -y -t bookworm-backports qemu-system-x86 || {
        apt-get update && apt-get install -y -t bookworm-backports qemu-system-x86; }
fi
deploy/guest/build.sh >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt-target}"
cargo build --release -p basalt-compute --bin basalt-compute-vmm
cargo build --release -p basalt-bench --bin compute-boot
exec "$CARGO_TARGET_DIR/release/compute-boot" --vmm-bin "$CARGO_TARGET_DIR/release/basalt-compute-vmm" "$@"

#!/usr/bin/env bash
# Basalt's userspace switch against Open vSwitch's userspace (netdev) datapath and the
# Linux bridge, in one run, between two network namespaces: iperf3 TCP (1 and 4 streams)
# and 64-byte UDP. Prints a table with ratios.
# Usage: bench/net-vs-ovs.sh [--seconds N] [--skip-ovs] [--only NAME]. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(iperf3 openvswitch-switch ethtool iproute2 iputils-ping)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    # Debian's packages; refresh the package lists only if the plain install fails.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" \
        || { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin net-vs-ovs
exec "$CARGO_TARGET_DIR/release/net-vs-ovs" "$@"

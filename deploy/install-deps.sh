#!/usr/bin/env bash
# Installs the Debian packages Basalt needs, only those missing (idempotent).
#
#   deploy/install-deps.sh build   # compilers and headers for the build (RocksDB, bindgen)
#   deploy/install-deps.sh test    # build + the real peers the tests talk to
#   deploy/install-deps.sh bench   # build + the baselines the benchmarks compare against
set -euo pipefail

profile="${1:-build}"

build_pkgs=(clang libclang-dev make pkg-config git curl ca-certificates)
# Real peers of the test suite: promtool and a Prometheus server (metrics), curl (an
# independent HTTPS client), losetup (block-device disks), fio.
test_pkgs=(prometheus curl util-linux fio)
bench_pkgs=(fio)

case "$profile" in
  build) want=("${build_pkgs[@]}") ;;
  test) want=("${build_pkgs[@]}" "${test_pkgs[@]}") ;;
  bench) want=("${build_pkgs[@]}" "${bench_pkgs[@]}") ;;
  *) echo "usage: $0 build|test|bench" >&2; exit 2 ;;
esac

missing=()
for pkg in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "need root to install: ${missing[*]}" >&2; exit 1
  fi
fi

echo "Installing missing packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Try without refreshing the package lists first; refresh only if that fails.
if ! $sudo apt-get install -y --no-install-recommends "${missing[@]}"; then
  $sudo apt-get update
  $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi

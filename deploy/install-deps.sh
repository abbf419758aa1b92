#!/usr/bin/env bash
# Installs the Debian packages Basalt needs, only those missing (idempotent).
#
#   deploy/install-deps.sh build   # compilers and headers for the build (RocksDB, bindgen)
#   deploy/install-deps.sh test    # build + the real peers the tests talk to
#   deploy/install-deps.sh bench   # build + the baselines the benchmarks compare against
set -euo pipefail

profile="${1:-build}"

build_pkgs=(clang libclang-dev make pkg-config git curl ca-certificates libiscsi-dev)
# Real peers of the test suite: promtool and a Prometheus server (metrics), curl (an
# independent HTTPS client), losetup (block-device disks), fio, libiscsi's tools
# (iscsi-test-cu, iscsi-ls, iscsi-perf), libnbd's (nbdinfo, nbdcopy), qemu-img, and
# qemu-img's iscsi driver (qemu-block-extra,
# which must match qemu-utils 10 from bookworm-backports), tgt (a second iSCSI target
# for the initiator's tests), and the network peers of the vSwitch tests (ip, ping,
# iperf3, tshark), ISA-L (libisal2) as the independent check of RAID6 parity, and for
# the compute tests QEMU (qemu-system-x86, from backports like qemu-utils), nbdkit, and
# what builds the test guest's initramfs (kmod, cpio, gzip, e2fsprogs).
test_pkgs=(prometheus curl util-linux fio libiscsi-bin libnbd-bin qemu-utils tgt
  iproute2 iputils-ping iperf3 tshark libisal2 nbdkit e2fsprogs kmod cpio gzip)
backports_test_pkgs=(qemu-block-extra qemu-system-x86)
# Baselines of the benchmarks: fio, tgt (iSCSI), nbdkit and qemu-nbd (NBD), Open vSwitch
# (userspace datapath) and iperf3.
bench_pkgs=(fio tgt libiscsi-bin nbdkit libnbd-bin qemu-utils openvswitch-switch ethtool
  iproute2 iputils-ping iperf3 libisal2)

backports=()
case "$profile" in
  build) want=("${build_pkgs[@]}") ;;
  test) want=("${build_pkgs[@]}" "${test_pkgs[@]}"); backports=("${backports_test_pkgs[@]}") ;;
  bench) want=("${build_pkgs[@]}" "${bench_pkgs[@]}"); backports=("${backports_test_pkgs[@]}") ;;
  *) echo "usage: $0 build|test|bench" >&2; exit 2 ;;
esac

missing_of() {
  local pkg
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      echo "$pkg"
    fi
  done
}
mapfile -t missing < <(missing_of "${want[@]}")
mapfile -t missing_bp < <(missing_of "${backports[@]}")
if [ ${#missing[@]} -eq 0 ] && [ ${#missing_bp[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "need root to install: ${missing[*]} ${missing_bp[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive

# Try without refreshing the package lists first; refresh only if that fails.
install() {
  if ! $sudo apt-get install -y --no-install-recommends "$@"; then
    $sudo apt-get update
    $sudo apt-get install -y --no-install-recommends "$@"
  fi
}

if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing missing packages: ${missing[*]}"
  install "${missing[@]}"
fi
if [ ${#missing_bp[@]} -gt 0 ]; then
  codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
  list=/etc/apt/sources.list.d/backports.list
  if ! grep -qs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null; then
    echo "deb http://deb.debian.org/debian ${codename}-backports main" | $sudo tee "$list" >/dev/null
    $sudo apt-get update
  fi
  echo "Installing missing packages from ${codename}-backports: ${missing_bp[*]}"
  install -t "${codename}-backports" "${missing_bp[@]}"
fi

#!/usr/bin/env bash
# Builds Basalt's test guest from Debian's own packages, with no internet beyond the
# Debian mirror apt already uses:
#
#   deploy/guest/build.sh [OUT_DIR]      # default ~/.cache/basalt-guest
#
# Produces OUT_DIR/vmlinuz (Debian's linux-image-cloud-amd64 bzImage), OUT_DIR/initrd.gz
# (busybox-static plus the virtio and ext4 modules and deploy/guest/init) and
# OUT_DIR/manifest (what went in). Idempotent: packages are downloaded once into
# OUT_DIR/debs and the initramfs is rebuilt only when an input changed.
#
# Needs: apt-get, dpkg, depmod (kmod), cpio, gzip, flock (and xz for compressed modules). Run as any user that
# may run `apt-get download` (no root needed).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${BASALT_GUEST_DIR:-$HOME/.cache/basalt-guest}}"
mkdir -p "$out/debs"
# One build at a time (tests may call this concurrently).
exec 9>"$out/.lock"
flock 9
cd "$out/debs"

# The meta package names the versioned kernel image package of the release.
kpkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
  | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\(-unsigned\)\?\)$/\1/p' | head -1)"
if [ -z "$kpkg" ]; then
  echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update?)" >&2
  exit 1
fi
for pkg in "$kpkg" busybox-static; do
  if ! ls "${pkg}"_*.deb >/dev/null 2>&1; then
    apt-get download "$pkg"
  fi
done
kdeb="$(ls "${kpkg}"_*.deb | head -1)"
bdeb="$(ls busybox-static_*.deb | head -1)"

stamp="$(sha256sum "$kdeb" "$bdeb" "$here/init" "$here/build.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$out/manifest" ] && grep -q "^stamp $stamp\$" "$out/manifest" \
   && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ]; then
  echo "$out: up to date"
  exit 0
fi

work="$(mktemp -d "$out/work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
dpkg -x "$kdeb" "$work/kernel"
dpkg -x "$bdeb" "$work/busybox"
kver="$(ls "$work/kernel/lib/modules" | head -1)"
moddir="$work/kernel/lib/modules/$kver"
# The package ships no modules.dep (its postinst makes it); make it in the unpacked tree.
depmod -b "$work/kernel" "$kver"
cp "$(ls "$work"/kernel/boot/vmlinuz-* | head -1)" "$out/vmlinuz.new"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init" "$root/bin/busybox"

# Modules in load order: each module after the modules it depends on (modules.dep).
want=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio
      virtio_blk failover net_failover virtio_net virtio_balloon ext4)
declare -A done_mod=()
order=()
path_of() { # module name -> path relative to $moddir
  local m="$1"
  grep -E "(^|/)(${m}|${m//_/-})\.ko(\.xz|\.zst)?:" "$moddir/modules.dep" | head -1 | cut -d: -f1 || true
}
add() {
  local rel="$1" dep
  [ -n "${done_mod[$rel]:-}" ] && return 0
  done_mod[$rel]=1
  for dep in $(grep -E "^${rel}:" "$moddir/modules.dep" | cut -d: -f2- || true); do add "$dep"; done
  order+=("$rel")
}
for m in "${want[@]}"; do
  rel="$(path_of "$m")"
  if [ -z "$rel" ]; then
    # Built into the kernel: nothing to load.
    grep -qE "/${m}\.ko" "$moddir/modules.builtin" 2>/dev/null || echo "note: module $m not found" >&2
    continue
  fi
  add "$rel"
done
: > "$root/lib/modules/order"
for rel in "${order[@]}"; do
  name="$(basename "$rel")"
  case "$name" in
    *.ko.xz) xz -dc "$moddir/$rel" > "$root/lib/modules/${name%.xz}"; name="${name%.xz}" ;;
    *.ko.zst) zstd -qdc "$moddir/$rel" > "$root/lib/modules/${name%.zst}"; name="${name%.zst}" ;;
    *) cp "$moddir/$rel" "$root/lib/modules/$name" ;;
  esac
  echo "$name" >> "$root/lib/modules/order"
done

(cd "$root" && find . -print0 | cpio --null -o -H newc --owner 0:0 --quiet) | gzip -9 > "$out/initrd.gz.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initrd.gz.new" "$out/initrd.gz"
{
  echo "stamp $stamp"
  echo "kernel $kdeb $kver"
  echo "busybox $bdeb"
  echo "modules $(tr '\n' ' ' < "$root/lib/modules/order")"
} > "$out/manifest"
echo "$out: built vmlinuz ($kver) and initrd.gz"

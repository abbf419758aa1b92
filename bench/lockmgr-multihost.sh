#!/usr/bin/env bash
# Multi-process lock manager run: N `lockmgr-host` processes share one LUN over iSCSI,
# each acquiring, stamping (value block by CAW, data sector by plain write) and
# checking; host 1 is SIGSTOPped past its lease and resumed, host 2 SIGKILLed. Judged
# from the hosts' JSON logs: no violation (a data-sector one is excused only if its
# stamp comes from a write its host reported `late`: stopped between lease check and
# wire, outside the timing model), and host 1 reports `lost` after resuming.
# (The same checks, with random kills and pauses and ≥ 10,000 acquisitions, run in
# `cargo nextest run -p basalt-lockmgr --test multihost`.)
#
# Usage: bench/lockmgr-multihost.sh [iscsi://HOST[:PORT]/IQN/LUN|local] [HOSTS=3] [SECONDS=60]
# `local` (the default) starts Basalt's iSCSI target (targets/iscsi/examples/serve) on a
# file LUN. NETNS=1 runs every host in its own network namespace, wired by veth pairs
# to a bridge in a hub namespace where the local target listens (root only; nothing in
# the root namespace is touched; everything is deleted on exit). The target must
# implement COMPARE AND WRITE (tgt does not: the hosts exit at join).
set -euo pipefail
cd "$(dirname "$0")/.."
url="${1:-local}"
hosts="${2:-3}"
secs="${3:-60}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin lockmgr-host
bin="$CARGO_TARGET_DIR/release/lockmgr-host"
logs="$(mktemp -d)"
tag="lkmh$$"
pids=()
serve=""
cleanup() {
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -KILL "$p" 2>/dev/null || true; done
  [ -n "$serve" ] && kill "$serve" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "${NETNS:-0}" = 1 ]; then
    for h in $(seq 1 "$hosts"); do ip netns del "$tag-$h" 2>/dev/null || true; done
    ip netns del "$tag-hub" 2>/dev/null || true
  fi
  rm -f "$logs/lun.img"
}
trap cleanup EXIT
run_in() { # run_in HOST-INDEX|hub CMD... (replaces the calling (sub)shell: $! is the process)
  local ns="$1"; shift
  if [ "${NETNS:-0}" = 1 ]; then exec ip netns exec "$tag-$ns" "$@"; else exec "$@"; fi
}
addr=127.0.0.1
if [ "${NETNS:-0}" = 1 ]; then
  addr=10.78.0.1
  ip netns add "$tag-hub"
  ip -n "$tag-hub" link set lo up
  ip -n "$tag-hub" link add br0 type bridge
  ip -n "$tag-hub" addr add "$addr/24" dev br0
  ip -n "$tag-hub" link set br0 up
  for h in $(seq 1 "$hosts"); do
    ip netns add "$tag-$h"
    ip -n "$tag-$h" link set lo up
    ip -n "$tag-hub" link add "p$h" type veth peer name e0 netns "$tag-$h"
    ip -n "$tag-hub" link set "p$h" master br0 up
    ip -n "$tag-$h" addr add "10.78.0.$((10 + h))/24" dev e0
    ip -n "$tag-$h" link set e0 up
  done
fi
if [ "$url" = local ]; then
  cargo build --release -p basalt-iscsi --example serve
  iqn="iqn.2026-11.org.basalt:lockmgr-multihost"
  port=$((20000 + $$ % 10000))
  truncate -s 256M "$logs/lun.img"
  run_in hub "$CARGO_TARGET_DIR/release/examples/serve" --portal "$addr:$port" --iqn "$iqn" \
    --file "$logs/lun.img" 2> "$logs/serve.log" &
  serve=$!
  for _ in $(seq 100); do grep -q serving "$logs/serve.log" && break; sleep 0.1; done
  url="iscsi://$addr:$port/$iqn/0"
elif [ "${NETNS:-0}" = 1 ]; then
  echo "NETNS=1 needs the local target (the namespaces reach only the hub)" >&2
  exit 2
fi
(run_in 1 "$bin" --device "$url" --host 1 --format --count 1 > "$logs/format.log")
for h in $(seq 1 "$hosts"); do
  run_in "$h" "$bin" --device "$url" --host "$h" > "$logs/host$h.log" 2>&1 &
  pids+=($!)
done
sleep $((secs / 3))
kill -STOP "${pids[0]}"; echo "host 1 stopped"; sleep 15; kill -CONT "${pids[0]}"; echo "host 1 resumed"
sleep $((secs / 3))
if [ "$hosts" -ge 3 ]; then kill -KILL "${pids[1]}"; echo "host 2 killed"; fi
sleep $((secs / 3))
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
wait "${pids[@]}" 2>/dev/null || true
pids=()
acq=$(cat "$logs"/host*.log | grep -c '"acquired"' || true)
late=$( (cat "$logs"/host*.log | grep '"late"' || true) | sed 's/.*"stamp":"\([0-9a-f]*\)".*/\1/' | sort -u)
viol=0
explained=0
while read -r line; do
  [ -z "$line" ] && continue
  found=$(echo "$line" | sed 's/.*"found":"\([0-9a-f]*\)".*/\1/')
  if echo "$line" | grep -q '"kind":"data"' && echo "$late" | grep -qx "$found"; then
    explained=$((explained + 1))
  else
    viol=$((viol + 1)); echo "violation: $line"
  fi
done < <(cat "$logs"/host*.log | grep '"violation"' || true)
lost=$(grep -c '"lost"' "$logs/host1.log" || true)
echo "acquisitions: $acq, violations: $viol (plus $explained late plain writes outside the timing model), host 1 lost events: $lost (logs in $logs)"
[ "$viol" -eq 0 ] && [ "$lost" -ge 1 ]

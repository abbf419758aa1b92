#!/usr/bin/env bash
# Multi-process lock manager test: N `lockmgr-host` processes share one LUN over iSCSI,
# each acquiring, stamping and checking oracle sectors; one host is SIGSTOPped past its
# lease and resumed, another SIGKILLed. Judged from the hosts' JSON logs: zero
# "violation" events, and the stopped host reports "lost" after resuming.
#
# Usage: bench/lockmgr-multihost.sh iscsi://HOST[:PORT]/IQN/LUN [HOSTS=3] [SECONDS=60]
# Set NETNS=1 to run each host in its own network namespace (the target must then be
# reachable from the namespaces, e.g. over a veth pair the caller set up).
#
# Needs a target that implements COMPARE AND WRITE: Basalt's own iSCSI target once it
# exists. tgt does not (the hosts then exit at join with "COMPARE AND WRITE (target
# rejected the command)"), and a file gives no cross-process CAW atomicity.
set -euo pipefail
cd "$(dirname "$0")/.."
url="${1:?usage: $0 iscsi://host/iqn/lun [hosts] [seconds]}"
hosts="${2:-3}"
secs="${3:-60}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/basalt-target}"
cargo build --release -p basalt-bench --bin lockmgr-host
bin="$CARGO_TARGET_DIR/release/lockmgr-host"
logs="$(mktemp -d)"
"$bin" --device "$url" --host 1 --format --count 1 > "$logs/format.log"
pids=()
for h in $(seq 1 "$hosts"); do
  if [ "${NETNS:-0}" = 1 ]; then
    ip netns add "lkh$h" 2>/dev/null || true
    ip netns exec "lkh$h" "$bin" --device "$url" --host "$h" > "$logs/host$h.log" 2>&1 &
  else
    "$bin" --device "$url" --host "$h" > "$logs/host$h.log" 2>&1 &
  fi
  pids+=($!)
done
sleep $((secs / 3))
kill -STOP "${pids[0]}"; echo "host 1 stopped"; sleep 15; kill -CONT "${pids[0]}"; echo "host 1 resumed"
sleep $((secs / 3))
if [ "$hosts" -ge 3 ]; then kill -KILL "${pids[1]}"; echo "host 2 killed"; fi
sleep $((secs / 3))
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
wait || true
acq=$(cat "$logs"/host*.log | grep -c '"acquired"' || true)
viol=$(cat "$logs"/host*.log | grep -c '"violation"' || true)
lost=$(grep -c '"lost"' "$logs/host1.log" || true)
echo "acquisitions: $acq, violations: $viol, host 1 lost events: $lost (logs in $logs)"
[ "$viol" -eq 0 ] && [ "$lost" -ge 1 ]

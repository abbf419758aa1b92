#!/usr/bin/env bash
# Runs libiscsi's iscsi-test-cu, one suite per process (a crash costs only that suite),
# one after the other (suites share the LUN: running them at once makes them fail each
# other), with two initiator names (-i / -I) against BASE (iscsi://HOST:PORT/IQN):
# LUN 0 (512-byte blocks) for most suites, LUN 1 (write-protected) for SCSI.ReadOnly,
# LUN 2 (4 KiB physical blocks, LBPPB 8) for the suites whose unaligned cases need
# LBPPB >= 2 (CompareAndWrite, WriteSame10/16).
# Prints one line per suite: NAME total ran passed failed skipped, then a summary line.
# Usage: conformance.sh BASE OUTDIR
set -uo pipefail
base="$1"; out="$2"; jobs=1
mkdir -p "$out"
suites=$(iscsi-test-cu --list | grep -E '^(SCSI|iSCSI)\.[A-Za-z0-9]+$' | grep -v -E '^SCSI\.(Sanitize|MultipathIO)$')
run() {
    s="$1"; u="$base/0"
    case "$s" in
        SCSI.ReadOnly) u="$base/1" ;;
        SCSI.CompareAndWrite|SCSI.WriteSame10|SCSI.WriteSame16) u="$base/2" ;;
    esac
    timeout 300 iscsi-test-cu --dataloss -V -i iqn.2026-11.test:init1 -I iqn.2026-11.test:init2 \
        -t "$s" "$u" > "$out/$s.log" 2>&1
    line=$(grep -E '^ +tests ' "$out/$s.log" | head -1)
    skipped=$(grep -c '\[SKIPPED\]' "$out/$s.log")
    if [ -z "$line" ]; then echo "$s CRASHED 0 0 0 1 $skipped"; return; fi
    set -- $line
    echo "$s $2 $3 $4 $5 $skipped"
}
export -f run; export base out
printf '%s\n' $suites | xargs -P "$jobs" -I{} bash -c 'run {}' | sort > "$out/summary.txt"
cat "$out/summary.txt"
awk '{t+=$2; p+=$4; f+=$5; s+=$6} END {printf "%d passed, %d failed, %d skipped (of %d tests)\n", p-s, f, s, t}' "$out/summary.txt"

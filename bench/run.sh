#!/usr/bin/env bash
# `make bench`: every side-by-side benchmark, one after another. Each prints its own
# table against its baseline. Pass names to run a subset: bench/run.sh blockdev-vs-fio
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -gt 0 ]; then
  scripts=("$@")
else
  scripts=()
  for f in *.sh; do
    [ "$f" = run.sh ] || scripts+=("${f%.sh}")
  done
fi
for name in "${scripts[@]}"; do
  echo "=== $name ==="
  "./$name.sh"
  echo
done

#!/usr/bin/env bash
# Run one command in the checkout and in every tree under .trees/ (bench/export_trees.sh), one after the other
# (benchmarks stay alone on the GPU), each with its own moe_raw first on PYTHONPATH: moe_raw._launch reads the
# kernels/ next to the imported moe_raw/, so each tree runs its own kernels.
# Usage: bash bench/run_trees.sh "python -m bench.bench_dispatch" [LABEL]
# Logs: $OUT/<tree>.log, or $OUT/<LABEL>-<tree>.log with a LABEL (OUT defaults to bench/results/latest).
# TREES_ONLY=1 skips the checkout (a branch's GPU tests, say).
set -uo pipefail
cmd=$1
label=${2:+$2-}
root=$(pwd)
OUT=${OUT:-$root/bench/results/latest}
mkdir -p "$OUT"
status=0
dirs=("$root"/.trees/*/)
[ "${TREES_ONLY:-0}" = 1 ] || dirs=("$root" "${dirs[@]}")
for dir in "${dirs[@]}"; do
  [ -d "$dir" ] || continue
  name=$(basename "$dir")
  [ "$dir" = "$root" ] && name=checkout
  echo "=== $name: $cmd"
  (cd "$dir" && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" bash -c "$cmd") >"$OUT/$label$name.log" 2>&1 || status=1
  tail -n 25 "$OUT/$label$name.log"
done
exit $status

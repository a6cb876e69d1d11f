#!/usr/bin/env bash
# On the device, after bench/pending/trees.sh: each pending tree's benchmark beside the checkout's (one process each,
# checkout first, then the tree, then the checkout again: the order effect shows), then the GPU tests of the files
# each patch touches, in its tree, then the probe. Logs: $OUT/ab.log, $OUT/tests-<name>.log, $OUT/probe.log. About
# 2 minutes a patch; all of it ends by AB_DEADLINE (below).
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
OUT=${OUT:-$R/bench/results/latest}
mkdir -p "$OUT"
# a fresh device has the checkout but not its install (entry points, metadata): the benchmarks import it from $R
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e "$R" > /dev/null 2>&1 || echo "install failed" >> "$OUT/ab.log"
# one entry per pending patch: its benchmark (one process; checkout, tree, checkout)
declare -A BENCH=(
  [base]="python3 -m bench.permute_fwd"  # trees.sh BASE=REV: an older main
  [permute-grouped-all]="python3 -m bench.permute_fwd"  # trees.sh GROUPED_ALL=1
  [permute-grouped-small]="python3 -m bench.permute_fwd"  # trees.sh GROUPED_SMALL=1
)
# the GPU test files each patch touches, run with -v so a run cut by the deadline still names each failure
# (test_fuzz waits for the whole suite after a merge: with it, a tree's tests outran their 240 s in
# bench/results/2026-12-05-h100-pending-ab3)
declare -A TESTS=(
)
# AB_TESTS=0: the A/B and the probe only (the caller runs the tests).
# Everything ends before the device's 10-minute limit (AB_DEADLINE seconds after the start, default 570): each step's
# timeout is cut to the time left, and a step with under 30 s left is skipped (logged). Order: every tree's A/B
# first (the result), then each tree's GPU tests, then the probe.
DEADLINE=${AB_DEADLINE:-570}
left() { local t=$((DEADLINE - SECONDS)); t=$((t > $1 ? $1 : t)); echo $((t < 0 ? 0 : t)); }  # min(cap, time left)
run() {
  local t; t=$(left 150)
  if [ "$t" -lt 30 ]; then echo "=== [$1] $2: skipped, ${t}s left of the deadline"; return; fi
  echo "=== [$1] $2 (+${SECONDS}s)"; (cd "$3" && PYTHONPATH=$3 timeout "$t" bash -c "$2") 2>&1
}
trees=()
for dir in "$R"/.trees/*/; do
  name=$(basename "$dir")
  [ -n "${BENCH[$name]:-}" ] && trees+=("$name")
done
for name in "${trees[@]}"; do
  { run checkout "${BENCH[$name]}" "$R"; run "$name" "${BENCH[$name]}" "$R/.trees/$name"; run checkout "${BENCH[$name]}" "$R"; } >> "$OUT/ab.log"
done
for name in "${trees[@]}"; do
  [ -n "${TESTS[$name]:-}" ] && [ "${AB_TESTS:-1}" = 1 ] || continue  # base: main's tests run on the checkout
  t=$(left 240)
  if [ "$t" -lt 30 ]; then echo "$name tests: skipped, ${t}s left of the deadline" >> "$OUT/ab.log"; continue; fi
  (cd "$R/.trees/$name" && PYTHONPATH=$R/.trees/$name MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$t" python3 -m pytest -v -n 14 \
    -m "gpu and not slow" -p no:cacheprovider ${TESTS[$name]}) > "$OUT/tests-$name.log" 2>&1
  echo "$name tests rc=$? (+${SECONDS}s)" >> "$OUT/ab.log"
done
# Last, on the checkout: permute beside its ceilings at every bench shape. Its "copy only" column (rows moved from a
# finished row map, no lookups) says whether permute's forward on this card is held by the routing lookups (copy only
# well above permute) or by the scattered writes themselves (the two level): measured so far on the H100 only.
# AB_PHASED=1: with the phased movers (--phased: a second table, about 10 s a shape). AB_PROBE=0: not run.
[ "${AB_PROBE:-1}" = 0 ] || run checkout "python3 -m bench.probe_permute${AB_PHASED:+ --phased}" "$R" > "$OUT/probe.log"

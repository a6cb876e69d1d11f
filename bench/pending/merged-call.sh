#!/usr/bin/env bash
# One device call after a merge, carrying .trees (`trees.sh NAME ...`): the pending trees' A/B and their own test
# files (ab.sh, by AB_END, default 240 s), then the GPU tests of MERGED (the test files a merge on main touched) on
# the checkout, by CALL_END (default 560) less 60 s, then bench.gather_ab and write_probe.py on the checkout in what
# is left. Logs under $OUT: gpu.txt, steps.log, ab.log, tests-<name>.log, merged.log.gz, gather_ab.log,
# write_probe.md.
set -u
export PYTHONUNBUFFERED=1
END=${CALL_END:-560}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
step() { echo "$1 rc=$2 (+${SECONDS}s)" >> "$OUT/steps.log"; }
AB_PROBE=0 AB_DEADLINE=${AB_END:-240} bash bench/pending/ab.sh
step ab $?
left=$((END - 60 - SECONDS))
if [ "$left" -ge 30 ]; then
  MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$left" python3 -m pytest -v -n 14 -m "gpu and not slow" -p no:cacheprovider \
    ${MERGED:-tests} > "$OUT/merged.log" 2>&1
  step "merged tests (${MERGED:-tests})" $?
  grep -E "FAILED|ERROR|passed|failed" "$OUT/merged.log" | tail -10
  gzip "$OUT/merged.log"
fi
left=$((END - SECONDS))
[ "$left" -ge 20 ] && { PYTHONPATH=. timeout 30 python3 -m bench.gather_ab > "$OUT/gather_ab.log" 2>&1; step gather_ab $?; }
left=$((END - SECONDS))
[ "$left" -ge 20 ] && { PYTHONPATH=. timeout "$left" python3 bench/pending/write_probe.py > "$OUT/write_probe.md" 2>&1
  step write_probe $?; }
cat "$OUT/steps.log"

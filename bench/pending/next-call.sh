#!/usr/bin/env bash
# One device call (at most 570 s), after `BASE=a4dcb54 bash bench/pending/trees.sh permute-grouped-ilp` here,
# carrying .trees. Logs in $OUT, most important first (all by CALL_END seconds, default 570):
# 1. on an H200 only, the record: python -m bench in full, cold calls, probe (about 190 s on an H100), record.tgz;
# 2. bench/pending/ab.sh without tests: permute forward of the checkout (plain table loads, 484701d) beside
#    .trees/base (a4dcb54: read-only table loads) and beside permute-grouped-ilp, then the probe;
# 3. the GPU tests of the checkout's permute files (what 484701d touches);
# 4. permute-grouped-ilp's GPU tests, in its tree, in the time left.
set -u
export PYTHONUNBUFFERED=1
OUT0=$OUT
R=$PWD
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu" > "$OUT0/gpu.txt"
step() { echo "$1 rc=$2 (+${SECONDS}s)" >> "$OUT0/steps.log"; }
tests() {  # tests DIR LOG: the permute files' GPU tests in DIR, by CALL_END
  local left=$((${CALL_END:-570} - SECONDS))
  [ "$left" -ge 60 ] || { step "$2 skipped" "-"; return; }
  (cd "$1" && PYTHONPATH=$1 MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$left" python3 -m pytest -v -n 14 \
    -m "gpu and not slow" -p no:cacheprovider tests/test_permute.py tests/test_padding.py tests/test_parity.py \
    tests/test_launch_gpu.py tests/test_reliability_gpu.py) > "$OUT0/$2" 2>&1
  step "$2" $?
}
if [[ $gpu == *H200* ]]; then
  MOE_RAW_GIT_SHA=$(cat .trees/MAIN_SHA) OUT=$OUT0/r timeout 260 bash bench/run_device.sh full cold probe \
    > "$OUT0/record.log" 2>&1
  step record $?
  tar czf "$OUT0/record.tgz" -C "$OUT0" r && rm -rf "$OUT0/r"
fi
AB_TESTS=0 AB_DEADLINE=150 bash bench/pending/ab.sh
step ab $?
tests "$R" tests-main.log
tests "$R/.trees/permute-grouped-ilp" tests-permute-grouped-ilp.log
cat "$OUT0/steps.log"
grep -E "^ copy" "$OUT0/ab.log"
grep -hE "FAILED|passed|failed" "$OUT0"/tests-*.log | tail -20
gzip "$OUT0"/tests-*.log

#!/usr/bin/env bash
# The next device call, after `BASE=a4dcb54 bash bench/pending/trees.sh permute-grouped-ilp` here and a copy of that
# tree as .trees/permute-grouped-all with dispatch.py's _GROUP_MIN_ROW_BYTES and _GROUP_MIN_PAIRS set to 0 (the patch
# on every shape: the H100's rule may not be the H200's), carrying .trees.
# Most important first, all by CALL_END seconds (default 570; lower it when little device time is left):
# 1. on an H200 only, the record: python -m bench in full, cold calls, probe (about 190 s on an H100): record.tgz;
# 2. the GPU tests that exercise the overlapped row kernels (overlap, grouped, row kernels agree, side stream, graph
#    replay) on the checkout (main's plain table loads, 484701d) and in .trees/permute-grouped-ilp (about 100 s);
# 3. bench/pending/ab.sh without its tests: permute forward of the checkout beside .trees/base (a4dcb54: read-only
#    table loads), permute-grouped-all and permute-grouped-ilp, then the probe (about 130 s);
# 4. the whole GPU suite on the checkout in the time left (about 300 s on an H100).
# Back in $OUT: gpu.txt, steps.log (each step's exit status and end time), logs.tgz (tests-*.log, ab.log, probe.log,
# record.log), record.tgz.
set -u
export PYTHONUNBUFFERED=1
R=$PWD
END=${CALL_END:-570}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu" > "$OUT/gpu.txt"
step() { echo "$1 rc=$2 (+${SECONDS}s)" >> "$OUT/steps.log"; }
tests() {  # DIR LOG CAP [pytest args]: the GPU tests in DIR, cut at CAP seconds or at END
  local dir=$1 log=$2 cap=$3 left=$((END - SECONDS))
  shift 3
  [ "$left" -ge 30 ] || { step "$log skipped" -; return; }
  (cd "$dir" && PYTHONPATH=$dir MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout $((left < cap ? left : cap)) python3 -m pytest \
    -v -n 14 -m "gpu and not slow" -p no:cacheprovider "$@") > "$OUT/$log" 2>&1
  step "$log" $?
}
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
if [[ $gpu == *H200* ]]; then
  OUT0=$OUT
  MOE_RAW_GIT_SHA=$(cat .trees/MAIN_SHA) OUT=$OUT0/r timeout 260 bash bench/run_device.sh full cold probe \
    > "$OUT0/record.log" 2>&1
  step record $?
  tar czf "$OUT0/record.tgz" -C "$OUT0" r && rm -rf "$OUT0/r"
fi
K="overlapped or grouped or agree or side_stream or graph"
FILES=(tests/test_permute.py tests/test_launch_gpu.py tests/test_padding.py)
tests "$R" tests-main-overlap.log 100 "${FILES[@]}" -k "$K"
tests "$R/.trees/permute-grouped-ilp" tests-permute-grouped-ilp.log 100 "${FILES[@]}" -k "$K"
left=$((END - SECONDS))
if [ "$left" -ge 60 ]; then
  AB_TESTS=0 AB_DEADLINE=$((left < 150 ? left : 150)) bash bench/pending/ab.sh
  step ab $?
fi
tests "$R" tests-main-suite.log 600 tests
cat "$OUT/steps.log"
grep -E "^ copy" "$OUT/ab.log"
grep -hE "FAILED|passed|failed" "$OUT"/tests-*.log | tail -20
cd "$OUT" && tar czf logs.tgz --remove-files tests-*.log ab.log probe.log $(ls record.log 2>/dev/null)  # <= 8 files back

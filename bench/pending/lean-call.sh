#!/usr/bin/env bash
# The short form of next-call.sh (about 250 s), for a call with little device time left: the GPU tests that exercise
# the overlapped row kernels (overlap, grouped, row kernels agree, side stream, graph replay), on the checkout and
# in .trees/permute-grouped-ilp, then the A/B of bench/pending/ab.sh without its tests. Logs in $OUT.
set -u
export PYTHONUNBUFFERED=1
R=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
K="overlapped or grouped or agree or side_stream or graph"
tests() {  # DIR SECONDS LOG
  (cd "$1" && PYTHONPATH=$1 MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$2" python3 -m pytest -v -n 14 -m "gpu and not slow" \
    -p no:cacheprovider tests/test_permute.py tests/test_launch_gpu.py tests/test_padding.py -k "$K") > "$OUT/$3" 2>&1
  echo "$3 rc=$? (+${SECONDS}s)" >> "$OUT/steps.log"
}
tests "$R" 100 tests-main.log
tests "$R/.trees/permute-grouped-ilp" 100 tests-permute-grouped-ilp.log
AB_TESTS=0 AB_DEADLINE=70 bash bench/pending/ab.sh
cat "$OUT/steps.log"
grep -E "^ copy" "$OUT/ab.log"
grep -hE "FAILED|passed|failed" "$OUT"/tests-*.log | tail -12
gzip "$OUT"/tests-*.log

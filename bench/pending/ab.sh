#!/usr/bin/env bash
# On the device, after bench/pending/trees.sh: each pending tree's benchmark beside the checkout's (one process each,
# checkout first, then the tree, then the checkout again: the order effect shows), then the GPU tests of the files
# the patch touches, in that tree. Logs: $OUT/ab.log, $OUT/tests-<name>.log. About 2 minutes a patch.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
OUT=${OUT:-$R/bench/results/latest}
mkdir -p "$OUT"
declare -A BENCH=(
  [chunks-resident]="python3 -m bench.bench_dispatch"
  [glu-fwd-regs]="python3 -m bench.bench_swiglu --activations swiglu"
)
declare -A TESTS=(
  [chunks-resident]="tests/test_chunks.py tests/test_dispatcher.py tests/test_launch_gpu.py"
  [glu-fwd-regs]="tests/test_glu_kernels.py tests/test_activations.py tests/test_activations_api.py"
)
run() { echo "=== [$1] $2"; (cd "$3" && PYTHONPATH=$3 timeout 150 bash -c "$2") 2>&1; }
for dir in "$R"/.trees/*/; do
  name=$(basename "$dir")
  [ -n "${BENCH[$name]:-}" ] || continue
  { run checkout "${BENCH[$name]}" "$R"; run "$name" "${BENCH[$name]}" "$dir"; run checkout "${BENCH[$name]}" "$R"; } >> "$OUT/ab.log"
  (cd "$dir" && PYTHONPATH=$dir MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout 240 python3 -m pytest -q -n 14 -m "gpu and not slow" \
    -p no:cacheprovider ${TESTS[$name]}) > "$OUT/tests-$name.log" 2>&1
  echo "$name tests rc=$?" >> "$OUT/ab.log"
done

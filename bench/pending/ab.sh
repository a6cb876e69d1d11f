#!/usr/bin/env bash
# On the device, after bench/pending/trees.sh: each pending tree's benchmark beside the checkout's (one process each,
# checkout first, then the tree, then the checkout again: the order effect shows), then the GPU tests of the files
# the patch touches, in that tree. Logs: $OUT/ab.log, $OUT/tests-<name>.log. About 6-7 minutes for all three.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$PWD
OUT=${OUT:-$R/bench/results/latest}
mkdir -p "$OUT"
declare -A BENCH=(
  [permute-prefetch]="python3 -m bench.probe_permute --shapes DeepSeek-V3,T16k-E128-H4096-K6,Qwen3-30B-A3B; python3 -m bench.bench_dispatch"
  [chunks-resident]="python3 -m bench.bench_dispatch"
  [swiglu-ilp]="python3 -m bench.bench_swiglu --activations swiglu"
)
declare -A TESTS=(
  [permute-prefetch]="tests/test_permute.py tests/test_padding.py tests/test_parity.py tests/test_row_map_reuse_gpu.py"
  [chunks-resident]="tests/test_chunks.py tests/test_dispatcher.py tests/test_launch_gpu.py"
  [swiglu-ilp]="tests/test_glu_kernels.py tests/test_activations.py tests/test_activations_api.py"
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

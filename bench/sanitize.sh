#!/usr/bin/env bash
# compute-sanitizer over a representative GPU workload of moe_raw (run on a CUDA machine; issue #6):
#   workload A  python -m bench --quick --no-bench   the self-check: every public op, fwd + bwd, fp32/fp16/bf16,
#               small shapes incl. an odd H (13), num_out_tokens below / equal / above, drop_and_pad, fused/unfused
#   workload B  a pytest subset of the GPU suite: T = 0, special and non-bool routing maps, non-contiguous inputs,
#               byte (fp8) tokens, num_out_tokens, drop_and_pad; SwiGLU reference sweep, dtype
#               mixes, empty / zero-width inputs, strided inputs; sort_chunks_by_idxs (bad values included),
#               permute_and_pad and its backward, top-k routing (CUDA-graph tests need torch's caching allocator,
#               which is off here, so they are left out)
#   workload C  python -m bench.sanitize_cases: every kernel on each of its paths once, tiny shapes, results read back
#               with MOE_RAW_BLOCK_KERNELS=0: the warp-a-token gather and FP8 quantize
#   workload D  workload C with MOE_RAW_BLOCK_KERNELS=1 MOE_RAW_NO_BULK_COPY=1: their block-a-token kernels, 16-byte
#               rows written with plain stores (initcheck does not see the sm_90 bulk-copy engine's writes and would
#               report those rows as uninitialized)
# memcheck runs workloads A and B; racecheck, initcheck and synccheck run workloads C and D (on A or B they ran past
# 2 minutes). memcheck runs with
# --report-api-errors no: Numba's driver start-up probes optional entry points with cuGetProcAddress, and the
# CUDA_ERROR_INVALID_VALUE answers it expects and handles were reported as 20 "errors" (H100 run, 2026-11-27); a
# failing API call of moe_raw's own raises in Python and fails the workload. PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives
# every tensor its own cudaMalloc so that memcheck sees an access past a tensor's end (torch's caching allocator
# would otherwise hand out neighbouring memory of the same block). Logs: $OUT/sanitize_<tool>_<A|B>.log; summary
# (the sanitizer's "ERROR SUMMARY" line and the workload's exit status) in $OUT/sanitize_summary.txt.
# Usage: OUT=bench/results/x bash bench/sanitize.sh [tool ...]     (default: all four tools)
set -uo pipefail
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck initcheck synccheck)
export PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1
subset_b=(
  tests/test_permute.py::test_zero_tokens tests/test_permute.py::test_special_routing_maps
  tests/test_permute.py::test_routing_map_dtypes tests/test_permute.py::test_noncontiguous_inputs
  tests/test_permute.py::test_byte_tokens tests/test_permute.py::test_num_out_tokens
  tests/test_permute.py::test_drop_and_pad
  tests/test_activations.py::test_swiglu_matches_reference tests/test_activations.py::test_swiglu_dtype_mixes
  tests/test_activations.py::test_swiglu_empty_and_zero_width tests/test_activations.py::test_swiglu_noncontiguous_inputs_and_grads
  tests/test_chunks.py::test_gpu_bit_exact tests/test_chunks.py::test_gpu_bad_values_stay_in_bounds
  tests/test_padding.py::test_gpu_matches_reference tests/test_padding.py::test_gpu_backward_and_padding_rows_get_zero_gradient
  tests/test_topk.py
)
status=0
summary="$OUT/sanitize_summary.txt"
compute-sanitizer --version | head -2 | tee "$summary"
for tool in "${tools[@]}"; do
  workloads=(C D)
  [ "$tool" = memcheck ] && workloads=(A B)
  for workload in "${workloads[@]}"; do
    log="$OUT/sanitize_${tool}_${workload}.log"
    extra=()
    [ "$tool" = memcheck ] && extra=(--report-api-errors no)
    if [ "$workload" = A ]; then
      cmd=(python3 -m bench --quick --no-bench --out "${TMPDIR:-/tmp}/moe_raw_sanitize_selfcheck")
    elif [ "$workload" = C ]; then
      cmd=(env MOE_RAW_BLOCK_KERNELS=0 python3 -m bench.sanitize_cases)
    elif [ "$workload" = D ]; then
      cmd=(env MOE_RAW_BLOCK_KERNELS=1 MOE_RAW_NO_BULK_COPY=1 python3 -m bench.sanitize_cases)
    else
      cmd=(python3 -m pytest -q -p no:cacheprovider -m gpu -k "not graph" "${subset_b[@]}")
    fi
    start=$SECONDS
    timeout "${SANITIZE_TIMEOUT:-900}" compute-sanitizer --tool "$tool" "${extra[@]}" --print-limit 20 \
      --error-exitcode 99 "${cmd[@]}" >"$log" 2>&1
    rc=$?
    line=$(grep -hE "(ERROR|RACECHECK) SUMMARY" "$log" | tail -1)
    tests=$(grep -hE "passed|self-check:|ALL OK|MISMATCHES" "$log" | tail -1)
    echo "$tool $workload rc=$rc $((SECONDS - start))s | ${line:-no ERROR SUMMARY line} | $tests" | tee -a "$summary"
    [ $rc -ne 0 ] && status=1
  done
done
exit $status

#!/usr/bin/env bash
# Run on a CUDA machine (how moe_raw's GPU evidence is produced): install moe_raw, then the steps named on the
# command line, each logged under $OUT (default bench/results/latest):
#   smoke   python -m bench.smoke            quick self-check vs the fp64 reference
#   tests   pytest -m "gpu and not slow"     the GPU test suite (pytest-xdist, 6 processes), fuzz with its gpu profile
#   parity  pytest -m gpu tests/test_parity.py   CPU vs CUDA: outputs and gradients of every public op
#   slow    pytest -m slow                   large shapes (64-bit offsets)
#   bench   python -m bench.bench_permute    the permute/unpermute side-by-side benchmark table
#   swiglu  python -m bench.bench_swiglu     the SwiGLU family benchmark table
#   quick   python -m bench --quick          the user-facing CLI, one shape per op (record in $OUT/bench.*)
#   full    python -m bench                  the CLI at every shape, MoE layer case included
#   fuzz    pytest -m gpu tests/test_fuzz.py with MOE_RAW_HYPOTHESIS_PROFILE=gpu (150 random examples per property)
#   sanitize  bench/sanitize.sh              compute-sanitizer memcheck / racecheck / initcheck / synccheck
#   probe   python -m bench.probe_permute    permute fwd beside copy / write-only / broadcast-copy ceilings; also with
#           MOE_RAW_NO_BULK_COPY=1 and, where .probe/old holds other kernels/*.cu, with those (A/B)
#   ncu     Nsight Compute on what bounds each H100 miss: permute's row kernel (permute_scatter, or permute_grouped
#           where it is taken) and its no-lookup twin scatter_rows at every bench shape but T16k-E4-K1, unpermute_bwd at
#           DeepSeek-V3, the SwiGLU forward (moe_raw and torch.compile's kernel), torch's fill and copy kernels
#   ncu_gather  Nsight Compute on the gathers: gather_reduce / gather_warp (unpermute forward; the one
#           MOE_RAW_BLOCK_KERNELS picks, the default gather_reduce) at every bench shape and
#           unpermute_bwd at DeepSeek-V3 and T16k-E128-H4096-K6 (DRAM and L2 against their peaks, occupancy, stalls)
#           (NCU_GATHER_SHAPES / NCU_BWD_SHAPES: other shape lists, empty for none)
#   cold    host and cold-call latency: bench.cold_call (cold against back to back, the README's table),
#           bench.cold_trace (where a cold call's extra goes: host time, launches, gaps), bench.host_times
# Example: MOE_RAW_GIT_SHA=$(git rev-parse HEAD) bash bench/run_device.sh smoke tests bench swiglu
set -uo pipefail
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, cupy, numpy; print('torch', torch.__version__, 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
  echo "git sha: ${MOE_RAW_GIT_SHA:-unknown}"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
for step in "$@"; do
  echo "=== $step"
  case $step in
    smoke) python3 -m bench.smoke 2>&1 | tee "$OUT/smoke.log" || status=1 ;;
    tests) MOE_RAW_HYPOTHESIS_PROFILE=gpu python3 -m pytest -q -n 6 -m "gpu and not slow" tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1 ;;
    parity) python3 -m pytest -q -m gpu tests/test_parity.py 2>&1 | tee "$OUT/gpu_parity.log" || status=1 ;;
    slow) python3 -m pytest -q -m slow tests 2>&1 | tee "$OUT/gpu_slow_tests.log" || status=1 ;;
    bench) python3 -m bench.bench_permute --out "$OUT/bench_permute.json" 2>&1 | tee "$OUT/bench_permute.md" || status=1 ;;
    swiglu) python3 -m bench.bench_swiglu --out "$OUT/bench_swiglu.json" 2>&1 | tee "$OUT/bench_swiglu.md" || status=1 ;;
    quick) python3 -m bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench_quick.md" || status=1 ;;
    full) python3 -m bench --out "$OUT" 2>&1 | tee "$OUT/bench_full.md" || status=1 ;;
    fuzz) MOE_RAW_HYPOTHESIS_PROFILE=gpu python3 -m pytest -q -m gpu tests/test_fuzz.py 2>&1 | tee "$OUT/gpu_fuzz.log" || status=1 ;;
    sanitize) OUT="$OUT" bash bench/sanitize.sh || status=1 ;;
    probe)
      { python3 -m bench.probe_permute --json "$OUT/probe.json"
        echo "--- MOE_RAW_NO_BULK_COPY=1"; MOE_RAW_NO_BULK_COPY=1 python3 -m bench.probe_permute
        if [ -d .probe/old ]; then echo "--- kernels from .probe/old"; python3 -m bench.probe_permute --kernels .probe/old; fi
      } 2>&1 | tee "$OUT/probe.md" || status=1 ;;
    ncu)
      metrics=dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum.per_second,dram__bytes_write.sum.per_second,lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum
      sections="--section SpeedOfLight --section Occupancy --section WarpStateStats"
      { for shape in T16k-E128-H4096-K6 Qwen3-30B-A3B Mixtral-8x7B DeepSeek-V3; do
          echo "--- permute's row kernel $shape (the third call)"
          ncu --clock-control none -k regex:"permute_(scatter|grouped)" -s 2 -c 1 $sections --metrics $metrics \
            python3 -m bench.ncu_permute $shape
          echo "--- scatter_rows $shape (the same rows from a finished row map: no lookups)"
          ncu --clock-control none -k regex:scatter_rows -s 2 -c 1 $sections --metrics $metrics \
            python3 -m bench.ncu_permute $shape copy_only
        done
        echo "--- unpermute_bwd DeepSeek-V3"
        ncu --clock-control none -k regex:unpermute_bwd -s 2 -c 1 $sections --metrics $metrics \
          python3 -m bench.ncu_permute DeepSeek-V3 unpermute_bwd
        echo "--- swiglu fwd N 32768 F 2048: moe_raw, then torch.compile's triton kernel"
        ncu --clock-control none -k regex:"swiglu|triton" -c 4 $sections --metrics $metrics python3 -m bench.ncu_swiglu
        # copy_ of one contiguous tensor is a cudaMemcpy, which ncu does not profile: neg reads and writes the same bytes
        echo "--- torch fill_ (write-only, twice), then neg(out=) (read + write, the bytes of a copy), 2 GiB bf16"
        ncu --clock-control none -k regex:elementwise -c 3 $sections --metrics $metrics \
          python3 -c "import torch; d=torch.empty(1<<30,dtype=torch.bfloat16,device='cuda'); s=torch.empty_like(d); s.fill_(2); d.fill_(1); torch.neg(s, out=d); torch.cuda.synchronize()"
      } 2>&1 | tee "$OUT/ncu.txt" || status=1 ;;
    ncu_gather)
      metrics=dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum
      { for shape in ${NCU_GATHER_SHAPES-DeepSeek-V3 T16k-E128-H4096-K6 T16k-E4-H7168-K1 Mixtral-8x7B Qwen3-30B-A3B}; do
          echo "--- gather (unpermute fwd) $shape"
          ncu --clock-control none -k regex:"gather_(reduce|warp)" -c 1 --section SpeedOfLight --section Occupancy \
            --section WarpStateStats --metrics $metrics python3 -m bench.ncu_permute $shape unpermute
        done
        for shape in ${NCU_BWD_SHAPES-DeepSeek-V3 T16k-E128-H4096-K6}; do
          echo "--- unpermute_bwd $shape"
          ncu --clock-control none -k regex:unpermute_bwd -c 1 --section SpeedOfLight --section Occupancy \
            --section WarpStateStats --metrics $metrics python3 -m bench.ncu_permute $shape unpermute_bwd
        done
      } 2>&1 | tee "$OUT/ncu_gather.txt" || status=1 ;;
    cold)
      { echo "--- cold_call"; python3 -m bench.cold_call --out "$OUT/cold_call.json"
        echo "--- cold_trace"; python3 -m bench.cold_trace --out "$OUT/cold_trace.json"
        echo "--- host_times"; python3 -m bench.host_times --out "$OUT/host_times.json"
      } 2>&1 | tee "$OUT/cold.md" || status=1 ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status

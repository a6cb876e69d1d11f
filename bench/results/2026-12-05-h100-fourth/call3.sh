#!/usr/bin/env bash
# Final device call of the fourth session: python -m bench in full, cold calls, host times, ncu of permute vs its
# copy-only twin, the GPU tests of test_glu_kernels.py. Logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  python3 -c "import torch, cupy, numpy, numba; print('torch', torch.__version__, 'cupy', cupy.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)"
  cat MAIN_SHA; } > $OUT/env.txt 2>&1
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "install failed" >> $OUT/env.txt
mkdir -p $OUT/full
timeout 260 python3 -m bench --out $OUT/full > $OUT/full/bench.md 2> $OUT/full/stderr.txt; echo "bench rc=$?" >> $OUT/env.txt
{ echo "=== cold_call"; timeout 60 python3 -m bench.cold_call; echo "=== host_times"; timeout 60 python3 -m bench.host_times; } > $OUT/host.txt 2>&1
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_op_read.sum,lts__t_sectors_op_write.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem
for shape in Qwen3-30B-A3B DeepSeek-V3; do
  for pair in permute:permute_scatter copy_only:scatter_rows; do
    echo "=== $shape ${pair%%:*}"
    timeout 60 ncu --clock-control none --metrics $M -k regex:${pair##*:} -c 1 python3 -m bench.ncu_permute $shape ${pair%%:*} 2>&1 | grep -v "^==PROF==\|^==WARNING=="
  done
done > $OUT/ncu.txt 2>&1
MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout 120 python3 -m pytest -q -n 14 -m "gpu and not slow" -p no:cacheprovider tests/test_glu_kernels.py > $OUT/tests-glu.log 2>&1; echo "rc=$?" >> $OUT/tests-glu.log
cd $OUT && tar czf full.tgz full && rm -rf full

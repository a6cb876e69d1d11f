#!/usr/bin/env bash
# call 2: GPU tests part B on candidate, full python -m bench on candidate, cold calls, ncu of the SwiGLU weighted bwd / fwd
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS; R=$PWD; C=$R/.trees/candidate
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; echo "main $(cat .trees/MAIN_SHA)"; cat $C/TREE; } > $OUT/env2.txt 2>&1
cd $C && export PYTHONPATH=$C
MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout 300 python3 -m pytest -q -n 14 -m 'gpu and not slow' -p no:cacheprovider tests --ignore=tests/test_permute.py --ignore=tests/test_padding.py --ignore=tests/test_parity.py --ignore=tests/test_row_map_reuse_gpu.py --ignore=tests/test_chunks.py --ignore=tests/test_dispatcher.py --ignore=tests/test_glu_kernels.py --ignore=tests/test_activations.py --ignore=tests/test_activations_api.py --ignore=tests/test_launch_gpu.py --ignore=tests/test_quantize.py --ignore=tests/test_unpermute_grad_quantized.py > $OUT/tests-b.log 2>&1
echo "tests-b rc=$? +$((SECONDS-T0))s" >> $OUT/env2.txt
timeout 170 python3 -m bench --out $OUT/full > $OUT/bench.log 2>&1; echo "bench rc=$? +$((SECONDS-T0))s" >> $OUT/env2.txt
{ timeout 40 python3 -m bench.cold_call; for op in weighted_bwd fwd; do echo "--- ncu swiglu $op"; timeout 60 ncu --clock-control none -k regex:"glu|triton" --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis -c 4 python3 -m bench.ncu_swiglu $op; done; } > $OUT/extra.txt 2>&1
echo "done +$((SECONDS-T0))s" >> $OUT/env2.txt
cd $OUT && tar czf full.tgz full && rm -rf full

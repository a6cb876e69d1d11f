#!/usr/bin/env bash
# call 1: A/B (checkout, each pending tree, checkout) then GPU tests part A on candidate (main + all three patches)
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS; R=$PWD
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c "import torch,cupy,numba;print(torch.__version__,cupy.__version__,numba.__version__)"; echo "main $(cat .trees/MAIN_SHA)"; cat .trees/*/TREE; } > $OUT/env.txt 2>&1
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo install-failed >> $OUT/env.txt
t() { local dir=$1; shift; echo "=== [$(basename $dir)] $* (+$((SECONDS-T0))s)"; (cd $dir && PYTHONPATH=$dir timeout 150 bash -c "$*") 2>&1; }
P="python3 -m bench.probe_permute --shapes DeepSeek-V3,T16k-E128-H4096-K6,Qwen3-30B-A3B"; D="python3 -m bench.bench_dispatch"; S="python3 -m bench.bench_swiglu --activations swiglu"
{ t $R "$P; $D; $S"; t $R/.trees/permute-prefetch "$P; $D"; t $R/.trees/chunks-resident "$D"; t $R/.trees/swiglu-ilp "$S"; t $R "$P; $D; $S"; } > $OUT/ab.log
echo "ab done +$((SECONDS-T0))s" >> $OUT/env.txt
left=$((585 - (SECONDS-T0)))
cd $R/.trees/candidate && PYTHONPATH=$PWD MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout $left python3 -m pytest -q -n 14 -m 'gpu and not slow' -p no:cacheprovider tests/test_permute.py tests/test_padding.py tests/test_parity.py tests/test_row_map_reuse_gpu.py tests/test_chunks.py tests/test_dispatcher.py tests/test_glu_kernels.py tests/test_activations.py tests/test_activations_api.py tests/test_launch_gpu.py tests/test_quantize.py tests/test_unpermute_grad_quantized.py > $OUT/tests-a.log 2>&1; rc=$?; cd $R
echo "tests-a rc=$rc +$((SECONDS-T0))s" >> $OUT/env.txt

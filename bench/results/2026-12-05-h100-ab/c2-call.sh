#!/usr/bin/env bash
# call 2 (shortest): A/B main vs permute-prefetch (probe_permute) and fp8-vector-loads (bench_fp8); GPU tests of candidate's permute / FP8 files
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS
R=$PWD
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; echo "main $(cat .trees/MAIN_SHA)"; cat .trees/*/TREE; } > $OUT/env.txt 2>&1
t() { local dir=$1; shift; echo "=== [$(basename $dir)] $* (+$((SECONDS-T0))s)"; (cd $dir && PYTHONPATH=$dir timeout 70 bash -c "$*") 2>&1; }
P="python3 -m bench.probe_permute --shapes DeepSeek-V3,Qwen3-30B-A3B"; F="python3 -m bench.bench_fp8"
{ t $R/.trees/fp8-vector-loads "$F"; t $R "$F"; t $R "$P"; t $R/.trees/permute-prefetch "$P"; } > $OUT/ab1.log
echo "ab1 done +$((SECONDS-T0))s" >> $OUT/env.txt
cd $R/.trees/candidate && PYTHONPATH=$PWD timeout $((225 - (SECONDS-T0))) python3 -m pytest -q -n 14 -m 'gpu and not slow' -p no:cacheprovider tests/test_quantize.py tests/test_permute.py tests/test_padding.py tests/test_unpermute_grad_quantized.py > $OUT/tests.log 2>&1; rc=$?; cd $R
echo "tests rc=$rc +$((SECONDS-T0))s" >> $OUT/env.txt

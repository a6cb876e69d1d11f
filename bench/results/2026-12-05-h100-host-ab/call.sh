#!/usr/bin/env bash
# call 4: host time A/B (before: no signature cache / checkout: with), GPU tests of the validation change, cold calls
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS; R=$PWD
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; echo "main $(cat .trees/MAIN_SHA)"; cat .trees/before/TREE; } > $OUT/env.txt 2>&1
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo install-failed >> $OUT/env.txt
t() { local dir=$1; shift; echo "=== [$(basename $dir)] (+$((SECONDS-T0))s)"; (cd $dir && PYTHONPATH=$dir timeout 40 bash -c "$*") 2>&1; }
H="python3 -c 'from bench import bench_permute as B
for r in B.host_time_rows(): print(r[\"shape\"], \"|\", r[\"provider\"], \"|\", round(r[\"us\"], 1))'"
{ for i in 1 2; do t $R/.trees/before "$H"; t $R "$H"; done; } > $OUT/host-ab.txt 2>&1
echo "host ab +$((SECONDS-T0))s" >> $OUT/env.txt
MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout 70 python3 -m pytest -q -n 14 -m 'gpu and not slow' -p no:cacheprovider tests/test_bad_input.py tests/test_validation.py > $OUT/tests.log 2>&1
echo "tests rc=$? +$((SECONDS-T0))s" >> $OUT/env.txt

echo "done +$((SECONDS-T0))s" >> $OUT/env.txt

#!/usr/bin/env bash
# call 3: python -m bench in full on main, cold calls, profile_host, ncu of the SwiGLU weighted bwd; chunks-resident A/B
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$SECONDS; R=$PWD
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c "import torch,cupy,numba;print(torch.__version__,cupy.__version__,numba.__version__)"; echo "main $(cat .trees/MAIN_SHA)"; cat .trees/*/TREE; } > $OUT/env.txt 2>&1
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo install-failed >> $OUT/env.txt
timeout 330 python3 -m bench --out $OUT/full > $OUT/bench.log 2>&1; echo "bench rc=$? +$((SECONDS-T0))s" >> $OUT/env.txt
t() { local dir=$1; shift; echo "=== [$(basename $dir)] $* (+$((SECONDS-T0))s)"; (cd $dir && PYTHONPATH=$dir timeout 60 bash -c "$*") 2>&1; }
{ t $R "python3 -m bench.cold_call"; t $R "python3 -m bench.profile_host"; } > $OUT/host.txt 2>&1
echo "host +$((SECONDS-T0))s" >> $OUT/env.txt
D="python3 -m bench.bench_dispatch"
[ $((SECONDS-T0)) -lt 440 ] && { t $R "$D"; t $R/.trees/chunks-resident "$D"; t $R "$D"; } > $OUT/ab.txt 2>&1
[ $((SECONDS-T0)) -lt 500 ] && { echo "--- ncu swiglu weighted_bwd"; timeout 50 ncu --clock-control none -k regex:"glu" -c 1 --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis python3 -m bench.ncu_swiglu weighted_bwd; } >> $OUT/host.txt 2>&1
echo "done +$((SECONDS-T0))s" >> $OUT/env.txt
cd $OUT && tar czf full.tgz full && rm -rf full

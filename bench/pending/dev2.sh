set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
R=$PWD
{ for d in "$R" "$R/.trees/main" "$R" "$R/.trees/main"; do echo "=== $d (+${SECONDS}s)"; (cd $d && PYTHONPATH=$d timeout 60 python3 -m bench.permute_fwd); done; } > $OUT/ab.log 2>&1
MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout $((585 - SECONDS)) python3 -m pytest -v -n 14 -m "gpu and not slow" -p no:cacheprovider tests > $OUT/gpu-tests.log 2>&1
echo "suite rc=$? (+${SECONDS}s)" >> $OUT/ab.log
tail -3 $OUT/ab.log
# time left: cold calls (pdl-scatter's launch path under a cold start)
if [ $SECONDS -lt 530 ]; then timeout $((590 - SECONDS)) python3 -m bench.cold_call > $OUT/cold.log 2>&1; fi

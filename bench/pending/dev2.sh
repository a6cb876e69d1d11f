# One device call after a merge: the GPU tests of the files the merge touches, the same-run A/B of
# bench.permute_fwd against .trees/main (main before the merge), the rest of the GPU suite, then cold calls; logs in $OUT.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
R=$PWD
FIRST="tests/test_reliability_gpu.py tests/test_permute.py tests/test_padding.py tests/test_launch_gpu.py"
MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout 170 python3 -m pytest -v -n 14 -m "gpu and not slow" -p no:cacheprovider $FIRST > $OUT/gpu-tests-1.log 2>&1
echo "first files rc=$? (+${SECONDS}s)" > $OUT/ab.log
{ for d in "$R" "$R/.trees/main" "$R"; do echo "=== $d (+${SECONDS}s)"; (cd $d && PYTHONPATH=$d timeout 60 python3 -m bench.permute_fwd); done; } >> $OUT/ab.log 2>&1
IGN=$(for f in $FIRST; do printf -- "--ignore=%s " $f; done)
MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout $((585 - SECONDS)) python3 -m pytest -v -n 14 -m "gpu and not slow" -p no:cacheprovider $IGN tests > $OUT/gpu-tests-2.log 2>&1
echo "rest rc=$? (+${SECONDS}s)" >> $OUT/ab.log
if [ $SECONDS -lt 530 ]; then timeout $((590 - SECONDS)) python3 -m bench.cold_call > $OUT/cold.log 2>&1; fi
tail -3 $OUT/ab.log

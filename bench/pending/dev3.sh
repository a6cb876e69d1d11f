# A short device call: the GPU tests of the families whose first calls now compile groups of instances (router,
# quantize, chunks, topk) and of what changed since the last GPU run (the threads' compile-once test, the overlapped
# launch's tests), most important first; pytest -v so a cut run still says which passed. Logs in $OUT.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
run() { MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$1" python3 -m pytest -v -n 14 -m "gpu and not slow" -p no:cacheprovider "${@:3}" > "$OUT/$2" 2>&1; echo "$2 rc=$? (+${SECONDS}s)" >> $OUT/steps.log; }
run 80 tests-groups.log tests/test_router.py tests/test_quantize.py tests/test_unpermute_grad_quantized.py tests/test_chunks.py tests/test_topk.py tests/test_reliability_gpu.py
run 200 tests-permute.log tests/test_permute.py -k "overlapped or graph or host_sync or side_stream" tests/test_padding.py
cat $OUT/steps.log

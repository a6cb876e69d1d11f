#!/usr/bin/env bash
# Run on a machine with 2+ CUDA GPUs (issue #8 evidence): install moe_raw, then the multi-GPU tests (NCCL dispatcher,
# graph capture, cuda:1 tests), torch.compile's CUDA tests, the EP benchmark and the example, each logged under $OUT.
# Example: MOE_RAW_GIT_SHA=$(git rev-parse HEAD) OUT=bench/results/ep bash bench/run_ep_device.sh
set -uo pipefail
OUT=${OUT:-bench/results/latest-ep}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
status=0
{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  nvidia-smi topo -m
  python3 -c "import torch, cupy, numpy; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version(), 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
  echo "git sha: ${MOE_RAW_GIT_SHA:-unknown}"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee "$OUT/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
TWO_GPU_TESTS=(tests/test_bad_input.py::test_tensors_on_two_gpus
               tests/test_reliability_gpu.py::test_every_op_on_the_second_gpu_on_its_current_stream
               tests/test_activations.py::test_swiglu_second_device)
step dispatcher_tests 200 python3 -m pytest -q -rs tests/test_dispatcher.py "${TWO_GPU_TESTS[@]}"
step bench_ep 200 torchrun --standalone --nproc-per-node 2 -m bench.bench_ep --drop-and-pad --out "$OUT/bench_ep.json"
step example 60 bash -c 'torchrun --standalone --nproc-per-node 2 examples/ep_moe_layer.py --dtype bf16 &&
  torchrun --standalone --nproc-per-node 2 examples/ep_moe_layer.py --dtype bf16 --drop-and-pad'
[ "${SKIP_COMPILE:-0}" = 1 ] || step compile_tests ${COMPILE_LIMIT:-240} python3 -m pytest -q -rs -m gpu tests/test_compile.py
exit $status

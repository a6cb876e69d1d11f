#!/usr/bin/env bash
# Device call carrying .trees (pf16 pf32 pf32el pf48: kernels/permute.cu with MOE_RAW_PREFETCH_MB / _EVICT_LAST set):
# permute's forward (bench.permute_fwd) in the checkout (prefetch off) and each tree, two interleaved rounds.
set -u
export PYTHONUNBUFFERED=1
R=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e "$R" > /dev/null 2>&1
python3 -c "import torch; print('SMs', torch.cuda.get_device_properties(0).multi_processor_count)" >> "$OUT/ab.log" 2>&1
for round in 1 2; do
  for t in checkout pf16 pf32 pf32el pf48; do
    d=$R; [ "$t" = checkout ] || d=$R/.trees/$t
    [ $SECONDS -lt ${AB_END:-400} ] || { echo "$t round $round skipped (+${SECONDS}s)" >> "$OUT/ab.log"; continue; }
    (cd "$d" && PYTHONPATH=$d timeout 120 python3 -m bench.permute_fwd "$t") >> "$OUT/ab.log" 2>&1
  done
done
cat "$OUT/ab.log"

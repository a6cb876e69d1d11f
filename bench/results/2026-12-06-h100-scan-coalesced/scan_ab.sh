#!/usr/bin/env bash
# Device call carrying .trees/base (main before the coalesced routing_scan): permute's forward in the checkout (the
# change) and base, interleaved twice; the GPU tests of the files on the tables' path in the checkout; ncu of
# routing_scan in both (DeepSeek-V3, Qwen3, Mixtral), as time allows (END seconds).
set -u
export PYTHONUNBUFFERED=1
R=$PWD
END=${END:-420}
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e "$R" > /dev/null 2>&1
for round in 1 2; do
  for t in checkout base; do
    d=$R; [ "$t" = checkout ] || d=$R/.trees/$t
    (cd "$d" && PYTHONPATH=$d timeout 100 python3 -m bench.permute_fwd "$t") >> "$OUT/ab.log" 2>&1
  done
done
echo "ab done (+${SECONDS}s)" >> "$OUT/steps.log"
left=$((END - SECONDS - 60))
if [ $left -gt 60 ]; then
  MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout $left python3 -m pytest -v -n 14 -m "gpu and not slow" -p no:cacheprovider \
    tests/test_permute.py tests/test_padding.py tests/test_topk.py tests/test_launch_gpu.py > "$OUT/tests.log" 2>&1
  echo "tests rc=$? (+${SECONDS}s)" >> "$OUT/steps.log"
  tail -3 "$OUT/tests.log"; gzip "$OUT/tests.log"
fi
for t in checkout base; do
  [ $((END - SECONDS)) -gt 25 ] || break
  d=$R; [ "$t" = checkout ] || d=$R/.trees/$t
  echo "=== $t" >> "$OUT/ncu_scan.txt"
  (cd "$d" && PYTHONPATH=$d timeout 40 ncu --clock-control none -k regex:routing_scan --metrics gpu__time_duration.sum \
    python3 "$R/bench/pending/ncu_scan.py" DeepSeek-V3 Qwen3-30B-A3B Mixtral-8x7B) 2>&1 | grep -E "routing_scan|duration" >> "$OUT/ncu_scan.txt"
done
cat "$OUT/ab.log" "$OUT/steps.log" "$OUT/ncu_scan.txt"

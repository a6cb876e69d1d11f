#!/usr/bin/env bash
# One device call for an H200 (carry [".trees"] after `GROUPED_ALL=1 bash bench/pending/trees.sh [NAME ...]`, with
# each pending patch named, if any): the record and the gather kinds (next-call.sh's H200 steps), then ab.sh in the
# time left (each tree's A/B and tests, main with permute_grouped on every shape, the probe). On any other card it
# stops at once: the H100 has run all of it (SHA=<rev> passes the git revision; the device gets no .git).
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu" > "$OUT/gpu.txt"
[[ $gpu == *H200* ]] || { echo "not an H200: $gpu"; exit 0; }
export PYTHONUNBUFFERED=1
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
# RECORD_PARTS / RECORD_S: a shorter record when little device time is left (e.g. "full" in 180 s)
MOE_RAW_GIT_SHA=${SHA:-unknown} OUT=$OUT/r timeout ${RECORD_S:-260} bash bench/run_device.sh ${RECORD_PARTS:-full cold probe} \
  > "$OUT/record.log" 2>&1
echo "record rc=$? (+${SECONDS}s)" >> "$OUT/steps.log"
tar czf "$OUT/record.tgz" -C "$OUT" r && rm -rf "$OUT/r"
[ $((${CALL_END:-580} - SECONDS)) -ge 90 ] || { cat "$OUT/steps.log"; exit 0; }  # no time for the kinds and the A/B
for k in "" 0 "" 0; do
  echo "=== MOE_RAW_BLOCK_KERNELS=$k (+${SECONDS}s)"; MOE_RAW_BLOCK_KERNELS=$k timeout 60 python3 -m bench.gather_ab
done > "$OUT/kinds.log" 2>&1
echo "kinds rc=$? (+${SECONDS}s)" >> "$OUT/steps.log"
AB_DEADLINE=$((${CALL_END:-580} - SECONDS)) bash bench/pending/ab.sh
echo "ab rc=$? (+${SECONDS}s)" >> "$OUT/steps.log"
cat "$OUT/steps.log"

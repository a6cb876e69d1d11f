#!/usr/bin/env bash
# The next device call (main after the thirtieth session, 2026-12-08; kernels as in the twenty-eighth), carrying
# nothing (.trees with THEN=ab):
#   SHA=$(git rev-parse --short HEAD) here, then `SHA=<that> bash bench/pending/next-call.sh` there, with kind
#   "nvidia-h200" named (a call without a kind keeps the last call's kind; one that names nvidia-h200 without
#   needs_h200 may still get an H100, as in the twenty-seventh session, and needs_h200 is only for work that cannot
#   fit an H100, never to match a card: so ON_H100 says what an H100 does with the call). All by CALL_END
#   seconds (default 570; lower it when little device time is left), most important first:
# - on an H200 (ON_H200 names other steps, in order): with THEN=ab bench/pending/ab.sh on the trees carried (carry
#   [".trees"] after `bash bench/pending/trees.sh NAME`), then the gathers, unpermute_bwd and the weighted SwiGLU
#   backward under ncu, the H200 misses no call has profiled on these kernels, then the record. The whole GPU suite
#   passed on these kernels on an H100 (bench/results/2026-12-07-h100-twentysixth-suite): add `suite` once kernels
#   change. With little time: ON_H200=misses_ncu (the gathers at DeepSeek-V3 and K 1, unpermute_bwd where it missed,
#   then the SwiGLU backward; about 4 minutes);
# - on an H100: the record (add `suite` first once kernels change: on the H100 hosts so far the suite took
#   355-453 s and the record 240-273 s). The twenty-seventh session's H100 ran `gather_ncu glu_bwd_ncu record` on main
#   305fc16 (bench/results/2026-12-07-h100-twentyseventh), so while kernels stay as they are an H100 adds little.
# H200_ONLY=1: stop at once on any other card. RECORD_PARTS / RECORD_S: a shorter record when little device time is
# left (e.g. RECORD_PARTS=full RECORD_S=170). ON_H100: the steps on any other card, in order (default "record";
# e.g. ON_H100="suite record" once kernels change, ON_H100=ab for ab.sh on the trees carried).
# Steps: record suite ab phased writes sizes kinds glu_ncu glu_bwd_ncu chunk_ncu ncu_misses gather_ncu misses_ncu. In
# $OUT: gpu.txt, steps.log (each step's exit status and end time), record.log, record.tgz, tests.log.gz, ab.log and
# ab.sh's test logs, probe-phased.md, write_probe.md, size_copy.md, kinds.log, ncu-swiglu.txt, ncu-swiglu-bwd.txt,
# ncu-chunks.txt, ncu-misses.txt, ncu-gather.txt.
set -u
export PYTHONUNBUFFERED=1
END=${CALL_END:-570}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu" > "$OUT/gpu.txt"
[[ -z ${H200_ONLY:-} || $gpu == *H200* ]] || { echo "not an H200: $gpu"; exit 0; }
sha=${SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  # the device gets no .git: pass SHA=<rev>
step() { echo "$1 rc=$2 (+${SECONDS}s)" >> "$OUT/steps.log"; }
suite() {
  local left=$((END - SECONDS))
  [ "$left" -ge 60 ] || { step "suite skipped" -; return; }
  MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$left" python3 -m pytest -v -n 14 -m "gpu and not slow" -p no:cacheprovider \
    tests > "$OUT/tests.log" 2>&1
  step suite $?
  grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -20
  gzip "$OUT/tests.log"
}
record() {
  local left=$((END - SECONDS))
  [ "$left" -ge 150 ] || { step "record skipped" -; return; }
  local cap=${RECORD_S:-330}  # the H200 of 2026-12-07: 135 s of self-check compiles, cut at 260
  MOE_RAW_GIT_SHA=$sha OUT=$OUT/r timeout $((left < cap ? left : cap)) bash bench/run_device.sh \
    ${RECORD_PARTS:-full cold probe} > "$OUT/record.log" 2>&1
  step record $?
  tar czf "$OUT/record.tgz" -C "$OUT" r && rm -rf "$OUT/r"
}
kinds() {
  [ $((END - SECONDS)) -ge 90 ] || { step "kinds skipped" -; return; }
  for k in "" 0 "" 0; do
    echo "=== MOE_RAW_BLOCK_KERNELS=$k (+${SECONDS}s)"; MOE_RAW_BLOCK_KERNELS=$k timeout 60 python3 -m bench.gather_ab
  done > "$OUT/kinds.log" 2>&1
  step kinds $?
}
writes() {  # write_probe.py: is permute's forward held by the store flavour on the H200 (fill_ 79% of copy there)?
  local left=$((END - SECONDS))
  [ "$left" -ge 45 ] || { step "write_probe skipped" -; return; }
  PYTHONPATH=. timeout $((left < 90 ? left : 90)) python3 bench/pending/write_probe.py > "$OUT/write_probe.md" 2>&1
  step write_probe $?
}
sizes() {  # size_copy.py: a copy of each op's own bytes against the 2 GiB copy (the short ops' ceiling)
  [ $((END - SECONDS)) -ge 40 ] || { step "sizes skipped" -; return; }
  PYTHONPATH=. timeout 60 python3 bench/pending/size_copy.py > "$OUT/size_copy.md" 2>&1
  step sizes $?
}
glu_ncu() {  # SwiGLU fwd / weighted fwd at F 2048 under ncu beside torch.compile's kernel (the H200's gap to it)
  [ $((END - SECONDS)) -ge 150 ] || { step "glu_ncu skipped" -; return; }
  for op in fwd weighted_fwd; do
    echo "--- $op N 32768 F 2048: moe_raw, then torch.compile's triton kernel"
    timeout 80 ncu --clock-control none -k regex:"glu|triton" -c 4 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum \
      python3 -m bench.ncu_swiglu $op
  done > "$OUT/ncu-swiglu.txt" 2>&1
  step glu_ncu $?
}
ab() {
  AB_DEADLINE=$((END - SECONDS)) AB_PROBE=0 bash bench/pending/ab.sh
  step ab $?
}
phased() {  # the lookup-free phased movers (batches of whole rows staged a block), never run on an H200 before
  local left=$((END - SECONDS))
  [ "$left" -ge 60 ] || { step "phased skipped" -; return; }
  timeout $((left < 150 ? left : 150)) python3 -m bench.probe_permute --phased --json "$OUT/probe-phased.json" \
    > "$OUT/probe-phased.md" 2>&1
  step phased $?
}
ncu_misses() {  # bench/run_device.sh ncu: each permute row kernel beside scatter_rows, unpermute_bwd, SwiGLU, fill / neg
  local left=$((END - SECONDS))
  [ "$left" -ge 120 ] || { step "ncu_misses skipped" -; return; }
  OUT=$OUT/ncu timeout "$left" bash bench/run_device.sh ncu > /dev/null 2>&1
  step ncu_misses $?
  mv "$OUT/ncu/ncu.txt" "$OUT/ncu-misses.txt" 2>/dev/null; rm -rf "$OUT/ncu"
}
gather_ncu() {  # bench/run_device.sh ncu_gather: the gathers at every shape, unpermute_bwd at the shapes it misses
  local left=$((END - SECONDS))
  [ "$left" -ge 90 ] || { step "gather_ncu skipped" -; return; }
  # unpermute bwd missed 92% on the H200 at DeepSeek-V3, Mixtral and Qwen3 (T16k-E128-K6 92.0% with the quad)
  NCU_BWD_SHAPES=${NCU_BWD_SHAPES-DeepSeek-V3 T16k-E128-H4096-K6 Mixtral-8x7B Qwen3-30B-A3B} \
    OUT=$OUT/ncug timeout $((left < 260 ? left : 260)) bash bench/run_device.sh ncu_gather > /dev/null 2>&1
  step gather_ncu $?
  mv "$OUT/ncug/ncu_gather.txt" "$OUT/ncu-gather.txt" 2>/dev/null; rm -rf "$OUT/ncug"
}
glu_bwd_ncu() {  # the weighted SwiGLU backward at F 2048 under ncu beside torch.compile's kernels
  [ $((END - SECONDS)) -ge 60 ] || { step "glu_bwd_ncu skipped" -; return; }
  timeout 80 ncu --clock-control none -k regex:"glu|triton" -c 4 --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum \
    python3 -m bench.ncu_swiglu weighted_bwd > "$OUT/ncu-swiglu-bwd.txt" 2>&1
  step glu_bwd_ncu $?
}
misses_ncu() {  # the short form for little device time: the gather at DeepSeek-V3 and K 1, unpermute_bwd where it
  # missed, the weighted SwiGLU bwd (about 4 minutes)
  NCU_GATHER_SHAPES="DeepSeek-V3 T16k-E4-H7168-K1" NCU_BWD_SHAPES="DeepSeek-V3 Mixtral-8x7B Qwen3-30B-A3B" gather_ncu
  glu_bwd_ncu
}
chunk_ncu() {  # chunk_sort under ncu (the H100's is in bench/results/2026-12-07-h100-twentysecond-merged)
  [ $((END - SECONDS)) -ge 60 ] || { step "chunk_ncu skipped" -; return; }
  PYTHONPATH=. timeout 60 ncu --clock-control none -k regex:chunk_sort -c 2 --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section LaunchStats python3 bench/pending/chunks_ab.py > "$OUT/ncu-chunks.txt" 2>&1
  step chunk_ncu $?
}
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
if [[ $gpu == *H200* ]]; then
  steps=${ON_H200:-$([ "${THEN:-}" = ab ] && echo ab) gather_ncu glu_bwd_ncu record}
  # phased prints the probe's table too: with it in the steps the record leaves its probe out (not run twice)
  [[ " $steps " == *" phased "* ]] && RECORD_PARTS=${RECORD_PARTS:-full cold}
  for s in $steps; do "$s"; done
else
  for s in ${ON_H100:-record}; do "$s"; done
fi
cat "$OUT/steps.log"

#!/usr/bin/env bash
# Every pending patch in one device call, merge-ready: A/B and the whole GPU suite. Here:
#   ALL="NAME ..." bash bench/pending/trees.sh     (each patch as a tree, and .trees/all = main + the ALL patches)
# then a device call carrying [".trees"]:  bash bench/pending/one-call.sh
# 1. ab.sh without its per-file tests and probe: each tree's benchmark between two runs of the checkout's (AB_END
#    seconds at most, default 200: about 180 s for chunks-rows8, glu-hw-cvt and unpermute-bwd-lone-row);
# 2. the whole GPU suite in .trees/all, in the time left before CALL_END (default 585) less PROBE_S (default 0):
#    the patches touch different kernels, so a pass there tests each of them (on the H200 the suite took 327 s on
#    2026-12-06; on H100 hosts 383-437 s, so there it may be cut: its log is -v and names each test it reached);
# 3. bench/pending/write_probe.py in what is left (about 30 s; PROBE_S=40 keeps it that long).
# Back in $OUT: gpu.txt, steps.log, ab.log, tests-all.log.gz, write_probe.md.
set -u
export PYTHONUNBUFFERED=1
END=${CALL_END:-585}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
step() { echo "$1 rc=$2 (+${SECONDS}s)" >> "$OUT/steps.log"; }
AB_TESTS=0 AB_PROBE=0 AB_DEADLINE=${AB_END:-200} bash bench/pending/ab.sh
step ab $?
left=$((END - SECONDS - ${PROBE_S:-0}))
if [ ! -d .trees/all ]; then
  step "suite: no .trees/all" -
elif [ "$left" -lt 60 ]; then
  step "suite skipped, ${left}s left" -
else
  (cd .trees/all && PYTHONPATH=$PWD MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$left" python3 -m pytest -v -n 14 \
    -m "gpu and not slow" -p no:cacheprovider tests) > "$OUT/tests-all.log" 2>&1
  step "suite in .trees/all ($(cat .trees/all/TREE))" $?
  grep -E "FAILED|ERROR|passed|failed" "$OUT/tests-all.log" | tail -20
  gzip "$OUT/tests-all.log"
fi
left=$((END - SECONDS))
if [ "$left" -ge 30 ]; then
  PYTHONPATH=. timeout "$left" python3 bench/pending/write_probe.py > "$OUT/write_probe.md" 2>&1
  step write_probe $?
fi
cat "$OUT/steps.log"

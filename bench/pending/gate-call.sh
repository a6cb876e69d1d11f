#!/usr/bin/env bash
# One short device call for one pending tree (written for grouped-unscanned-gated, fourteenth session), carrying
# .trees (`trees.sh NAME`; TREE=NAME, default the first tree there): its permute A/B beside the checkout (ROUNDS,
# default two), then the GPU tests in its tree (SUITE: the test paths, default the whole suite; on an H200 unless
# NO_RECORD: main's record first, the tests in the time left). Logs under $OUT: gpu.txt, ab.log, suite.log.gz,
# record.log, record.tgz.
set -u
export PYTHONUNBUFFERED=1
R=$PWD END=${CALL_END:-585}
T=$R/.trees/${TREE:-$(cd "$R/.trees" && ls -d */ | head -1 | tr -d /)}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$gpu" > "$OUT/gpu.txt"
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e "$R" > /dev/null 2>&1
if [[ $gpu == *H200* && -z ${NO_RECORD:-} ]]; then
  MOE_RAW_GIT_SHA=${SHA:-unknown} OUT=$OUT/r timeout 260 bash bench/run_device.sh full cold probe > "$OUT/record.log" 2>&1
  echo "record rc=$? (+${SECONDS}s)" >> "$OUT/ab.log"; tar czf "$OUT/record.tgz" -C "$OUT" r && rm -rf "$OUT/r"
fi
for round in $(seq "${ROUNDS:-2}"); do
  for d in "$R" "$T"; do
    echo "=== $(basename "$d") round $round (+${SECONDS}s)" >> "$OUT/ab.log"
    (cd "$d" && PYTHONPATH=$d timeout 60 python3 -m bench.permute_fwd) >> "$OUT/ab.log" 2>&1
  done
done
echo "=== checkout (+${SECONDS}s)" >> "$OUT/ab.log"; PYTHONPATH=$R timeout 60 python3 -m bench.permute_fwd >> "$OUT/ab.log" 2>&1
left=$((END - SECONDS))
(cd "$T" && PYTHONPATH=$T MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$left" python3 -m pytest -v -n 14 -m "gpu and not slow" \
  -p no:cacheprovider ${SUITE:-tests}) > "$OUT/suite.log" 2>&1
echo "suite rc=$? (+${SECONDS}s)" >> "$OUT/ab.log"
grep -E "FAILED|ERROR|passed|failed" "$OUT/suite.log" | tail -15; gzip "$OUT/suite.log"
sed 's/ unknown N [0-9.]* pad [0-9.]* ([0-9.]*%)//g' "$OUT/ab.log"

#!/usr/bin/env bash
# One device call for bench/pending/gather-packs (after `bash bench/pending/trees.sh gather-packs` here, carrying
# .trees): the A/B (checkout, tree, checkout, tree, checkout: bench.gather_ab), then the whole GPU suite in the tree.
set -u
export PYTHONUNBUFFERED=1
R=$PWD; T=$R/.trees/gather-packs
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > "$OUT/gpu.txt"
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
for d in "$R" "$T" "$R" "$T" "$R"; do
  echo "=== $([ "$d" = "$R" ] && echo checkout || echo gather-packs) (+${SECONDS}s)"
  (cd "$d" && PYTHONPATH=$d timeout 60 python3 -m bench.gather_ab) 2>&1
done > "$OUT/ab.log"
(cd "$T" && PYTHONPATH=$T python3 -c "import moe_raw; print('tree imports', moe_raw.__file__)") >> "$OUT/ab.log" 2>&1
left=$((${CALL_END:-560} - SECONDS))
(cd "$T" && PYTHONPATH=$T MOE_RAW_HYPOTHESIS_PROFILE=gpu timeout "$left" python3 -m pytest -v -n 14 -m "gpu and not slow" \
  -p no:cacheprovider tests) > "$OUT/tests-gather-packs.log" 2>&1
echo "suite rc=$? (+${SECONDS}s)" >> "$OUT/ab.log"
tail -2 "$OUT/tests-gather-packs.log"; grep -E "^FAILED|^ERROR" "$OUT/tests-gather-packs.log" | head -20
gzip "$OUT/tests-gather-packs.log"
cat "$OUT/ab.log" | cut -c1-400

#!/usr/bin/env bash
# Export main plus each pending patch as a tree under .trees/<name>/ (what bench/export_trees.sh does for a branch),
# so one device call can A/B them beside the checkout: carry ".trees", then on the device
#   bash bench/pending/ab.sh           (writes $OUT/ab.log and $OUT/tests-<name>.log)
# Usage: [BASE=REV] [GROUPED_ALL=1] [GROUPED_SMALL=1] bash bench/pending/trees.sh [NAME ...]   (default: every bench/pending/*.patch)
#   BASE: also export commit REV as .trees/base, to A/B a change already on main against the main before it
#   GROUPED_ALL: also export main with permute_grouped taken on every shape (dispatch.py's _GROUP_MIN_* = 0)
#   GROUPED_SMALL: and main with permute_grouped on every shape in groups of at most 32 KiB (8 tokens of 4 KiB at
#     Qwen3-30B-A3B, where the 16-token groups lost): permute_grouped never tried smaller groups
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
names=("$@")
shopt -s nullglob
if [ ${#names[@]} -eq 0 ]; then for p in bench/pending/*.patch; do names+=("$(basename "$p" .patch)"); done; fi
[ ${#names[@]} -gt 0 ] || [ -n "${GROUPED_ALL:-}${BASE:-}" ] || { echo "trees.sh: no patch in bench/pending/" >&2; exit 1; }
rm -rf .trees  # only the trees named here: ab.sh A/Bs every tree it finds
for name in "${names[@]}"; do
  dir=.trees/$name
  rm -rf "$dir" && mkdir -p "$dir"
  git archive HEAD | tar -x -C "$dir" --exclude=bench/results  # records: 7 MB a tree of the 64 MiB carry
  git apply --directory="$dir" "bench/pending/$name.patch"
  echo "$dir: main $(git rev-parse --short HEAD) + bench/pending/$name.patch" | tee "$dir/TREE"
done
if [ -n "${GROUPED_ALL:-}" ]; then  # main with permute_grouped on every shape: is the H100's rule the H200's?
  mkdir -p .trees/permute-grouped-all && git archive HEAD | tar -x -C .trees/permute-grouped-all --exclude=bench/results
  sed -i 's/^_GROUP_MIN_ROW_BYTES = .*/_GROUP_MIN_ROW_BYTES = 0/; s/^_GROUP_MIN_PAIRS = .*/_GROUP_MIN_PAIRS = 0/' \
    .trees/permute-grouped-all/moe_raw/_kernels/dispatch.py
  grep -q "^_GROUP_MIN_PAIRS = 0" .trees/permute-grouped-all/moe_raw/_kernels/dispatch.py
  echo ".trees/permute-grouped-all: main $(git rev-parse --short HEAD), permute_grouped on every shape" \
    | tee .trees/permute-grouped-all/TREE
fi
if [ -n "${GROUPED_SMALL:-}" ]; then
  d=.trees/permute-grouped-small
  mkdir -p $d && git archive HEAD | tar -x -C $d --exclude=bench/results
  sed -i 's/^_GROUP_MIN_ROW_BYTES = .*/_GROUP_MIN_ROW_BYTES = 0/; s/^_GROUP_MIN_PAIRS = .*/_GROUP_MIN_PAIRS = 0/; s/^_GROUP_BYTES = .*/_GROUP_BYTES = 32 * 1024/' \
    $d/moe_raw/_kernels/dispatch.py
  grep -q "^_GROUP_BYTES = 32 \* 1024" $d/moe_raw/_kernels/dispatch.py
  echo "$d: main $(git rev-parse --short HEAD), permute_grouped on every shape, groups of at most 32 KiB" | tee $d/TREE
fi
if [ -n "${BASE:-}" ]; then
  mkdir -p .trees/base && git archive "$BASE" | tar -x -C .trees/base --exclude=bench/results
  echo ".trees/base: $(git rev-parse --short "$BASE")" | tee .trees/base/TREE
fi
git rev-parse --short HEAD > .trees/MAIN_SHA

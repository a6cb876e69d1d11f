#!/usr/bin/env bash
# Export main plus each pending patch as a tree under .trees/<name>/ (what bench/export_trees.sh does for a branch),
# so one device call can A/B them beside the checkout: carry ".trees", then on the device
#   bash bench/pending/ab.sh           (writes $OUT/ab.log and $OUT/tests-<name>.log)
# Usage: [BASE=REV] [GROUPED_ALL=1] [GROUPED_SMALL=1] [GROUPED_PATCH=NAME] bash bench/pending/trees.sh [NAME ...]
#   (default: every bench/pending/*.patch)
#   BASE: also export commit REV as .trees/base, to A/B a change already on main against the main before it
#   GROUPED_ALL: also export main with permute_grouped taken on every shape (dispatch.py's _GROUP_MIN_* = 0)
#   GROUPED_SMALL: and main with permute_grouped on every shape in groups of at most 32 KiB (8 tokens of 4 KiB at
#     Qwen3-30B-A3B, where the 16-token groups lost)
#   GROUPED_PATCH: the GROUPED_* trees start from main + bench/pending/NAME.patch (e.g. grouped-lean)
#   ALL="NAME ...": also export main with all those patches applied as .trees/all (ab.sh has no benchmark for it and
#     skips it; bench/pending/one-call.sh runs the whole GPU suite there, so one call tests every patch at once)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
names=("$@")
shopt -s nullglob
if [ ${#names[@]} -eq 0 ]; then for p in bench/pending/*.patch; do names+=("$(basename "$p" .patch)"); done; fi
[ ${#names[@]} -gt 0 ] || [ -n "${GROUPED_ALL:-}${GROUPED_SMALL:-}${BASE:-}" ] || { echo "trees.sh: no patch in bench/pending/" >&2; exit 1; }
rm -rf .trees  # only the trees named here: ab.sh A/Bs every tree it finds
for name in "${names[@]}"; do
  dir=.trees/$name
  rm -rf "$dir" && mkdir -p "$dir"
  git archive HEAD | tar -x -C "$dir" --exclude=bench/results  # records: 7 MB a tree of the 64 MiB carry
  git apply --directory="$dir" "bench/pending/$name.patch"
  echo "$dir: main $(git rev-parse --short HEAD) + bench/pending/$name.patch" | tee "$dir/TREE"
done
# main (or main + bench/pending/$GROUPED_PATCH.patch) with permute_grouped on every shape, $2 the sed of its sizing
grouped_tree() {
  local d=.trees/$1 base="main $(git rev-parse --short HEAD)"
  mkdir -p "$d" && git archive HEAD | tar -x -C "$d" --exclude=bench/results
  if [ -n "${GROUPED_PATCH:-}" ]; then
    git apply --directory="$d" "bench/pending/$GROUPED_PATCH.patch" && base="$base + $GROUPED_PATCH"
  fi
  sed -i "s/^_GROUP_MIN_ROW_BYTES = .*/_GROUP_MIN_ROW_BYTES = 0/; s/^_GROUP_MIN_PAIRS = .*/_GROUP_MIN_PAIRS = 0/; $2" \
    "$d/moe_raw/_kernels/dispatch.py"
  grep -q "^_GROUP_MIN_PAIRS = 0" "$d/moe_raw/_kernels/dispatch.py"
  echo "$d: $base, permute_grouped on every shape$3" | tee "$d/TREE"
}
# is the H100's rule the H200's?
[ -z "${GROUPED_ALL:-}" ] || grouped_tree permute-grouped-all "" ""
[ -z "${GROUPED_SMALL:-}" ] || grouped_tree permute-grouped-small "s/^_GROUP_BYTES = .*/_GROUP_BYTES = 32 * 1024/" \
  ", groups of at most 32 KiB"
if [ -n "${BASE:-}" ]; then
  mkdir -p .trees/base && git archive "$BASE" | tar -x -C .trees/base --exclude=bench/results
  echo ".trees/base: $(git rev-parse --short "$BASE")" | tee .trees/base/TREE
fi
if [ -n "${ALL:-}" ]; then
  mkdir -p .trees/all && git archive HEAD | tar -x -C .trees/all --exclude=bench/results
  for name in $ALL; do git apply --directory=.trees/all "bench/pending/$name.patch"; done
  echo ".trees/all: main $(git rev-parse --short HEAD) + $ALL" | tee .trees/all/TREE
fi
git rev-parse --short HEAD > .trees/MAIN_SHA

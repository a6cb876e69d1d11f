#!/usr/bin/env bash
# Export branches as plain trees under .trees/<branch>/ (git archive; .trees/ is git-ignored), so a GPU run can
# test or benchmark them beside the checkout in one device call: carry ".trees" with the working tree, then
# `bash bench/run_trees.sh "COMMAND"` there. Usage: bash bench/export_trees.sh BRANCH [BRANCH ...]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for branch in "$@"; do
  dir=".trees/${branch//\//_}"
  rm -rf "$dir" && mkdir -p "$dir"
  git archive "$branch" | tar -x -C "$dir"
  echo "$dir: $branch at $(git rev-parse --short "$branch")" | tee "$dir/TREE"
done

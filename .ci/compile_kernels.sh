#!/usr/bin/env bash
# Compile every kernels/*.cu with nvcc for every GPU architecture moe_raw claims, warnings (ptxas' too) as errors.
# Usage, from the repository root: bash .ci/compile_kernels.sh      (NVCC=/path/to/nvcc, JOBS=N to override)
#
# Each .cu instantiates every kernel instance moe_raw launches under #ifdef MOE_RAW_NVCC_CHECK (NVRTC instantiates
# them through name_expressions at run time; tests/test_support_matrix.py checks the two lists agree), so this
# compiles all of them down to SASS for each architecture: front end, the __CUDA_ARCH__ branches (permute_scatter's
# sm_90 bulk-copy path) and ptxas. Device code only (-cubin), as NVRTC compiles it: the files have no host code to
# check, and skipping nvcc's host pass (cudafe++, gcc) saves 1.5-3 s a compile.
# One line per (file, arch); any failure fails the script after all have run.
# This is CI's ptxas check of the CUDA C kernels; NVRTC's front end is checked for one architecture of each branch
# set (tests/test_kernels_compile.py), the Numba SwiGLU kernels through NVVM + ptxas (tests/test_support_matrix.py).
#
# ARCHS must equal moe_raw/_launch.py CHECKED_ARCHS, whose minimum is MIN_COMPUTE_CAPABILITY, and the README's
# "Supported GPUs:" line (tests/test_support_matrix.py). Every entry is compute capability x 10.
#   80 A100 / A30    86 RTX 30xx / A10 / A40    89 L4 / L40S / RTX 40xx    90 H100 / H200 / GH200
#   100 B200 / GB200    120 RTX 50xx / RTX PRO 6000 Blackwell
# Not claimed: sm_75 (Turing: T4, RTX 20xx). permute_scatter has __launch_bounds__(128, 12): 12 resident blocks of
# 128 threads = 1536 threads per SM, and a 7.5 SM holds 1024, so ptxas (nvcc 13.0) says for each instance
#   ptxas error   : Value of threads per SM for entry _ZN7moe_raw15permute_scatterILi16EE... is out of range.
#                   .minnctapersm will be ignored
# (a warning without -Werror; NVRTC reports the same warning). Nothing is tested on 7.x hardware either, so
# moe_raw refuses it at first use (_launch.check_device). Older than 7.5: CUDA 13 dropped them (nvcc 13 starts at
# compute_75). Family / Jetson variants (87, 88, 103, 110, 121) compile too but are not claimed.
set -euo pipefail

ARCHS="80 86 89 90 100 120"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/bin/nvcc)}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

# Milliseconds since the epoch (bash 5's EPOCHREALTIME; no bc needed), and a duration in seconds to 0.1 s.
now_ms() {
    local t=${EPOCHREALTIME/[.,]/}
    echo $((t / 1000))
}
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }
t0=$(now_ms)

if ! "$NVCC" --version >/dev/null 2>&1; then
    echo "error: nvcc not found ($NVCC); set NVCC" >&2
    exit 1
fi
echo "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*')), archs: $ARCHS, $JOBS parallel jobs"

known=$("$NVCC" --list-gpu-arch 2>/dev/null || true)
for a in $ARCHS; do
    if [ -n "$known" ] && ! grep -qx "compute_$a" <<<"$known"; then
        echo "error: this nvcc does not know compute_$a (sm_100 / sm_120 need CUDA >= 12.8)" >&2
        exit 1
    fi
done

shopt -s nullglob
cu_files=(kernels/*.cu)
shopt -u nullglob
if [ ${#cu_files[@]} -eq 0 ]; then
    echo "error: no kernels/*.cu found" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One (file, arch) compile: its log in $work/<n>.log, "<rc> <milliseconds>" in $work/<n>.rc.
compile_one() {
    local n=$1 f=$2 a=$3 s rc=0
    s=$(now_ms)
    "$NVCC" -arch="sm_$a" -std=c++17 -Ikernels -Werror all-warnings -DMOE_RAW_NVCC_CHECK \
        -cubin -o /dev/null "$f" >"$work/$n.log" 2>&1 || rc=$?
    echo "$rc $(($(now_ms) - s))" >"$work/$n.rc"
}

jobs_f=() jobs_a=()
for f in "${cu_files[@]}"; do
    for a in $ARCHS; do
        jobs_f+=("$f")
        jobs_a+=("$a")
    done
done
running=0
for i in "${!jobs_f[@]}"; do
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    compile_one "$i" "${jobs_f[$i]}" "${jobs_a[$i]}" &
    running=$((running + 1))
done
wait

failed=()
for i in "${!jobs_f[@]}"; do
    f=${jobs_f[$i]} a=${jobs_a[$i]}
    read -r rc ms <"$work/$i.rc"
    if [ "$rc" -eq 0 ]; then
        printf 'ok    %-20s sm_%-4s %5ss\n' "$f" "$a" "$(secs "$ms")"
    else
        printf 'FAIL  %-20s sm_%-4s %5ss\n' "$f" "$a" "$(secs "$ms")"
        sed 's/^/      /' "$work/$i.log"
        failed+=("$f:sm_$a")
    fi
done
printf 'total %ss for %d compiles (%d files x %d archs, %d at a time)\n' "$(secs $(($(now_ms) - t0)))" \
    "${#jobs_f[@]}" "${#cu_files[@]}" "$(wc -w <<<"$ARCHS")" "$JOBS"
if [ ${#failed[@]} -ne 0 ]; then
    echo "error: nvcc failed on: ${failed[*]}" >&2
    exit 1
fi

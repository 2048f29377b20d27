#!/bin/sh
# a2a_bench.sh — the all-to-all benchmark on every GPU of this machine
# (bench/gpu/a2a_bench.c): our nccl comm's LINEAR all-to-all against NCCL's
# own (ncclSend/ncclRecv, nccl-tests' alltoall_perf semantics) from 1 MB to
# 1 GB, one rank per GPU; then, with 4 GPUs or more (an even number), the
# same ranks as 2 simulated nodes (MOEC_LOCAL_SIZE = half the GPUs) so that
# our 2DH all-to-all is measured too. Markdown tables for bench/RESULTS.md,
# and the JSON of each run in the output folder.
#
# usage: bench/gpu/a2a_bench.sh [A2A_BENCH [MPIRUN]] [-- a2a_bench options]
#   A2A_BENCH  the binary (default: build/bench/a2a_bench)
#   MPIRUN     mpirun (default: mpirun on PATH)
#   options after -- go to every run (e.g. -- --max 256M --repeats 3)
# Environment: GPUS (default: nvidia-smi's count), OUT (default: a new /tmp dir).
# NCCL_NVLS_ENABLE=0 (NVLink multicast off, as the GPU machines require) is set
# here and by the bench itself.
# Exit: 0 done, 1 a failure, 2 a usage error.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=$root/build/bench/a2a_bench
mpirun=mpirun
[ $# -gt 0 ] && [ "$1" != -- ] && { bin=$1; shift; }
[ $# -gt 0 ] && [ "$1" != -- ] && { mpirun=$1; shift; }
[ $# -gt 0 ] && [ "$1" = -- ] && shift
die() { echo "a2a_bench.sh: $*" >&2; exit 1; }
[ -x "$bin" ] || die "no a2a_bench at $bin (build it: cmake --build build --target a2a_bench)"
command -v "$mpirun" >/dev/null 2>&1 || die "no $mpirun found"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
gpus=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
[ "$gpus" -ge 1 ] 2>/dev/null || die "no NVIDIA GPU found here (nvidia-smi -L lists none); set GPUS=N to force"
out=${OUT:-$(mktemp -d /tmp/moec-a2a-bench.XXXXXX)}
mkdir -p "$out" || die "cannot make $out"
echo "a2a_bench.sh: $gpus GPUs; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1); files in $out"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo
# one node of every GPU: the linear all-to-all against NCCL's
"$mpirun" -np "$gpus" --bind-to none -x NCCL_NVLS_ENABLE "$bin" --backend cuda --comm nccl --algo linear \
  --json "$out/a2a_np$gpus.json" "$@" || die "the run on $gpus GPUs failed"
# two simulated nodes: 2DH too
if [ "$gpus" -ge 4 ] && [ $((gpus % 2)) = 0 ]; then
  echo
  "$mpirun" -np "$gpus" --bind-to none -x NCCL_NVLS_ENABLE -x MOEC_LOCAL_SIZE=$((gpus / 2)) "$bin" \
    --backend cuda --comm nccl --algo both --json "$out/a2a_np${gpus}_2nodes.json" "$@" ||
    die "the run on $gpus GPUs as 2 nodes failed"
fi

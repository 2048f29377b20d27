#!/bin/sh
# multigpu_test.sh MODE MOEC SRCDIR WORKDIR MPIEXEC — the distributed tests of
# tests/dist on several GPUs of one host, one rank per GPU, the nccl comm
# (labels gpu, multigpu, nccl). Modes:
#   variants_npN         fp32 tests/dist/dist.moe: --variant cycle follows the
#                        first variant fixed (1e-5, as dist.cycle_np* on the
#                        cpu) and the cpu backend with the mpi comm (2e-3);
#                        every switch costs 0 bytes and 0 allocations
#   variants_npN_2nodes  the same as two nodes (MOEC_LOCAL_SIZE=N/2): 2dh too
#   bf16_npN             dist.moe in bf16: cycle against fixed, the cpu's bf16
#                        emulation and fp32, within gpu.bf16's tolerances
#   invariance_npN       -np 1 with 128 tokens and -np N with 128/N: the same
#                        losses to 1e-4 (dist.invariance's tolerance)
#   cpu_npN              every mode above at N ranks, forced into the CPU
#                        dry mode (a CI test of this script's logic)
# Exits 77 (skipped, with a message) where fewer GPUs than ranks are found
# (nvidia-smi -L, capped by CUDA_VISIBLE_DEVICES), where the cuda backend
# finds no GPU, where NCCL cannot be loaded, or where the runtime finds ranks
# sharing a GPU. MOEC_MULTIGPU_TEST_CPU=1: the same runs and comparisons with
# --backend cpu --comm mpi (the bf16 runs through MOEC_CPU_BF16=1), no GPU
# needed. MOEC_MULTIGPU_TEST_GPUS=N: take N as the GPU count (to test the
# skip). Every mpirun is under `timeout` (MOEC_MULTIGPU_TIMEOUT seconds, 180),
# so a hang fails instead of eating a GPU lease; NCCL_NVLS_ENABLE=0 reaches
# every rank.
set -u
mode=$1 moec=$2 src=$3 work=$4 mpiexec=$5
case $moec in /*) ;; */*) moec=$PWD/$moec ;; esac
case $src in /*) ;; *) src=$PWD/$src ;; esac
case $work in /*) ;; *) work=$PWD/$work ;; esac
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $mode: $*"; exit 1; }
skip() { echo "SKIP: $mode: $*"; exit 77; }
field() { sed -n "s/.*\"$1\": \([^,}]*\).*/\1/p" "$2"; }
first_variant() { sed -n 's/.*"variants": {"\([^"]*\)": "\([^"]*\)".*/\2/p' "$1" | head -n 1; }
export OPENBLAS_NUM_THREADS=1 NCCL_NVLS_ENABLE=0
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
limit=${MOEC_MULTIGPU_TIMEOUT:-180}
cpu_mode=${MOEC_MULTIGPU_TEST_CPU:-0}
kc=$(dirname "$work")/kernel-cache # shared by the tests: NVRTC compiles each spec once

# --- runs --------------------------------------------------------------------------------
# mrun N LOG ARGS...: ARGS under mpirun -np N, output to LOG, every variable
# the ranks need passed with -x; 0 or fails naming the run and its last lines
mrun() {
  rn=$1 rlog=$2
  shift 2
  set -- -x NCCL_NVLS_ENABLE -x OPENBLAS_NUM_THREADS "$@"
  [ -n "${MOEC_LOCAL_SIZE:-}" ] && set -- -x MOEC_LOCAL_SIZE "$@"
  [ -n "${MOEC_CPU_BF16:-}" ] && set -- -x MOEC_CPU_BF16 "$@"
  timeout -k 10 "$limit" "$mpiexec" --oversubscribe -np "$rn" "$@" > "$rlog" 2>&1
  rc=$?
  [ $rc = 0 ] && return 0
  { [ $rc = 124 ] || [ $rc = 137 ]; } && fail "$rlog: no end after $limit s (a hang?): $(tail -n 3 "$rlog")"
  if [ "$cpu_mode" != 1 ]; then
    grep -q "no usable NVIDIA GPU" "$rlog" && skip "no GPU here: $(grep -m 1 'no usable NVIDIA GPU' "$rlog")"
    grep -q "NCCL could not be loaded" "$rlog" && skip "no NCCL here: $(grep -m 1 'NCCL could not be loaded' "$rlog")"
    grep -q "share one GPU" "$rlog" &&
      skip "the runtime found ranks sharing a GPU at -np $rn (fewer GPUs than ranks): $(grep -m 1 'share one GPU' "$rlog")"
  fi
  fail "$rlog (exit $rc): $(tail -n 5 "$rlog")"
}
# the runs under test (cuda + nccl) and the references (cpu + mpi)
if [ "$cpu_mode" = 1 ]; then
  dev() { mrun "$@" --backend cpu --comm mpi; }
  devb() { MOEC_CPU_BF16=1 mrun "$@" --backend cpu --comm mpi; }
else
  dev() { mrun "$@" --backend cuda --comm nccl --kernel-cache "$kc"; }
  devb() { dev "$@"; }
fi
ref() { mrun "$@" --backend cpu --comm mpi; }

# --- GPUs ----------------------------------------------------------------------------------
# need N: skip unless N GPUs are found (nvidia-smi -L, capped by CUDA_VISIBLE_DEVICES)
need() {
  [ "$cpu_mode" = 1 ] && return 0
  how="nvidia-smi -L"
  if [ -n "${MOEC_MULTIGPU_TEST_GPUS:-}" ]; then
    found=$MOEC_MULTIGPU_TEST_GPUS how="MOEC_MULTIGPU_TEST_GPUS"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    found=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU [0-9]')
  else
    found=  # no nvidia-smi: the cuda backend's probe below decides
  fi
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && [ -z "${MOEC_MULTIGPU_TEST_GPUS:-}" ]; then
    v=$(printf '%s\n' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c '[^ ]')
    if [ -z "$found" ] || [ "$v" -lt "$found" ]; then found=$v how="$how, CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; fi
  fi
  if [ -n "$found" ] && [ "$found" -lt "$1" ]; then
    skip "$found GPU(s) found ($how); this test needs $1, one per rank"
  fi
  # a GPU the cuda backend can use (one rank, no mpirun)
  timeout -k 10 "$limit" ./dist --backend cuda --steps 1 --quiet --kernel-cache "$kc" > probe.txt 2>&1 || {
    grep -q "no usable NVIDIA GPU" probe.txt &&
      skip "0 usable GPUs found (${found:+$how lists $found, but }the cuda backend says: $(sed -n 's/.*error: //p' probe.txt | head -n 1)$([ -n "$found" ] || echo '; no nvidia-smi here')); this test needs $1, one per rank"
    fail "the cuda backend does not start: $(tail -n 5 probe.txt)"
  }
}

# --- comparisons (as gpu_train_test.sh's close and close_mean) -------------------------------
# the losses of two runs agree: the first `n` steps (all when not given) to a
# relative tolerance, later steps to `late`
close() {
  field loss "$1" > a.txt; field loss "$2" > b.txt
  [ -s a.txt ] && [ "$(wc -l < a.txt)" = "$(wc -l < b.txt)" ] || fail "different steps in $1 and $2"
  printf '%s vs %s: ' "$1" "$2"
  paste a.txt b.txt | awk -v tol="$3" -v n="${4:-1000000}" -v late="${5:-0}" '
    { d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2);
      if (NR <= n) { if (r > w) { w = r; ws = NR } } else if (r > wl) { wl = r; wls = NR } }
    END { printf "worst relative difference %.2e at step %d (tolerance %s, first %d steps)", w, ws, tol, n < NR ? n : NR;
          if (wl > 0) printf "; later %.2e at step %d (tolerance %s)", wl, wls, late; printf "\n";
          exit !(w <= tol && wl <= late) }' ||
    { paste a.txt b.txt | awk '{ printf "step %d: %s %s\n", NR, $1, $2 }'; fail "the losses of $1 and $2 differ"; }
}
# the mean loss of the last `n` steps of two runs agrees to a relative tolerance
close_mean() {
  field loss "$1" | tail -n "$4" > a.txt; field loss "$2" | tail -n "$4" > b.txt
  printf '%s vs %s: ' "$1" "$2"
  paste a.txt b.txt | awk -v tol="$3" '{ a += $1; b += $2 } END { r = (a - b) / b; if (r < 0) r = -r;
    printf "mean of the last %d losses: %.5f and %.5f, relative difference %.2e (tolerance %s)\n", NR, a / NR, b / NR, r, tol;
    exit !(r <= tol) }' || fail "the late losses of $1 and $2 differ"
}
free_switches() {
  bad=$(grep -c -v '"switch_bytes": 0, "switch_allocs": 0' "$1")
  [ "$bad" = 0 ] || fail "$bad steps of $1 switched at a cost: $(grep -v '"switch_bytes": 0, "switch_allocs": 0' "$1" | head -n 1)"
}
# every candidate of the header's first MoE layer ran in the cycle, on the comm asked for
cycled_all() { # LOG METRICS
  if [ "$cpu_mode" = 1 ]; then want="comm mpi"; else want="comm nccl"; fi
  grep -q "$want" "$1" || fail "$1 does not run on the $want: $(grep -m 1 '^backend' "$1")"
  cands=$(sed -n 's/.*candidates: \([^;]*\).*/\1/p' "$1" | head -n 1)
  [ -n "$cands" ] || fail "no candidates in the header of $1"
  for v in $cands; do grep -q "\"$v\"" "$2" || fail "the cycle never ran $v (candidates: $cands)"; done
  echo "$(echo "$cands" | wc -w) candidates, every one run: $cands"
}

# --- the specs -------------------------------------------------------------------------------
"$moec" build "$src/tests/dist/dist.moe" -o dist > /dev/null 2>&1 || fail "moec build dist.moe"
# bf16 all-to-alls and gathers move pairs of bf16 as floats: dim and each
# expert slice (hidden / S at 8 ranks) must be even
sed 's/dtype = fp32/dtype = bf16/' "$src/tests/dist/dist.moe" > distb.moe
grep -q 'dtype = bf16' distb.moe || fail "dist.moe has no 'dtype = fp32' to turn into bf16"
m=$(sed -n 's/.*dim = \([0-9]*\).*/\1/p' distb.moe | head -n 1)
h=$(sed -n 's/.*hidden = \([0-9]*\).*/\1/p' distb.moe | head -n 1)
e=$(sed -n 's/.*experts = \([0-9]*\).*/\1/p' distb.moe | head -n 1)
s8=$((8 > e ? 8 / e : 1))
[ $((m % 2)) = 0 ] && [ $((h % s8)) = 0 ] && [ $((h / s8 % 2)) = 0 ] ||
  fail "dist.moe: dim $m, hidden $h, $e experts: bf16 needs dim and hidden / S (S = $s8 at 8 ranks) even"
"$moec" build distb.moe -o distb > /dev/null 2>&1 || fail "moec build distb.moe (bf16)"

# --- the modes --------------------------------------------------------------------------------
variants() { # N [2nodes]
  n=$1
  if [ "${2:-}" = 2nodes ]; then export MOEC_LOCAL_SIZE=$((n / 2)); else unset MOEC_LOCAL_SIZE; fi
  need "$n"
  dev "$n" cycle.log ./dist --variant cycle --metrics cycle.jsonl
  cycled_all cycle.log cycle.jsonl
  [ "${2:-}" = 2nodes ] && { grep -q 'a2a=2dh' cycle.jsonl || fail "two nodes, and no 2dh variant ran"; }
  first=$(first_variant cycle.jsonl)
  dev "$n" fixed.log ./dist --variant "$first" --metrics fixed.jsonl
  close cycle.jsonl fixed.jsonl 1e-5
  ref "$n" cpu.log ./dist --variant "$first" --metrics cpu.jsonl
  close cpu.jsonl fixed.jsonl 2e-3
  free_switches cycle.jsonl
  echo "ok: -np $n${MOEC_LOCAL_SIZE:+ as $((n / MOEC_LOCAL_SIZE)) nodes of $MOEC_LOCAL_SIZE}: every variant, cycled, follows $first fixed and the cpu; switches cost nothing"
}
bf16() { # N
  n=$1
  unset MOEC_LOCAL_SIZE
  need "$n"
  devb "$n" cycle.log ./distb --variant cycle --metrics cycle.jsonl
  grep -q "bf16 experts" cycle.log || fail "the header does not say bf16 experts: $(grep -m 1 '^backend' cycle.log)"
  cycled_all cycle.log cycle.jsonl
  first=$(first_variant cycle.jsonl)
  devb "$n" fixed.log ./distb --variant "$first" --metrics fixed.jsonl
  close cycle.jsonl fixed.jsonl 1e-2 10 1
  close_mean cycle.jsonl fixed.jsonl 5e-2 5
  MOEC_CPU_BF16=1 ref "$n" emu.log ./distb --variant "$first" --metrics emu.jsonl
  close emu.jsonl fixed.jsonl 2e-3 10 1
  close_mean emu.jsonl fixed.jsonl 5e-2 10
  ref "$n" f32.log ./dist --variant "$first" --metrics f32.jsonl
  close f32.jsonl fixed.jsonl 2e-2 10 1
  close_mean f32.jsonl fixed.jsonl 1e-1 10
  free_switches cycle.jsonl
  echo "ok: -np $n bf16: every variant follows $first fixed, the cpu's bf16 emulation and fp32 within bf16 tolerances"
}
invariance() { # N
  n=$1 g=128
  unset MOEC_LOCAL_SIZE
  [ $((g % n)) = 0 ] || fail "$g tokens do not split over $n ranks"
  need "$n"
  dev 1 w1.log ./dist --tokens $g --metrics w1.jsonl
  dev "$n" wn.log ./dist --tokens $((g / n)) --metrics wn.jsonl
  close w1.jsonl wn.jsonl 1e-4
  echo "ok: -np 1 with $g tokens and -np $n with $((g / n)) tokens a rank give the same losses"
}

case $mode in
variants_np*_2nodes) n=${mode#variants_np}; variants "${n%_2nodes}" 2nodes ;;
variants_np*) variants "${mode#variants_np}" ;;
bf16_np*) bf16 "${mode#bf16_np}" ;;
invariance_np*) invariance "${mode#invariance_np}" ;;
cpu_np*)
  # every mode at N ranks in the CPU dry mode, each in a directory of its own
  n=${mode#cpu_np}
  for m in variants_np$n variants_np${n}_2nodes bf16_np$n invariance_np$n; do
    MOEC_MULTIGPU_TEST_CPU=1 sh "$self" "$m" "$moec" "$src" "$work/$m" "$mpiexec" || fail "$m (cpu dry mode)"
  done
  echo "ok: the CPU dry mode of every mode at -np $n" ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac

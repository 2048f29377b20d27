#!/bin/sh
# gpu_train_test.sh MODE MOEC SRCDIR WORKDIR MPIEXEC — built models on the
# cuda backend, compared with the cpu backend, and the nccl comm with the
# others (label gpu). Exits 77 (skipped) where no GPU (or, for nccl_*, no
# NCCL) is found.
set -u
mode=$1 moec=$2 src=$3 work=$4 mpiexec=$5
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $mode: $*"; exit 1; }
field() { sed -n "s/.*\"$1\": \([^,}]*\).*/\1/p" "$2"; }
export OPENBLAS_NUM_THREADS=1
"$moec" build "$src/examples/tiny.moe" -o tiny >/dev/null || fail "moec build tiny"
"$moec" build "$src/tests/dist/dist.moe" -o dist >/dev/null || fail "moec build dist"
./tiny --backend cuda --steps 1 --quiet --kernel-cache kc > probe.txt 2>&1 || {
  if grep -q "no usable NVIDIA GPU" probe.txt; then echo "SKIP: no GPU here: $(cat probe.txt)"; exit 77; fi
  fail "the cuda backend does not start: $(cat probe.txt)"
}
# losses of two runs agree: the first `n` steps (all when not given) to a
# relative tolerance `tol`, later steps to `late` (routing is discrete: once a
# near-tied top-k choice flips, two correct runs drift apart)
close() {
  field loss "$1" > a.txt; field loss "$2" > b.txt
  [ -s a.txt ] && [ "$(wc -l < a.txt)" = "$(wc -l < b.txt)" ] || fail "different steps in $1 and $2"
  paste a.txt b.txt | awk -v tol="$3" -v n="${4:-1000000}" -v late="${5:-0}" '
    { d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2);
      if (NR <= n) { if (r > w) { w = r; ws = NR } } else if (r > wl) { wl = r; wls = NR } }
    END { printf "worst relative difference %.2e at step %d (tolerance %s, first %d steps)", w, ws, tol, n;
          if (wl > 0) printf "; later %.2e at step %d (tolerance %s)", wl, wls, late; printf "\n";
          exit !(w <= tol && wl <= late) }' ||
    { paste a.txt b.txt | awk '{ printf "step %d: %s %s\n", NR, $1, $2 }'; fail "losses differ"; }
}
case $mode in
train_vs_cpu)
  ./tiny --backend cpu --steps 50 --metrics cpu.jsonl --quiet || fail "cpu run"
  ./tiny --backend cuda --steps 50 --metrics cuda.jsonl --kernel-cache kc --quiet || fail "cuda run"
  close cpu.jsonl cuda.jsonl 1e-5 20 5e-2
  echo "ok: 50 steps on cuda follow the cpu's losses" ;;
cache)
  rm -rf kc2
  ./tiny --backend cuda --steps 2 --kernel-cache kc2 > first.txt || fail "first run"
  grep -q "kernels: compiled by NVRTC" first.txt || fail "the first start did not compile: $(grep kernels first.txt)"
  ./tiny --backend cuda --steps 2 --kernel-cache kc2 > second.txt || fail "second run"
  grep -q "kernels: from the cache" second.txt || fail "the second start compiled again: $(grep kernels second.txt)"
  ./tiny --backend cuda --steps 2 --no-kernel-cache > third.txt || fail "--no-kernel-cache"
  grep -q "kernels: compiled by NVRTC" third.txt || fail "--no-kernel-cache used a cache"
  for f in kc2/*.bin; do printf 'garbage' > "$f"; done
  ./tiny --backend cuda --steps 2 --kernel-cache kc2 > fourth.txt 2> warn.txt || fail "a corrupt cache broke the run: $(cat warn.txt)"
  grep -qi "warning" warn.txt || fail "no warning for a corrupt cache entry"
  echo "ok: the second start compiles nothing; a corrupt cache warns and recompiles" ;;
variants_np*)
  n=${mode#variants_np}
  run() { "$mpiexec" --oversubscribe -np "$n" "$@"; }
  run ./dist --backend cuda --kernel-cache kc --variant cycle --metrics cycle.jsonl --quiet || fail "cycle"
  first=$(sed -n 's/.*"variants": {"\([^"]*\)": "\([^"]*\)".*/\2/p' cycle.jsonl | head -1)
  run ./dist --backend cuda --kernel-cache kc --variant "$first" --metrics fixed.jsonl --quiet || fail "fixed"
  close cycle.jsonl fixed.jsonl 1e-4
  run ./dist --backend cpu --variant "$first" --metrics cpu.jsonl --quiet || fail "cpu"
  close cpu.jsonl fixed.jsonl 2e-3
  bad=$(grep -c -v '"switch_bytes": 0, "switch_allocs": 0' cycle.jsonl)
  [ "$bad" = 0 ] || fail "$bad steps switched at a cost"
  echo "ok: -np $n ranks sharing the GPU: every variant, cycled, follows the fixed one and the cpu; switches cost nothing" ;;
nccl_np1)
  # one rank, no mpirun: the nccl comm over the self host comm (a world of one)
  ./tiny --backend cuda --steps 30 --kernel-cache kc > default.txt || fail "default run"
  grep -q "comm self" default.txt || fail "one rank does not default to self: $(grep '^backend' default.txt)"
  ./tiny --backend cuda --comm self --steps 30 --metrics self.jsonl --kernel-cache kc --quiet || fail "--comm self"
  ./tiny --backend cuda --comm nccl --steps 30 --metrics nccl.jsonl --kernel-cache kc > nccl.txt 2> err.txt || {
    if grep -q "NCCL could not be loaded" err.txt; then echo "SKIP: no NCCL here: $(cat err.txt)"; exit 77; fi
    fail "--comm nccl: $(cat err.txt)"
  }
  grep -q "comm nccl" nccl.txt || fail "the header does not name the nccl comm: $(grep '^backend' nccl.txt)"
  close self.jsonl nccl.jsonl 1e-6 20 5e-2
  echo "ok: --comm nccl at one rank follows --comm self" ;;
nccl_np2)
  # two ranks: with a GPU each, nccl is the default and follows mpi; on one
  # GPU, --comm nccl is refused on every rank with the way out, and the
  # default is the staged mpi comm
  run() { timeout 120 "$mpiexec" --oversubscribe -np 2 "$@"; }
  run ./dist --backend cuda --comm nccl --kernel-cache kc --variant cycle --metrics nccl.jsonl > nccl.txt 2>&1; rc=$?
  if [ $rc != 0 ]; then
    grep -q "NCCL could not be loaded" nccl.txt && { echo "SKIP: no NCCL here"; exit 77; }
    [ $rc != 124 ] || fail "--comm nccl on a shared GPU hung"
    grep -q "share one GPU" nccl.txt && grep -q -- "--comm mpi" nccl.txt ||
      fail "--comm nccl failed without the shared-GPU message: $(cat nccl.txt)"
    run ./dist --backend cuda --kernel-cache kc --steps 3 > default.txt 2>&1 || fail "default run: $(cat default.txt)"
    grep -q "comm mpi (staged" default.txt || fail "two ranks on one GPU do not default to mpi: $(grep '^backend' default.txt)"
    echo "ok: one GPU: --comm nccl is refused on both ranks with a clear message; the default is staged mpi"
    exit 0
  fi
  grep -q "comm nccl" nccl.txt || fail "the header does not name the nccl comm"
  run ./dist --backend cuda --comm mpi --kernel-cache kc --variant cycle --metrics mpi.jsonl --quiet || fail "--comm mpi"
  close mpi.jsonl nccl.jsonl 1e-4 20 5e-2
  bad=$(grep -c -v '"switch_bytes": 0, "switch_allocs": 0' nccl.jsonl)
  [ "$bad" = 0 ] || fail "$bad steps switched at a cost"
  run ./dist --backend cuda --kernel-cache kc --steps 3 > default.txt 2>&1 || fail "default run"
  grep -q "comm nccl" default.txt || fail "a GPU per rank does not default to nccl: $(grep '^backend' default.txt)"
  echo "ok: -np 2 on two GPUs: nccl is the default; every variant, cycled, follows mpi's losses" ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac

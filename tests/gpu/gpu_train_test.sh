#!/bin/sh
# gpu_train_test.sh MODE MOEC SRCDIR WORKDIR MPIEXEC — built models on the
# cuda backend, compared with the cpu backend, and the nccl comm with the
# others (label gpu). Exits 77 (skipped) where no GPU (or, for nccl_* and
# trace, no NCCL) is found. The modes that start two ranks on the nccl comm
# (nccl_np2, trace, graphs) take the GPU count from MOEC_EMU_GPUS (the CPU
# emulation's, tests/emu) or nvidia-smi -L capped by CUDA_VISIBLE_DEVICES:
# with 2 GPUs or more NCCL must work; on one, nccl_np2 and trace require it
# refused with the shared-GPU message.
set -u
mode=$1 moec=$2 src=$3 work=$4 mpiexec=$5
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $mode: $*"; exit 1; }
field() { sed -n "s/.*\"$1\": \([^,}]*\).*/\1/p" "$2"; }
# the GPUs the cuda backend sees (above); empty when nothing tells
gpu_count() {
  if [ -n "${MOEC_EMU_GPUS:-}" ]; then echo "$MOEC_EMU_GPUS"; return; fi
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU [0-9]')
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    v=$(printf '%s\n' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c '[^ ]')
    [ "$v" -lt "$n" ] && n=$v
  fi
  echo "$n"
}
# why a run failed: its first error lines (before mpirun's abort notice)
why() { grep -m 2 'error:' "$1" || tail -n 5 "$1"; }
# the count for a mode that needs to know it
need_gpu_count() {
  gpus=$(gpu_count)
  [ -n "$gpus" ] || fail "cannot tell how many GPUs there are (no nvidia-smi, MOEC_EMU_GPUS unset): whether NCCL must work at -np 2 depends on it"
}
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
# the mean loss of the last `n` steps of two runs agrees to a relative `tol`
# (bf16 against another rounding: step-by-step losses drift apart late in
# training, their level does not)
close_mean() {
  field loss "$1" | tail -n "$4" > a.txt; field loss "$2" | tail -n "$4" > b.txt
  paste a.txt b.txt | awk -v tol="$3" '{ a += $1; b += $2 } END { r = (a - b) / b; if (r < 0) r = -r;
    printf "mean of the last %d losses: %.5f and %.5f, relative difference %.2e (tolerance %s)\n", NR, a / NR, b / NR, r, tol;
    exit !(r <= tol) }' || fail "the late losses of $1 and $2 differ"
}
case $mode in
train_vs_cpu)
  ./tiny --backend cpu --steps 50 --metrics cpu.jsonl --quiet || fail "cpu run"
  ./tiny --backend cuda --steps 50 --metrics cuda.jsonl --kernel-cache kc --quiet || fail "cuda run"
  close cpu.jsonl cuda.jsonl 1e-5 20 5e-2
  echo "ok: 50 steps on cuda follow the cpu's losses" ;;
bf16)
  # the bf16 expert path on the GPU against the cpu's emulation of it
  # (MOEC_CPU_BF16=1), the fp32 run, and at -np 2 every variant against one
  sed 's/dtype = fp32/dtype = bf16/' "$src/examples/tiny.moe" > tinyb.moe
  "$moec" build tinyb.moe -o tinyb >/dev/null 2>&1 || fail "moec build (bf16)"
  ./tinyb --backend cuda --steps 1 --kernel-cache kc | grep -q "bf16 experts" || fail "the header does not say bf16"
  ./tinyb --backend cuda --steps 50 --metrics gpu.jsonl --kernel-cache kc --quiet || fail "cuda run"
  MOEC_CPU_BF16=1 ./tinyb --backend cpu --steps 50 --metrics emu.jsonl --quiet || fail "cpu emulation run"
  ./tiny --backend cpu --steps 50 --metrics f32.jsonl --quiet || fail "cpu fp32 run"
  close emu.jsonl gpu.jsonl 2e-3 10 1
  close_mean emu.jsonl gpu.jsonl 5e-2 10
  close f32.jsonl gpu.jsonl 2e-2 10 1
  close_mean f32.jsonl gpu.jsonl 1e-1 10
  # dense FFNs (gelu, relu) and swiglu experts of a bf16 model
  "$moec" build "$src/tests/model/bf16_dense.moe" -o dense >/dev/null 2>&1 || fail "moec build bf16_dense"
  ./dense --backend cuda --kernel-cache kc --metrics dgpu.jsonl --quiet || fail "cuda run (dense)"
  MOEC_CPU_BF16=1 ./dense --backend cpu --metrics demu.jsonl --quiet || fail "cpu emulation run (dense)"
  close demu.jsonl dgpu.jsonl 5e-3 10 1
  close_mean demu.jsonl dgpu.jsonl 5e-2 10
  # a byte model: the head's bf16 GEMMs
  corpus="$src/examples/data/corpus.txt"
  if [ -s "$corpus" ]; then
    "$moec" build "$src/tests/model/bf16_bytes.moe" -o bytes >/dev/null 2>&1 || fail "moec build bf16_bytes"
    ./bytes --backend cuda --kernel-cache kc --data "$corpus" --metrics bgpu.jsonl --quiet || fail "cuda run (bytes)"
    MOEC_CPU_BF16=1 ./bytes --backend cpu --data "$corpus" --metrics bemu.jsonl --quiet || fail "cpu emulation run (bytes)"
    close bemu.jsonl bgpu.jsonl 5e-3 10 1
    close_mean bemu.jsonl bgpu.jsonl 5e-2 10
  else
    echo "(no corpus at $corpus: the bf16 head is not checked; sh tools/make-corpus.sh)"
  fi
  "$mpiexec" --oversubscribe -np 2 ./tinyb --backend cuda --kernel-cache kc --variant cycle --steps 20 --metrics cycle.jsonl --quiet || fail "cycle"
  first=$(sed -n 's/.*"variants": {"\([^"]*\)": "\([^"]*\)".*/\2/p' cycle.jsonl | head -1)
  "$mpiexec" --oversubscribe -np 2 ./tinyb --backend cuda --kernel-cache kc --variant "$first" --steps 20 --metrics fixed.jsonl --quiet || fail "fixed"
  close cycle.jsonl fixed.jsonl 1e-2 10 1
  close_mean cycle.jsonl fixed.jsonl 5e-2 5
  bad=$(grep -c -v '"switch_bytes": 0, "switch_allocs": 0' cycle.jsonl)
  [ "$bad" = 0 ] || fail "$bad steps switched at a cost"
  echo "ok: bf16 experts on the GPU follow the cpu's emulation and fp32; every variant at -np 2 follows one" ;;
attention)
  # attention on the cuda backend (tests/gpu/attn.moe: GQA with RoPE at
  # head_dim 64, biases and head_dim 24, an MoE layer between): fp32 against
  # the cpu, bf16 against the cpu's emulation of it, CUDA graphs to the bit
  # against the ops one by one, and --generate through the key/value cache
  corpus="$src/examples/data/corpus.txt"
  if [ ! -s "$corpus" ]; then # a text of our own where the set-up made none (a bare GPU machine)
    corpus=$PWD/text.txt
    awk 'BEGIN { srand(7); split("and the of to in he that it unto for his was with shall is be them lord god", w);
                 for (l = 0; l < 4000; l++) { s = ""; n = 6 + int(rand() * 10);
                   for (i = 0; i < n; i++) s = s (i ? " " : "") w[1 + int(rand() * 20)]; print s "." } }' > "$corpus"
  fi
  steps=${MOEC_ATTN_STEPS:-30}
  "$moec" build "$src/tests/gpu/attn.moe" -o attn >/dev/null || fail "moec build attn"
  ./attn --backend cpu --data "$corpus" --steps "$steps" --metrics cpu.jsonl --quiet || fail "cpu run"
  ./attn --backend cuda --data "$corpus" --steps "$steps" --metrics cuda.jsonl --kernel-cache kc --quiet ||
    fail "cuda run"
  close cpu.jsonl cuda.jsonl 1e-4 10 5e-2
  sed 's/dtype = fp32/dtype = bf16/' "$src/tests/gpu/attn.moe" > attnb.moe
  "$moec" build attnb.moe -o attnb >/dev/null || fail "moec build (bf16)"
  MOEC_CPU_BF16=1 ./attnb --backend cpu --data "$corpus" --steps "$steps" --metrics bemu.jsonl --quiet ||
    fail "cpu emulation run (bf16)"
  ./attnb --backend cuda --data "$corpus" --steps "$steps" --metrics bgpu.jsonl --kernel-cache kc --quiet ||
    fail "cuda run (bf16)"
  close bemu.jsonl bgpu.jsonl 5e-3 10 1
  close_mean bemu.jsonl bgpu.jsonl 5e-2 10
  for m in attn attnb; do
    MOEC_CUDA_GRAPHS=0 ./$m --backend cuda --data "$corpus" --steps 6 --log-every 1 --metrics $m.plain.jsonl \
      --kernel-cache kc > $m.plain.txt 2>&1 || fail "$m without graphs: $(cat $m.plain.txt)"
    ./$m --backend cuda --data "$corpus" --steps 6 --log-every 1 --metrics $m.graphs.jsonl --kernel-cache kc \
      > $m.graphs.txt 2>&1 || fail "$m with graphs: $(cat $m.graphs.txt)"
    grep -q "CUDA graphs: [1-9][0-9]* captured, [1-9][0-9]* launched, 0 parts ran without one" $m.graphs.txt ||
      fail "$m: graphs not made, not launched or refused: $(grep 'CUDA graphs' $m.graphs.txt)"
    field loss $m.plain.jsonl > a.txt; field loss $m.graphs.jsonl > b.txt
    [ -s a.txt ] && cmp -s a.txt b.txt || { paste a.txt b.txt; fail "$m: the losses differ with graphs"; }
  done
  ./attn --backend cuda --data "$corpus" --steps "$steps" --kernel-cache kc --generate 200 --prompt "And God" \
    > gen.txt 2>&1 || fail "--generate: $(cat gen.txt)"
  n=$(sed -n '/^\[And God\]/,$p' gen.txt | wc -c) # the prompt in brackets, 200 bytes, a newline
  [ "$n" -eq 210 ] || fail "--generate wrote $((n - 10)) bytes after the prompt, not 200: $(cat gen.txt)"
  echo "ok: attention on cuda follows the cpu (fp32) and its bf16 emulation; graphs change nothing; it generates" ;;
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
routers)
  # today's routers (tests/gpu/routers.moe: sigmoid gate, bias balancing,
  # groups, shared experts, z-loss, expert choice) on the cuda backend against
  # the cpu; with CUDA graphs to the bit against the ops one by one (the
  # graphs read the bias the balancing moves between steps); at -np 2 (mpi
  # comm, the GPU shared) every variant, cycled, against a fixed one
  "$moec" build "$src/tests/gpu/routers.moe" -o routers >/dev/null 2>&1 || fail "moec build routers"
  ./routers --backend cpu --metrics cpu.jsonl --quiet || fail "cpu run"
  ./routers --backend cuda --kernel-cache kc --metrics cuda.jsonl --quiet || fail "cuda run"
  close cpu.jsonl cuda.jsonl 1e-4 8 5e-2
  MOEC_CUDA_GRAPHS=0 ./routers --backend cuda --kernel-cache kc --steps 6 --metrics plain.jsonl --quiet ||
    fail "cuda run without graphs"
  ./routers --backend cuda --kernel-cache kc --steps 6 --metrics graphs.jsonl --quiet || fail "cuda run with graphs"
  for f in loss aux_loss z_loss grad_norm; do
    field "$f" plain.jsonl > a.txt; field "$f" graphs.jsonl > b.txt
    [ -s a.txt ] && cmp -s a.txt b.txt || { paste a.txt b.txt; fail "$f differs with graphs"; }
  done
  timeout 300 "$mpiexec" --oversubscribe -np 2 ./routers --backend cuda --comm mpi --kernel-cache kc --steps 6 \
    --tokens 64 --variant cycle --metrics cycle.jsonl --quiet > np2.txt 2>&1 || fail "-np 2 cycle: $(why np2.txt)"
  timeout 300 "$mpiexec" --oversubscribe -np 2 ./routers --backend cuda --comm mpi --kernel-cache kc --steps 6 \
    --tokens 64 --variant "r=1,d=1,a2a=linear" --metrics fixed.jsonl --quiet > np2f.txt 2>&1 || fail "-np 2 fixed: $(why np2f.txt)"
  close cycle.jsonl fixed.jsonl 1e-5
  echo "ok: today's routers on cuda follow the cpu, graphs change nothing, variants agree at -np 2" ;;
graphs)
  # CUDA graphs: the same values, to the bit, as the ops run one by one
  # (MOEC_CUDA_GRAPHS=0), with graphs captured and launched and none refused:
  # graphs.moe (every kind of segment), dist.moe with its variants cycled (a
  # graph per variant and dropless capacity); on 2 GPUs, dist over nccl too,
  # and on 4 as 2 nodes of 2 (2dh)
  "$moec" build "$src/tests/gpu/graphs.moe" -o graphs >/dev/null 2>&1 || fail "moec build graphs"
  same() { # NAME "RANKS [MPIRUN OPTIONS]" PROGRAM ARGS...: one run without graphs, one with, compared
    name=$1 np=$2; shift 2
    if [ "$np" = 1 ]; then r() { "$@"; }; else r() { timeout 300 "$mpiexec" --oversubscribe -np $np "$@"; }; fi
    MOEC_CUDA_GRAPHS=0 r "$@" --metrics "$name.plain.jsonl" > "$name.plain.txt" 2>&1 || fail "$name without graphs: $(cat "$name.plain.txt")"
    r "$@" --metrics "$name.graphs.jsonl" > "$name.graphs.txt" 2>&1 || fail "$name with graphs: $(cat "$name.graphs.txt")"
    grep -q "CUDA graphs: none (MOEC_CUDA_GRAPHS=0)" "$name.plain.txt" || fail "$name: MOEC_CUDA_GRAPHS=0 not said"
    grep -q "CUDA graphs: one per layer" "$name.graphs.txt" || fail "$name: graphs not on: $(grep 'CUDA graphs' "$name.graphs.txt")"
    line=$(grep "CUDA graphs: [0-9]* captured" "$name.graphs.txt")
    echo "$name: $line"
    echo "$line" | grep -q "CUDA graphs: [1-9][0-9]* captured, [1-9][0-9]* launched, 0 parts ran without one" ||
      fail "$name: graphs not made, not launched or refused: $line $(grep -i warning "$name.graphs.txt")"
    for f in loss aux_loss grad_norm dropped; do
      field "$f" "$name.plain.jsonl" > a.txt; field "$f" "$name.graphs.jsonl" > b.txt
      [ -s a.txt ] && cmp -s a.txt b.txt || { paste a.txt b.txt | head -20; fail "$name: $f differs with graphs"; }
    done
  }
  same graphs 1 ./graphs --backend cuda --kernel-cache kc --steps 24 --log-every 1 --variant cycle
  same dist 1 ./dist --backend cuda --kernel-cache kc --log-every 1 --variant cycle
  gpus=$(gpu_count)
  if [ "${gpus:-0}" -ge 2 ]; then
    same dist_nccl 2 ./dist --backend cuda --comm nccl --kernel-cache kc --log-every 1 --variant cycle
  else
    echo "(one GPU: dist over nccl at -np 2 not run)"
  fi
  if [ "${gpus:-0}" -ge 4 ]; then # two simulated nodes of 2: the 2dh all-to-all in graphs
    same dist_2dh "4 -x MOEC_LOCAL_SIZE=2" ./dist --backend cuda --comm nccl --kernel-cache kc --log-every 1 --variant cycle
  fi
  echo "ok: CUDA graphs give the values of the ops run one by one" ;;
mfu)
  # the GPU's peak from the table by its name (or, on a GPU the table lacks, no MFU, said once)
  ./tiny --backend cuda --kernel-cache kc --steps 3 --log-every 1 --metrics m.jsonl > out.txt || fail "run"
  if grep -q "^MFU: peak" out.txt; then
    peak=$(sed -n 's/^MFU: peak \([0-9.]*\) TFLOP.*/\1/p' out.txt)
    grep -q "TFLOP/s    MFU" out.txt || fail "no MFU column: $(cat out.txt)"
    python3 - m.jsonl "$peak" <<'PY' || fail "mfu is not tflops / peak"
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    assert abs(r["mfu"] - r["tflops"] / float(sys.argv[2])) <= 1e-9, r
PY
    echo "ok: $(grep '^MFU' out.txt)"
  else
    [ "$(grep -c 'no MFU column' out.txt)" = 1 ] || fail "no peak and no word why: $(cat out.txt)"
    grep -q '"mfu"' m.jsonl && fail "mfu in the metrics without a peak"
    echo "ok (a GPU the table lacks): $(grep '^MFU' out.txt)"
  fi
  MOEC_PEAK_TFLOPS=100 ./tiny --backend cuda --kernel-cache kc --steps 2 > out.txt || fail "run with MOEC_PEAK_TFLOPS"
  grep -q "MFU: peak 100 TFLOP/s per GPU, from MOEC_PEAK_TFLOPS" out.txt || fail "the override: $(cat out.txt)" ;;

oom)
  # 16M tokens of tiny: a plan of about 195 GB, more than any GPU has
  ./tiny --backend cuda --kernel-cache kc --tokens 16000000 --steps 1 >out.txt 2>err.txt; rc=$?
  [ $rc = 1 ] || fail "a plan larger than the GPU exited $rc, not 1: $(cat err.txt)"
  [ "$(grep -c 'out of GPU memory' err.txt)" = 1 ] || fail "not one message: $(cat err.txt)"
  for w in "on rank 0" "the plan needs [0-9.]* GB on this rank" "free of" "--tokens N; now 16000000" "more ranks"; do
    grep -q -- "$w" err.txt || fail "the message lacks '$w': $(cat err.txt)"
  done
  echo "early check: $(cat err.txt)"
  # past the check (the free memory faked as 1 PB): cuMemAlloc itself fails, same message
  MOEC_TEST_DEVICE_MEMORY=1e15,1e15 ./tiny --backend cuda --kernel-cache kc --tokens 16000000 --steps 1 \
    >out.txt 2>err.txt; rc=$?
  [ $rc = 1 ] || fail "a real out-of-memory exited $rc, not 1: $(cat err.txt)"
  grep -q "out of GPU memory on rank 0: the plan needs" err.txt || fail "a real out-of-memory: $(cat err.txt)"
  echo "cuMemAlloc: $(cat err.txt)"
  # two ranks on the GPU: both stop, one message
  "$mpiexec" --oversubscribe -np 2 ./tiny --backend cuda --kernel-cache kc --tokens 16000000 --steps 1 \
    >out.txt 2>&1 && fail "2 ranks out of memory succeeded"
  [ "$(grep -c 'error: out of GPU memory' out.txt)" = 1 ] || fail "not one message from 2 ranks: $(cat out.txt)"
  echo "ok: a plan larger than the GPU fails with exit 1 and one message naming the fix" ;;

diverge)
  # --on-nan on the cuda backend: the loss and gradient norm read from the
  # device before the update, the layer found by downloading each layer's
  # output; the same as on the cpu (tests/model/binary_test.sh diverge)
  "$moec" build "$src/tests/model/diverge.moe" -o diverge >/dev/null || fail "moec build diverge"
  for b in cpu cuda; do
    ./diverge --backend $b --kernel-cache kc --checkpoint ck_$b --checkpoint-every 1 --metrics stop_$b.jsonl \
      --quiet >out.txt 2>err_$b.txt; rc=$?
    [ $rc = 1 ] || fail "$b: stop: exit status $rc, not 1: $(cat err_$b.txt)"
    ./diverge --backend $b --kernel-cache kc --on-nan skip --checkpoint sk_$b --checkpoint-every 1 \
      --metrics skip_$b.jsonl --quiet || fail "$b: skip: exit status $?"
  done
  grep -q "training diverged at step 2: .*the output of layer \`experts_0\` went non-finite first" err_cuda.txt ||
    fail "cuda: the message does not name experts_0 at step 2: $(cat err_cuda.txt)"
  grep -q '"step": 1,' ck_cuda/MANIFEST.json || fail "cuda: the kept checkpoint is not at step 1"
  [ "$(field skipped skip_cuda.jsonl | tr '\n' ' ')" = "0 1 2 3 " ] || fail "cuda: skipped counts $(field skipped skip_cuda.jsonl)"
  [ "$(field loss skip_cuda.jsonl | tail -1)" = null ] || fail "cuda: step 4's loss is not null"
  cmp -s ck_cuda/model.safetensors sk_cuda/model.safetensors && cmp -s ck_cuda/optimizer.safetensors sk_cuda/optimizer.safetensors ||
    fail "cuda: the skipped steps changed the weights or the optimizer state"
  echo "ok: --on-nan stop and skip on the cuda backend as on the cpu" ;;

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
  # two ranks: with a GPU each (2 GPUs or more), nccl must work, is the
  # default and follows mpi; on one GPU, --comm nccl is refused on every rank
  # with the way out, and the default is the staged mpi comm
  need_gpu_count
  run() { timeout 120 "$mpiexec" --oversubscribe -np 2 "$@"; }
  run ./dist --backend cuda --comm nccl --kernel-cache kc --variant cycle --metrics nccl.jsonl > nccl.txt 2>&1; rc=$?
  [ $rc != 124 ] || fail "--comm nccl at -np 2 on $gpus GPU(s) hung"
  if [ $rc != 0 ] && grep -q "NCCL could not be loaded" nccl.txt; then
    echo "SKIP: no NCCL here: $(grep -m1 'NCCL could not be loaded' nccl.txt)"; exit 77
  fi
  if [ "$gpus" -lt 2 ]; then
    [ $rc != 0 ] || fail "--comm nccl at -np 2 on one GPU was not refused: $(grep '^backend' nccl.txt)"
    grep -q "share one GPU" nccl.txt && grep -q -- "--comm mpi" nccl.txt ||
      fail "--comm nccl failed without the shared-GPU message: $(cat nccl.txt)"
    run ./dist --backend cuda --kernel-cache kc --steps 3 > default.txt 2>&1 || fail "default run: $(cat default.txt)"
    grep -q "comm mpi (staged" default.txt || fail "two ranks on one GPU do not default to mpi: $(grep '^backend' default.txt)"
    echo "ok: one GPU: --comm nccl is refused on both ranks with a clear message; the default is staged mpi"
    exit 0
  fi
  [ $rc = 0 ] || fail "--comm nccl at -np 2 on $gpus GPUs (exit $rc): $(why nccl.txt)"
  grep -q "comm nccl" nccl.txt || fail "the header does not name the nccl comm"
  run ./dist --backend cuda --comm mpi --kernel-cache kc --variant cycle --metrics mpi.jsonl --quiet || fail "--comm mpi"
  close mpi.jsonl nccl.jsonl 1e-4 20 5e-2
  bad=$(grep -c -v '"switch_bytes": 0, "switch_allocs": 0' nccl.jsonl)
  [ "$bad" = 0 ] || fail "$bad steps switched at a cost"
  run ./dist --backend cuda --kernel-cache kc --steps 3 > default.txt 2>&1 || fail "default run"
  grep -q "comm nccl" default.txt || fail "a GPU per rank does not default to nccl: $(grep '^backend' default.txt)"
  echo "ok: -np 2 on two GPUs: nccl is the default; every variant, cycled, follows mpi's losses" ;;
nccl_watchdog)
  # --timeout on the nccl comm (issue 17): rank 2 of 3 stops (SIGSTOP) at
  # step 3; the others' collectives on the GPU never finish. On a GPU the
  # host's wait for the stream passes the timeout; on the emulation the NCCL
  # stand-in gives up on the lost peer after 1 s (MOEC_EMU_NCCL_PEER_TIMEOUT)
  # with an async error. Either way the communicator is aborted, the roll call
  # names rank 2, and the job ends with status 3 within the timeout + 30 s.
  need_gpu_count
  [ "$gpus" -ge 3 ] || { echo "SKIP: 3 GPUs needed, $gpus here"; exit 77; }
  printf 'model w3 {\n  dim = 16; tokens = 32; dtype = fp32;\n  repeat 2 { residual { rmsnorm; moe e { experts = 3; hidden = 64; top_k = 2; capacity_factor = 2; } } }\n}\ntrain { steps = 20; optimizer = adam; lr = 3e-3; seed = 2; }\n' > w3.moe
  "$moec" build w3.moe -o w3 >/dev/null 2>&1 || fail "moec build w3"
  # the kernels compiled once, before the job: a rank compiling for long
  # while the others wait in a collective would fire the watchdog too
  ./w3 --backend cuda --kernel-cache kc --steps 1 --quiet || fail "a first run (the kernel cache)"
  exe=$(readlink -f w3)
  t0=$(date +%s)
  timeout -k 5 60 "$mpiexec" --oversubscribe -np 3 -x MOEC_TEST_STOP_RANK=2,3 -x MOEC_EMU_NCCL_PEER_TIMEOUT=1 \
    ./w3 --backend cuda --comm nccl --kernel-cache kc --steps 100000 --timeout 5 --quiet >out.txt 2>err.txt; rc=$?
  took=$(($(date +%s) - t0))
  sleep 1
  left=""
  for p in /proc/[0-9]*; do [ "$(readlink "$p/exe" 2>/dev/null)" = "$exe" ] && left="$left ${p#/proc/}"; done
  # shellcheck disable=SC2086 # a list of pids
  [ -z "$left" ] || { kill -CONT $left; kill -KILL $left; fail "processes left behind:$left"; }
  if grep -q "NCCL could not be loaded" err.txt; then echo "SKIP: no NCCL here"; exit 77; fi
  [ $rc != 124 ] && [ $rc != 137 ] || fail "the job hung (killed after $took s): $(cat err.txt)"
  [ $rc = 3 ] || fail "exit status $rc, not 3: $(cat err.txt)"
  [ $took -le 35 ] || fail "the job took $took s to end, more than --timeout 5 + 30 s"
  grep -q "(NCCL, on the GPU) at step 3 .*rank 2 did not answer a roll call" err.txt ||
    fail "the message does not name the NCCL collective, step 3 and rank 2: $(cat err.txt)"
  echo "ok: rank 2 stopped: the nccl job ended in $took s, status 3: $(grep 'roll call' err.txt | head -1)" ;;
trace)
  # --trace on the cuda backend: every span timed by CUDA events, the MoE
  # phases (positive) inside their layer's span, on the compute stream's
  # thread; layer_ms and update_ms positive without a synchronization per layer
  check_trace() { # FILE METRICS RANKS WANT...
    python3 - "$@" <<'PY'
import json, sys
path, metrics, ranks, want = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
t = json.load(open(path))
assert t["otherData"]["clock"].startswith("device"), t["otherData"]
assert t["otherData"]["dropped_events"] == 0, t["otherData"]
threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in t["traceEvents"] if e.get("name") == "thread_name"}
assert threads[(0, 0)] == "compute stream", threads
ev = [e for e in t["traceEvents"] if e["ph"] == "X"]
assert {e["pid"] for e in ev} == set(range(ranks)), "events of every rank"
names = {e["name"] for e in ev}
for w in want:
    assert w in names, (w, sorted(names))
assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in ev)
layers = [e for e in ev if e["cat"] in ("forward", "backward")]
eps = 0.002  # ts and dur are written to 0.001 us
inner = 0
for e in ev:
    if e["cat"] not in ("gate", "dispatch", "experts", "combine", "all-to-all"):
        continue
    assert e["dur"] > 0, ("a phase of no time", e)
    assert e["tid"] == (1 if e["cat"] == "all-to-all" else 0), e
    bwd = e["name"].startswith("bwd ")
    holders = [l for l in layers if l["pid"] == e["pid"] and l["args"]["step"] == e["args"]["step"]
               and l["cat"] == ("backward" if bwd else "forward")
               and l["ts"] - eps <= e["ts"] and e["ts"] + e["dur"] <= l["ts"] + l["dur"] + eps]
    assert holders, ("a phase outside every layer", e)
    inner += 1
steps = 0
for r in map(json.loads, open(metrics)):
    assert r["layer_ms"] and all(v is not None and v > 0 for v in r["layer_ms"].values()), r["layer_ms"]
    assert r["update_ms"] is not None and r["update_ms"] > 0, r["update_ms"]
    steps += 1
print("%d events, %d MoE phases inside their layers, %d steps of positive layer_ms" % (len(ev), inner, steps))
PY
  }
  ./tiny --backend cuda --kernel-cache kc --steps 4 --trace t.json --metrics m.jsonl > out.txt || fail "run"
  grep -q "^trace: t.json" out.txt || fail "no word of the trace: $(cat out.txt)"
  check_trace t.json m.jsonl 1 "gate and capacity" dispatch experts combine "bwd combine" "bwd experts" \
    "bwd dispatch" "bwd gate" optimizer experts_0 experts_1 rmsnorm_0 || fail "the trace of one rank is wrong"
  # two ranks on the staged mpi comm (as on one GPU, whatever the count):
  # the all-to-all chunks from start to wait
  "$mpiexec" --oversubscribe -np 2 ./dist --backend cuda --comm mpi --kernel-cache kc --steps 3 \
    --variant r=1,d=2,a2a=linear --trace t2.json --metrics m2.jsonl --quiet || fail "-np 2 run"
  check_trace t2.json m2.jsonl 2 "a2a to experts 1/2" "a2a back 2/2" "experts 1/2" "bwd a2a back 1/2" \
    || fail "the trace of two ranks is wrong"
  # with a GPU per rank, the nccl comm: the all-to-alls on its own stream; on
  # one GPU it must be refused
  need_gpu_count
  timeout 120 "$mpiexec" --oversubscribe -np 2 ./dist --backend cuda --comm nccl --kernel-cache kc --steps 3 \
    --variant r=1,d=2,a2a=linear --trace t3.json --metrics m3.jsonl > nccl.txt 2>&1; rc=$?
  [ $rc != 124 ] || fail "--comm nccl at -np 2 on $gpus GPU(s) hung"
  if [ $rc != 0 ] && grep -q "NCCL could not be loaded" nccl.txt; then
    echo "SKIP: no NCCL here, the nccl trace is not checked: $(grep -m1 'NCCL could not be loaded' nccl.txt)"; exit 77
  fi
  if [ "$gpus" -ge 2 ]; then
    [ $rc = 0 ] || fail "--comm nccl at -np 2 on $gpus GPUs (exit $rc): $(why nccl.txt)"
    check_trace t3.json m3.jsonl 2 "a2a to experts 1/2" "a2a back 2/2" "experts 2/2" || fail "the nccl trace is wrong"
    python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); n=[e["args"]["name"] for e in t["traceEvents"] if e.get("name")=="thread_name" and e["tid"]==1]; assert n[0]=="comm stream (all-to-all)", n' t3.json ||
      fail "the comm stream's thread is not named"
  else
    [ $rc != 0 ] && grep -q "share one GPU" nccl.txt ||
      fail "--comm nccl at -np 2 on one GPU was not refused with the shared-GPU message (exit $rc): $(why nccl.txt)"
    echo "(one GPU: --comm nccl refused, as it must be; no nccl trace)"
  fi
  echo "ok: --trace on cuda: device-timed spans, phases inside their layers, positive layer_ms" ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac

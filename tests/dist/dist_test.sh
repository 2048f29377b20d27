#!/bin/sh
# dist_test.sh MODE MOEC SRCDIR WORKDIR MPIEXEC — moec-built binaries under
# mpirun, as a user runs them (several ranks share this machine's cores).
set -u
mode=$1 moec=$2 src=$3 work=$4 mpiexec=$5
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $mode: $*"; exit 1; }
field() { sed -n "s/.*\"$1\": \([^,}]*\).*/\1/p" "$2"; }
run() { n=$1; shift; "$mpiexec" --oversubscribe -np "$n" -x MOEC_LOCAL_SIZE -x MOEC_TEST_SLOW_VARIANT -x OPENBLAS_NUM_THREADS "$@"; }
export OPENBLAS_NUM_THREADS=1 MOEC_LOCAL_SIZE=${MOEC_LOCAL_SIZE:-} MOEC_TEST_SLOW_VARIANT=${MOEC_TEST_SLOW_VARIANT:-}
[ -n "$MOEC_LOCAL_SIZE" ] || unset MOEC_LOCAL_SIZE
# modes ending in _attn run dist_attn.moe (attention and experts) as ./dist, in
# _routers dist_routers.moe (today's routers)
case $mode in
*_attn) spec=dist_attn; mode=${mode%_attn} ;;
*_routers) spec=dist_routers; mode=${mode%_routers} ;;
*) spec=dist ;;
esac
"$moec" build "$src/tests/dist/$spec.moe" -o dist >/dev/null || fail "moec build $spec.moe"
# losses of two metrics files agree to a relative tolerance
same_losses() {
  field loss "$1" > l1.txt; field loss "$2" > l2.txt
  [ -s l1.txt ] && [ "$(wc -l < l1.txt)" = "$(wc -l < l2.txt)" ] || fail "$1 and $2 hold different steps"
  paste l1.txt l2.txt | awk -v tol="$3" '{ d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2);
    if (r > worst) worst = r } END { printf "worst relative difference %.2e\n", worst; exit !(worst <= tol) }' ||
    { paste l1.txt l2.txt; fail "losses differ past $3"; }
}

case $mode in
cycle_np*)
  n=${mode#cycle_np}
  run "$n" ./dist --variant cycle --metrics cycle.jsonl --quiet || fail "cycle run"
  first=$(sed -n 's/.*"variants": {"\([^"]*\)": "\([^"]*\)".*/\2/p' cycle.jsonl | head -1)
  run "$n" ./dist --variant "$first" --metrics fixed.jsonl --quiet || fail "fixed run ($first)"
  same_losses cycle.jsonl fixed.jsonl 1e-5
  # zero switching cost: the variant changed, and nothing was copied or allocated
  changes=$(sed -n 's/.*"variants": {\([^}]*\)}.*/\1/p' cycle.jsonl | uniq | wc -l)
  [ "$changes" -gt 2 ] || fail "the variants did not change from step to step ($changes distinct in a row)"
  bad=$(grep -c -v '"switch_bytes": 0, "switch_allocs": 0' cycle.jsonl)
  [ "$bad" = 0 ] || fail "$bad steps switched at a cost: $(grep -v '"switch_bytes": 0, "switch_allocs": 0' cycle.jsonl | head -1)"
  echo "ok: -np $n: cycling through every variant follows the fixed run's losses; $changes switches cost 0 bytes and 0 allocations" ;;
bf16_np4)
  # the bf16 expert path, emulated on the cpu (MOEC_CPU_BF16=1): its addressing
  # in every variant, against itself and against fp32
  sed 's/dtype = fp32/dtype = bf16/' "$src/tests/dist/$spec.moe" > distb.moe
  "$moec" build distb.moe -o distb >/dev/null 2>&1 || fail "moec build (bf16)"
  MOEC_CPU_BF16=1 ./distb --steps 1 | grep -q "bf16 experts" || fail "the header does not say the experts run in bf16"
  brun() { n=$1; shift; MOEC_CPU_BF16=1 run "$n" -x MOEC_CPU_BF16 "$@"; }
  brun 4 ./distb --variant cycle --metrics cycle.jsonl --quiet || fail "cycle run"
  first=$(sed -n 's/.*"variants": {"\([^"]*\)": "\([^"]*\)".*/\2/p' cycle.jsonl | head -1)
  brun 4 ./distb --variant "$first" --metrics fixed.jsonl --quiet || fail "fixed run ($first)"
  same_losses cycle.jsonl fixed.jsonl 2e-3
  bad=$(grep -c -v '"switch_bytes": 0, "switch_allocs": 0' cycle.jsonl)
  [ "$bad" = 0 ] || fail "$bad steps switched at a cost"
  brun 1 ./distb --tokens 128 --metrics w1.jsonl --quiet || fail "-np 1"
  same_losses w1.jsonl fixed.jsonl 2e-2
  run 4 ./dist --variant "$first" --metrics f32.jsonl --quiet || fail "fp32 run"
  same_losses f32.jsonl fixed.jsonl 2e-2
  echo "ok: bf16 experts: every variant follows the fixed one, -np 1 and fp32 within bf16 tolerance; switches free" ;;
generate)
  # --generate at two ranks: every rank runs the forwards (the experts' are
  # collective; rank 0 alone would wait for the others forever), rank 0
  # prints, and the sample is -np 1's (the same weights: invariance)
  p=" 0123 456"
  run 1 ./dist --tokens 128 --generate 40 --prompt "$p" > g1.txt || fail "-np 1: $(tail -2 g1.txt)"
  timeout 120 "$mpiexec" --oversubscribe -np 2 -x OPENBLAS_NUM_THREADS ./dist --tokens 64 --generate 40 --prompt "$p" \
    > g2.txt 2>&1 || fail "-np 2 exited $? (124: it hung): $(tail -2 g2.txt)"
  sed -n '/^sample (prompt in brackets):$/,$p' g1.txt > s1.txt; sed -n '/^sample (prompt in brackets):$/,$p' g2.txt > s2.txt
  [ "$(grep -c '^sample' g2.txt)" = 1 ] || fail "-np 2 printed $(grep -c '^sample' g2.txt) samples, not rank 0's alone"
  [ "$(tail -n +2 s1.txt | wc -c)" -ge $((${#p} + 2 + 40)) ] || fail "no sample of 40 bytes: $(cat g1.txt)"
  cmp -s s1.txt s2.txt || { cat s1.txt s2.txt; fail "the samples of -np 1 and -np 2 differ"; }
  # a prompt byte past the vocabulary (64) is refused, not read out of bounds
  ./dist --steps 1 --generate 4 --prompt "abc" > bad.txt 2>&1 && fail "a prompt outside the vocabulary ran"
  grep -q "outside the model's vocabulary of 64" bad.txt || fail "unclear message: $(cat bad.txt)"
  echo "ok: --generate at -np 2 runs on every rank, prints once, and samples what -np 1 samples" ;;
invariance)
  t=32
  run 1 ./dist --tokens $((4 * t)) --metrics w1.jsonl --quiet || fail "-np 1"
  run 4 ./dist --tokens $t --metrics w4.jsonl --quiet || fail "-np 4"
  grep -v resumed w1.jsonl > a.jsonl; grep -v resumed w4.jsonl > b.jsonl
  same_losses a.jsonl b.jsonl 1e-4
  echo "ok: -np 1 with $((4 * t)) tokens and -np 4 with $t tokens give the same losses" ;;
selector)
  slow="r=0,d=1,a2a=linear"
  # the measured selector alone: a binary without a calibration explores every
  # candidate in rounds, whatever calibration is committed (model.cost.explore
  # tests exploring with one)
  "$moec" build --gpu none "$src/tests/dist/dist.moe" -o dist >/dev/null || fail "moec build --gpu none"
  MOEC_TEST_SLOW_VARIANT=$slow run 2 ./dist --steps 30 --metrics s.jsonl --quiet || fail "run"
  grep -q '"selector"' s.jsonl || fail "the selector never reported a finished exploration"
  # 3 candidates at -np 2 (dist.moe): a warm-up round, then explore_steps = 2 rounds
  at=$(grep '"selector"' s.jsonl | head -n 1 | sed -n 's/^{"step": \([0-9]*\),.*/\1/p')
  [ "$at" = 9 ] || fail "the exploration ended at step $at, not 9 (3 candidates, a warm-up and 2 measured runs each)"
  tail -5 s.jsonl | grep -q "$slow" && fail "the selector still uses the slow variant $slow after exploring: $(tail -1 s.jsonl)"
  echo "ok: exploration over, the selector avoids $slow (made 30 ms slower per use)" ;;
resume_np*)
  a=${mode#resume_np}; a=${a%_*}; b=${mode##*_}
  run "$a" ./dist --tokens $((128 / a)) --steps 8 --checkpoint ck --eval-every 8 --metrics a.jsonl --quiet || fail "-np $a"
  want=$(grep '"step": 8,' a.jsonl | sed -n 's/.*"eval_loss": \([^,}]*\).*/\1/p')
  [ -n "$want" ] || fail "no eval loss at the checkpoint step"
  run "$b" ./dist --tokens $((128 / b)) --steps 10 --checkpoint ck --resume --eval-every 2 --metrics b.jsonl --quiet ||
    fail "resume at -np $b"
  got=$(grep '"resumed": true' b.jsonl | sed -n 's/.*"eval_loss": \([^,}]*\).*/\1/p')
  awk -v a="$want" -v b="$got" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(b != "" && d <= 1e-5 * a) }' ||
    fail "held-out loss after resuming at -np $b is $got, at the checkpoint (-np $a) it was $want"
  [ "$(field step b.jsonl | tail -1)" = 10 ] || fail "training did not go on to step 10"
  echo "ok: a checkpoint of -np $a resumes at -np $b: held-out loss $want -> $got, training goes on" ;;
trace)
  run 2 ./dist --steps 3 --variant r=1,d=2,a2a=linear --trace t.json --quiet || fail "run"
  python3 - t.json <<'PY' || fail "the trace is wrong"
import json, sys
t = json.load(open(sys.argv[1]))
ev = [e for e in t["traceEvents"] if e["ph"] == "X"]
assert {e["pid"] for e in ev} == {0, 1}, "events of both ranks"
names = {e["name"] for e in ev}
for want in ("a2a to experts 1/2", "a2a to experts 2/2", "experts 2/2", "bwd a2a back 1/2", "dispatch",
             "combine", "gate and capacity", "optimizer", "e_0", "e_1", "rmsnorm_0", "end_1"):
    assert want in names, (want, sorted(names))
a2a = [e for e in ev if e["cat"] == "all-to-all"]
assert a2a and all(e["tid"] == 1 for e in a2a), "all-to-alls on their own thread"
assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in ev)
assert {e["args"]["step"] for e in ev} == {1, 2, 3}
assert t["otherData"]["clock"] == "host", t["otherData"]
for want in ("bwd combine", "bwd gate", "bwd dispatch", "bwd experts 1/2", "batch"):
    assert want in names, (want, sorted(names))
# every MoE phase inside its layer's span (same rank, step and pass)
layers = [e for e in ev if e["cat"] in ("forward", "backward")]
for e in ev:
    if e["cat"] in ("gate", "dispatch", "experts", "combine", "all-to-all"):
        cat = "backward" if e["name"].startswith("bwd ") else "forward"
        assert any(l["pid"] == e["pid"] and l["args"]["step"] == e["args"]["step"] and l["cat"] == cat and
                   l["ts"] - 0.002 <= e["ts"] and e["ts"] + e["dur"] <= l["ts"] + l["dur"] + 0.002
                   for l in layers), ("a phase outside its layer", e)
print(len(ev), "events,", len(a2a), "all-to-all spans")
PY
  echo "ok: the trace holds every rank's layers, MoE phases and all-to-all chunks" ;;
bad_world)
  # 4 experts cannot be shared by 3 ranks
  timeout 60 "$mpiexec" --oversubscribe -np 3 ./dist --steps 2 > out.txt 2>&1; rc=$?
  [ $rc = 1 ] || fail "-np 3 with 4 experts exited $rc, not 1: $(cat out.txt)"
  grep -q "divides 4 or that 4 divides" out.txt || fail "unclear message: $(cat out.txt)"
  # hidden 30 is not divisible by S = 4 when one expert is split over 4 ranks
  printf 'model h { dim = 8; tokens = 8; dtype = fp32; moe e { experts = 1; hidden = 30; top_k = 1; } }\ntrain { steps = 2; }\n' > h.moe
  "$moec" build h.moe -o h 2>/dev/null || fail "build h"
  timeout 60 "$mpiexec" --oversubscribe -np 4 ./h > out.txt 2>&1; rc=$?
  [ $rc = 1 ] || fail "hidden 30 at -np 4 exited $rc: $(cat out.txt)"
  grep -q "not divisible by the shard count S = 4" out.txt || fail "unclear message: $(cat out.txt)"
  # a forced variant that no layer has: the error lists the candidates
  timeout 60 "$mpiexec" --oversubscribe -np 2 ./dist --variant r=3,d=1,a2a=linear > out.txt 2>&1; rc=$?
  [ $rc = 1 ] || fail "an impossible --variant exited $rc: $(cat out.txt)"
  grep -q "candidates are: r=0,d=1,a2a=linear" out.txt || fail "the candidates are not listed: $(cat out.txt)"
  timeout 60 "$mpiexec" --oversubscribe -np 2 ./dist --variant nosuch:r=1,d=1,a2a=linear > out.txt 2>&1; rc=$?
  [ $rc = 1 ] && grep -q "no MoE layer called .nosuch." out.txt || fail "unknown layer in --variant: rc $rc: $(cat out.txt)"
  echo "ok: world sizes and variants that cannot be are clear errors on every rank, with no hang" ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac

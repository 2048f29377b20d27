#!/bin/sh
# binary_test.sh MODE MOEC SRCDIR WORKDIR — moec-built binaries as a user runs
# them. Each MODE is one CTest. Exit 77 means "skipped" (a missing optional
# tool), with the reason printed.
set -u
mode=$1 moec=$2 src=$3 work=$4
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $mode: $*"; exit 1; }
# the value of "key" in every line of a JSON-lines file, one per line
field() { sed -n "s/.*\"$1\": \([^,}]*\).*/\1/p" "$2"; }
build() { "$moec" build "$src/examples/$1.moe" -o "$1" >/dev/null || fail "moec build $1"; }
export OPENBLAS_NUM_THREADS=1

case $mode in
build_examples)
  for spec in "$src"/examples/*.moe; do
    name=$(basename "$spec" .moe)
    "$moec" build "$spec" -o "$name" || fail "moec build $spec"
    ./"$name" --help > help.txt || fail "$name --help exits $?"
    grep -q -- "--steps" help.txt || fail "$name --help lists no --steps"
  done
  # the binary appears whole or not at all: a failing build leaves nothing
  printf 'model m { dim = 2; tokens = 1; }' > ok.moe
  MOEC_CC=false "$moec" build ok.moe -o nothing 2>err.txt && fail "a failing C compiler did not fail the build"
  [ -e nothing ] && fail "a failed build left a binary"
  grep -q "C compiler failed" err.txt || fail "no clear message when cc fails: $(cat err.txt)"
  echo "ok: every example builds and runs --help" ;;

bf16_emulated)
  # a bf16 model's FFN and expert paths in bf16 (the cpu rounding where the GPU
  # stores bf16): it learns, and follows the fp32 computation within bf16 error
  "$moec" build "$src/tests/model/bf16_dense.moe" -o dense >/dev/null 2>&1 || fail "moec build"
  ./dense --quiet --metrics f32.jsonl || fail "fp32 run"
  MOEC_CPU_BF16=1 ./dense --metrics b16.jsonl > out.txt || fail "bf16 run"
  grep -q "bf16 experts, dense FFNs and head" out.txt || fail "the header does not say bf16: $(grep ^backend out.txt)"
  field loss f32.jsonl > a.txt; field loss b16.jsonl > b.txt
  paste a.txt b.txt | awk '{ d = $1 - $2; if (d < 0) d = -d; if (d / $1 > w) w = d / $1 } END {
    printf "worst relative difference %.2e\n", w; exit !(w < 2e-2) }' || fail "bf16 strays from fp32"
  awk 'NR == 1 { a = $1 } { z = $1 } END { exit !(z < a / 4) }' b.txt || fail "the bf16 model did not learn"
  # a byte model: the head's bf16 GEMMs (fp32 logits and cross-entropy)
  corpus="$src/examples/data/corpus.txt"
  [ -s "$corpus" ] || sh "$src/tools/make-corpus.sh" || fail "no corpus"
  "$moec" build "$src/tests/model/bf16_bytes.moe" -o bytes >/dev/null 2>&1 || fail "moec build bf16_bytes"
  ./bytes --quiet --data "$corpus" --metrics bf32.jsonl || fail "fp32 run (bytes)"
  MOEC_CPU_BF16=1 ./bytes --data "$corpus" --metrics bb16.jsonl > out.txt || fail "bf16 run (bytes)"
  grep -q "dense FFNs and head" out.txt || fail "the header does not say the head is bf16: $(grep ^backend out.txt)"
  field loss bf32.jsonl > a.txt; field loss bb16.jsonl > b.txt
  paste a.txt b.txt | awk '{ d = $1 - $2; if (d < 0) d = -d; if (d / $1 > w) w = d / $1 } END {
    printf "bytes: worst relative difference %.2e\n", w; exit !(w < 2e-2 && w > 0) }' ||
    fail "the bf16 byte model strays from fp32 (or is fp32)"
  awk 'NR == 1 { a = $1 } { z = $1 } END { exit !(z < a * 0.6) }' b.txt || fail "the bf16 byte model did not learn"
  echo "ok: bf16 dense, expert and head paths (emulated) learn and follow fp32" ;;

tiny_learns)
  build tiny
  ./tiny --metrics m.jsonl --quiet || fail "tiny exited $?"
  first=$(field loss m.jsonl | head -1) last=$(field loss m.jsonl | tail -1)
  n=$(wc -l < m.jsonl)
  [ "$n" = 200 ] || fail "metrics has $n lines, not 200"
  awk -v a="$first" -v b="$last" 'BEGIN { exit !(b <= a / 2) }' || fail "loss $first -> $last did not halve"
  echo "ok: tiny's loss $first -> $last" ;;

bytes_learns)
  build bytes_small
  corpus="$src/examples/data/corpus.txt"
  [ -s "$corpus" ] || sh "$src/tools/make-corpus.sh" || fail "no corpus"
  ./bytes_small --data "$corpus" --steps 200 --eval-every 200 --metrics m.jsonl --quiet || fail "exited $?"
  ev=$(field eval_loss m.jsonl | tail -1)
  # unigram entropy of the text in nats: what a model that ignores context reaches
  h=$(od -An -v -tu1 "$corpus" | tr -s ' ' '\n' | grep -v '^$' | sort -n | uniq -c |
      awk '{ c[$2] = $1; n += $1 } END { for (k in c) { p = c[k] / n; h -= p * log(p) } printf "%.4f", h }')
  awk -v e="$ev" -v h="$h" 'BEGIN { exit !(e < h) }' || fail "eval loss $ev is not below the unigram entropy $h"
  echo "ok: held-out loss $ev nats < unigram entropy $h nats" ;;

resume)
  build tiny
  ./tiny --steps 20 --metrics full.jsonl --quiet || fail "uninterrupted run"
  ./tiny --steps 10 --checkpoint ck --metrics a.jsonl --quiet || fail "first half"
  [ -f ck/MANIFEST.json ] && [ -f ck/model.safetensors ] && [ -f ck/optimizer.safetensors ] || fail "checkpoint files missing"
  ./tiny --steps 20 --checkpoint ck --resume --metrics b.jsonl --quiet || fail "resumed half"
  [ "$(field step b.jsonl | head -1)" = 11 ] || fail "resumed metrics do not start at step 11"
  [ "$(wc -l < b.jsonl)" = 10 ] || fail "resumed metrics do not hold steps 11..20"
  field loss full.jsonl | tail -10 > want.txt
  field loss b.jsonl > got.txt
  cmp -s want.txt got.txt || { paste want.txt got.txt; fail "losses after resume differ from the uninterrupted run"; }
  ./tiny --steps 10 --checkpoint ck --resume 2>err.txt && fail "resuming past --steps was accepted"
  grep -q "larger --steps" err.txt || fail "unclear message: $(cat err.txt)"
  echo "ok: steps 11..20 after resume equal the uninterrupted run bit for bit" ;;

resume_optimizer)
  # a checkpoint of another optimizer: the weights load, and the run says what became of the moments
  build tiny
  sed 's/optimizer = adam/optimizer = sgd/' "$src/examples/tiny.moe" > tsgd.moe
  "$moec" build tsgd.moe -o tsgd >/dev/null || fail "build tsgd"
  ./tiny --steps 4 --checkpoint ca --quiet || fail "adam run"
  cp -r ca cb
  ./tsgd --steps 6 --checkpoint ca --resume --quiet 2>err.txt || fail "sgd resuming adam: $(cat err.txt)"
  grep -q "note: the checkpoint's AdamW moments are dropped: this model trains with SGD" err.txt ||
    fail "sgd resuming adam does not say it drops the moments: $(cat err.txt)"
  ./tsgd --steps 4 --checkpoint cs --quiet || fail "sgd run"
  ./tiny --steps 6 --checkpoint cs --resume --quiet 2>err.txt || fail "adam resuming sgd: $(cat err.txt)"
  grep -q "note: AdamW's moments start from zero: the checkpoint was trained with SGD" err.txt ||
    fail "adam resuming sgd does not say the moments start anew: $(cat err.txt)"
  ./tiny --steps 8 --checkpoint cb --resume --quiet 2>err.txt || fail "adam resuming adam: $(cat err.txt)"
  [ -s err.txt ] && fail "adam resuming adam printed: $(cat err.txt)"
  echo "ok: a checkpoint of another optimizer resumes, and the run says what became of its state" ;;

resume_metrics)
  # --resume with the run's own --metrics file: the lines up to the
  # checkpoint stay byte for byte, those past it (the killed run's) go, and
  # every step is in the file once
  build tiny
  ./tiny --steps 20 --eval-every 5 --metrics full.jsonl --quiet || fail "uninterrupted run"
  # a run killed after step 12, its last checkpoint at step 10: the metrics of
  # a 12-step run and the checkpoint of a 10-step one (the steps are the same)
  ./tiny --steps 12 --eval-every 5 --metrics m.jsonl --quiet || fail "12 steps"
  ./tiny --steps 10 --checkpoint ck --eval-every 5 --quiet || fail "10 steps"
  cp m.jsonl before.jsonl
  ./tiny --steps 20 --checkpoint ck --checkpoint-every 5 --eval-every 5 --resume --metrics m.jsonl --quiet ||
    fail "resumed run"
  head -10 before.jsonl > a.txt; head -10 m.jsonl > b.txt
  cmp -s a.txt b.txt || fail "steps 1..10 changed, or are gone: $(wc -l < b.txt) lines"
  [ "$(sed -n 11p m.jsonl | grep -c '"step": 10, "resumed": true')" = 1 ] ||
    fail "line 11 is not the resume's marker at step 10: $(sed -n 11p m.jsonl | cut -c1-80)"
  grep -v '"resumed"' m.jsonl > steps.jsonl
  field step steps.jsonl > got.txt; seq 1 20 > want.txt
  cmp -s got.txt want.txt || fail "steps are not 1..20 once each: $(field step m.jsonl | tr '\n' ' ')"
  field loss full.jsonl > want.txt; field loss steps.jsonl > got.txt
  cmp -s want.txt got.txt || fail "the losses differ from the uninterrupted run's"
  # a torn last line (a kill mid-write) goes too; the first resume's marker stays
  printf '{"step": 21, "loss": 0.1' >> m.jsonl
  cp m.jsonl before.jsonl
  ./tiny --steps 25 --checkpoint ck --eval-every 5 --resume --metrics m.jsonl --quiet || fail "second resume"
  head -21 before.jsonl > a.txt; head -21 m.jsonl > b.txt
  cmp -s a.txt b.txt || fail "the second resume changed lines 1..21"
  [ "$(grep -c '"resumed": true' m.jsonl)" = 2 ] || fail "not two resume markers: $(grep resumed m.jsonl)"
  grep -v '"resumed"' m.jsonl > steps.jsonl
  field step steps.jsonl > got.txt; seq 1 25 > want.txt
  cmp -s got.txt want.txt || fail "after the torn line, steps are not 1..25 once each: $(field step m.jsonl | tr '\n' ' ')"
  # resumed twice from one checkpoint (the first resume killed later): one
  # marker at its step, and steps past it once
  cp -r ck ck25
  ./tiny --steps 27 --checkpoint ck --eval-every 5 --resume --metrics m.jsonl --quiet || fail "third resume"
  rm -rf ck && mv ck25 ck
  ./tiny --steps 27 --checkpoint ck --eval-every 5 --resume --metrics m.jsonl --quiet || fail "the same resume again"
  [ "$(grep -c '"resumed": true' m.jsonl)" = 3 ] || fail "not three resume markers: $(grep -c resumed m.jsonl)"
  grep -v '"resumed"' m.jsonl > steps.jsonl
  field step steps.jsonl > got.txt; seq 1 27 > want.txt
  cmp -s got.txt want.txt || fail "resuming twice from step 25: steps are $(field step m.jsonl | tr '\n' ' ')"
  # a run without --resume starts the file anew
  ./tiny --steps 3 --metrics m.jsonl --quiet || fail "fresh run"
  [ "$(wc -l < m.jsonl)" = 3 ] || fail "a fresh run kept old lines: $(wc -l < m.jsonl) lines"
  echo "ok: a resumed run appends to its metrics; every step is there once" ;;

signals)
  # SIGTERM (a scheduler's) ends a run after the step it was in: a checkpoint
  # at that step, a line that says so, status 143, every finished step in the
  # metrics; --resume continues as if nothing happened
  build tiny
  # wait_steps FILE N PID: until the metrics FILE of the run PID shows N
  # steps (polled every 50 ms, at most 60 s)
  wait_steps() {
    i=0
    while [ "$(if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi)" -lt "$2" ]; do
      kill -0 "$3" 2>/dev/null || fail "the run ended before the signal"
      i=$((i + 1)); [ $i -le 1200 ] || { kill -KILL "$3"; fail "no $2 steps in 60 s"; }
      sleep 0.05
    done
  }
  # ends PID: waits for the run PID to end (at most 60 s: a hang is killed
  # and fails the test); its status in rc
  ends() {
    i=0
    while kill -0 "$1" 2>/dev/null; do
      i=$((i + 1)); [ $i -le 1200 ] || { pkill -KILL -P "$1"; kill -KILL "$1"; fail "the run hangs after the signal"; }
      sleep 0.05
    done
    wait "$1"; rc=$?
  }
  ./tiny --steps 1000000 --checkpoint ck --checkpoint-every 1000000 --metrics m.jsonl --quiet >out.txt 2>err.txt &
  pid=$!
  wait_steps m.jsonl 5 $pid
  kill -TERM $pid; ends $pid
  [ $rc = 143 ] || fail "exit status $rc after SIGTERM, not 143: $(cat err.txt)"
  n=$(sed -n 's/^stopped by SIGTERM after step \([0-9]*\); checkpoint saved in ck (resume with --resume)$/\1/p' out.txt)
  [ -n "$n" ] || fail "no message on stdout: $(cat out.txt)"
  [ -s err.txt ] && fail "something on stderr: $(cat err.txt)"
  grep -q "\"step\": $n," ck/MANIFEST.json || fail "the checkpoint is not at step $n: $(grep '"step"' ck/MANIFEST.json)"
  field step m.jsonl > got.txt; seq 1 "$n" > want.txt
  cmp -s got.txt want.txt || fail "the metrics do not hold steps 1..$n: $(wc -l < m.jsonl) lines"
  ./tiny --steps $((n + 3)) --checkpoint ck --resume --metrics m.jsonl --quiet || fail "resume after SIGTERM"
  ./tiny --steps $((n + 3)) --metrics full.jsonl --quiet || fail "uninterrupted run"
  field loss full.jsonl > want.txt; field loss m.jsonl > got.txt
  cmp -s want.txt got.txt || fail "after SIGTERM and --resume the losses differ from an uninterrupted run's"
  # without a checkpoint: said so
  ./tiny --steps 1000000 --metrics n.jsonl >out.txt 2>&1 &
  pid=$!
  wait_steps n.jsonl 2 $pid
  kill -TERM $pid; ends $pid
  [ $rc = 143 ] || fail "without a checkpoint: exit status $rc, not 143"
  grep -q "^stopped by SIGTERM after step [0-9]*; no checkpoint saved (none is configured: --checkpoint DIR)$" out.txt ||
    fail "without a checkpoint: $(tail -2 out.txt)"
  # under mpirun, a SIGTERM that reaches one rank only: both stop after the
  # same step and the checkpoint there is whole
  if command -v mpirun >/dev/null 2>&1 && command -v pgrep >/dev/null 2>&1; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
    rm -rf ck m.jsonl
    mpirun --oversubscribe -np 2 ./tiny --steps 1000000 --checkpoint ck --checkpoint-every 1000000 \
      --metrics m.jsonl --quiet >out.txt 2>&1 &
    pid=$!
    wait_steps m.jsonl 5 $pid
    rank=$(pgrep -P $pid | tail -1)
    [ -n "$rank" ] || { kill -KILL $pid; fail "no rank process under mpirun"; }
    kill -TERM "$rank"; ends $pid
    n=$(sed -n 's/^stopped by SIGTERM after step \([0-9]*\); checkpoint saved in ck (resume with --resume)$/\1/p' out.txt)
    [ -n "$n" ] || fail "-np 2, SIGTERM to one rank: no message: $(cat out.txt)"
    grep -q "Exit code: *143" out.txt || fail "-np 2: the rank's status is not 143: $(cat out.txt)"
    grep -q "\"step\": $n," ck/MANIFEST.json || fail "-np 2: the checkpoint is not at step $n"
    field step m.jsonl > got.txt; seq 1 "$n" > want.txt
    cmp -s got.txt want.txt || fail "-np 2: the metrics do not hold steps 1..$n"
    mpirun --oversubscribe -np 2 ./tiny --steps $((n + 2)) --checkpoint ck --resume --metrics m.jsonl --quiet ||
      fail "-np 2: resume after SIGTERM"
    field step m.jsonl > got.txt; seq 1 $((n + 2)) > want.txt
    cmp -s got.txt want.txt || fail "-np 2: after the resume the metrics do not hold steps 1..$((n + 2))"
    echo "ok: -np 2, SIGTERM to one rank: both stopped after step $n, checkpoint there, resumed"
  fi
  echo "ok: SIGTERM stops after step $n with a checkpoint there; --resume continues bit for bit" ;;

routing_trace)
  # --routing-trace (issue 16): rank 0 writes a line per step per MoE layer
  # with the global load (the metrics' expert_load), dropped, entropy (and a
  # sigmoid gate's bias); a resume keeps the lines up to the checkpoint and
  # appends, as the metrics; two ranks give one rank's trace. A dropless tiny
  # (capacity_factor = 0): its layers' outputs do not depend on how the
  # tokens are split over ranks.
  command -v python3 >/dev/null 2>&1 || { echo "SKIP: no python3 to read the JSON"; exit 77; }
  sed 's/top_k = 2;/top_k = 2; capacity_factor = 0;/' "$src/examples/tiny.moe" > dl.moe
  "$moec" build dl.moe -o dl >/dev/null || fail "moec build dl.moe"
  build tiny
  # check TRACE METRICS FIRST LAST CLAIMS [BIASED]: TRACE holds steps
  # FIRST..LAST, each once, one line per MoE layer in the metrics' order, with
  # the metrics' load, CLAIMS claims a step (tokens x ranks x top_k), entropy
  # in [0, ln E] (and not 0 everywhere), dropped in [0, 1] whose mean over the
  # claims of the layers is the metrics' dropped, and E biases for the layers
  # named in BIASED (sigmoid gates; comma-separated), none for the others
  check() {
    python3 - "$@" <<'PY' || fail "the routing trace $1 is not as it should be (above)"
import json, math, sys
trace, metrics, first, last, claims = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
biased = set(sys.argv[6].split(",")) if len(sys.argv) > 6 else set()
loads = {}
for line in open(metrics):
    m = json.loads(line)
    if "expert_load" in m:
        loads[m["step"]] = m["expert_load"]
layers = list(loads[first])
lines = [json.loads(l) for l in open(trace)]
want = [(s, l) for s in range(first, last + 1) for l in layers]
got = [(t["step"], t["layer"]) for t in lines]
assert got == want, f"{trace}: (step, layer) of its lines are {got}, not {want}"
for no, t in enumerate(lines, 1):
    where = f"{trace}:{no}"
    keys = {"step", "layer", "load", "dropped", "entropy"} | ({"bias"} if t["layer"] in biased else set())
    assert set(t) == keys, f"{where}: keys {sorted(t)}, not {sorted(keys)}"
    e = len(loads[t["step"]][t["layer"]])
    assert t["layer"] not in biased or (len(t["bias"]) == e and all(isinstance(b, (int, float)) for b in t["bias"])), \
        f"{where}: bias {t.get('bias')} is not {e} numbers"
    assert t["load"] == loads[t["step"]][t["layer"]], f"{where}: load {t['load']}, metrics {loads[t['step']][t['layer']]}"
    assert len(t["load"]) == e and sum(t["load"]) == claims, f"{where}: load {t['load']} sums to {sum(t['load'])}, not {claims}"
    assert 0 <= t["entropy"] <= math.log(e) + 1e-9, f"{where}: entropy {t['entropy']} outside [0, ln {e}]"
    assert 0 <= t["dropped"] <= 1, f"{where}: dropped {t['dropped']} outside [0, 1]"
assert any(t["entropy"] > 0 for t in lines), f"{trace}: every entropy is 0 (are the gates' entropies taken?)"
dropped = {}
for line in open(metrics):
    m = json.loads(line)
    if "dropped" in m:
        dropped[m["step"]] = m["dropped"]
for s in range(first, last + 1):
    mine = [t for t in lines if t["step"] == s]
    share = sum(t["dropped"] * sum(t["load"]) for t in mine) / sum(sum(t["load"]) for t in mine)
    assert abs(share - dropped[s]) < 1e-12, f"{trace}: step {s}: the layers drop {share} of the claims, the metrics {dropped[s]}"
print(f"{trace}: steps {first}..{last}, {len(layers)} MoE layers, {claims} claims a step")
PY
  }
  V="--variant r=1,d=1,a2a=linear" # fixed variants: a resume is bit for bit
  # evaluations at steps 4 and 8: their forwards must not replace the step's load
  ./dl --steps 8 --eval-every 4 $V --metrics full_m.jsonl --routing-trace full.jsonl --quiet || fail "dl, 8 steps"
  check full.jsonl full_m.jsonl 1 8 512
  grep -v '"dropped": 0,' full.jsonl && fail "a dropless layer dropped claims (above)"
  ./tiny --steps 3 --metrics tm.jsonl --routing-trace tt.jsonl --quiet || fail "tiny, 3 steps"
  check tt.jsonl tm.jsonl 1 3 512
  # a run killed after step 6 (a torn line after it), its checkpoint at step 3
  ./dl --steps 6 --eval-every 4 $V --routing-trace t.jsonl --quiet || fail "dl, 6 steps"
  printf '{"step": 7, "layer": "exp' >> t.jsonl
  ./dl --steps 3 --eval-every 4 $V --checkpoint ck --quiet || fail "dl, 3 steps and a checkpoint"
  cp t.jsonl before.jsonl
  ./dl --steps 8 --eval-every 4 $V --checkpoint ck --resume --metrics m.jsonl --routing-trace t.jsonl --quiet ||
    fail "resumed to step 8"
  head -6 before.jsonl > a.txt; head -6 t.jsonl > b.txt
  cmp -s a.txt b.txt || fail "the resume changed the lines of steps 1..3"
  cmp -s t.jsonl full.jsonl ||
    fail "after --resume the trace is not the uninterrupted run's: steps $(sed 's/^{"step": \([0-9]*\),.*/\1/' t.jsonl | tr '\n' ' ')"
  # sigmoid gates with their balancing add their biases, which move; with a
  # z-loss, the metrics' z_loss and the table's column are there
  sed 's/top_k = 2;/top_k = 2; capacity_factor = 0; gate = sigmoid; bias_update = 0.01; z_loss = 0.001;/' \
    "$src/examples/tiny.moe" > sg.moe
  "$moec" build sg.moe -o sg >/dev/null || fail "moec build sg.moe"
  ./sg --steps 3 --metrics sm.jsonl --routing-trace st.jsonl > out.txt || fail "sigmoid, 3 steps"
  check st.jsonl sm.jsonl 1 3 512 experts_0,experts_1
  grep '"step": 3,' st.jsonl | grep -q '"bias": \[[-0-9.e, ]*[1-9]' || fail "the biases did not move: $(cat st.jsonl)"
  field z_loss sm.jsonl | awk '!($1 > 0) { bad = 1 } END { exit bad || NR != 3 }' ||
    fail "the metrics' z_loss: $(field z_loss sm.jsonl | tr '\n' ' ')"
  grep -q "^   step       loss        aux     z_loss        lr" out.txt || fail "no z_loss column: $(grep step out.txt)"
  # a fresh run starts the file anew
  ./dl --steps 2 $V --routing-trace t.jsonl --quiet || fail "fresh run"
  [ "$(wc -l < t.jsonl)" = 4 ] || fail "a fresh run kept old lines: $(wc -l < t.jsonl) lines"
  ./dl --metrics x.jsonl --routing-trace x.jsonl 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "name the same file" err.txt || fail "one file for both: rc $rc: $(cat err.txt)"
  # a file that cannot be written: said once, nothing run
  ./dl --steps 2 --routing-trace nodir/t.jsonl >out.txt 2>err.txt; rc=$?
  [ $rc = 1 ] && [ "$(grep -c "error: cannot write the routing trace nodir/t.jsonl: No such file or directory" err.txt)" = 1 ] ||
    fail "an unwritable trace: rc $rc: $(cat err.txt)"
  [ -s out.txt ] && fail "an unwritable trace: the run started: $(cat out.txt)"
  # two ranks of half the tokens: the same global batch, the same loads
  if command -v mpirun >/dev/null 2>&1; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
    mpirun --oversubscribe -np 2 ./dl --steps 8 --eval-every 4 --tokens 128 $V --metrics m2.jsonl \
      --routing-trace t2.jsonl --quiet || fail "dl at 2 ranks"
    check t2.jsonl m2.jsonl 1 8 512
    # the same but for the entropies' float sums, taken over other tokens a rank
    python3 - full.jsonl t2.jsonl <<'PY' || fail "2 ranks' trace differs from 1 rank's (above)"
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
assert len(a) == len(b), f"{len(a)} lines at 1 rank, {len(b)} at 2"
for no, (x, y) in enumerate(zip(a, b), 1):
    ent = x.pop("entropy"), y.pop("entropy")
    assert x == y, f"line {no}: 1 rank {x}, 2 ranks {y}"
    assert abs(ent[0] - ent[1]) <= 1e-6 * ent[0], f"line {no}: entropy {ent[0]} at 1 rank, {ent[1]} at 2"
PY
    echo "ok: 2 ranks of 128 tokens: the same trace as 1 rank of 256 (entropies within 1e-6)"
  fi
  echo "ok: a routing trace line per step and MoE layer, with the metrics' load; kept and appended on --resume" ;;

plot_run)
  # tools/plot_run.py: one PNG of a run's metrics and routing trace; bad
  # input is one line naming the file and the line, status 1, no traceback
  py=
  for p in python3 /usr/bin/python3; do
    "$p" -c 'import matplotlib' 2>/dev/null && { py=$p; break; }
  done
  [ -n "$py" ] || { echo "SKIP: no python3 with matplotlib (apt-get install python3-matplotlib)"; exit 77; }
  plot="$src/tools/plot_run.py"
  build tiny
  ./tiny --steps 12 --eval-every 4 --metrics m.jsonl --routing-trace t.jsonl --quiet || fail "tiny, 12 steps"
  # png FILE: a PNG (its signature) of a plausible size, and its width x height
  png() {
    [ "$(od -An -tx1 -N8 "$1" | tr -d ' \n')" = 89504e470d0a1a0a ] || fail "$1 is not a PNG: $(od -c -N8 "$1")"
    size=$(wc -c < "$1")
    [ "$size" -gt 10000 ] && [ "$size" -lt 3000000 ] || fail "$1 is $size bytes"
    # IHDR: width and height, big-endian, at bytes 16 and 20
    od -An -tu1 -j16 -N8 "$1" | awk '{ printf "%d %d\n", $1 * 16777216 + $2 * 65536 + $3 * 256 + $4,
                                                      $5 * 16777216 + $6 * 65536 + $7 * 256 + $8 }'
  }
  "$py" "$plot" m.jsonl --routing t.jsonl -o run.png 2>err.txt || fail "plot_run.py exited $?: $(cat err.txt)"
  [ -s err.txt ] && fail "plot_run.py said: $(cat err.txt)"
  set -- $(png run.png)
  [ "$1" -ge 600 ] && [ "$2" -ge 600 ] || fail "run.png is $1 x $2 pixels: too small for five panels"
  "$py" "$plot" m.jsonl -o plain.png || fail "plot_run.py without --routing exited $?"
  h=$2; set -- $(png plain.png)
  [ "$2" -lt "$h" ] || fail "without --routing the PNG is as tall ($2) as with its heatmaps ($h)"
  # fails FILE... -- PATTERN: plot_run.py on those arguments exits 1 with one
  # line matching PATTERN, no traceback and no PNG
  fails() {
    args=
    while [ "$1" != -- ]; do args="$args $1"; shift; done
    rm -f bad.png
    # shellcheck disable=SC2086
    "$py" "$plot" $args -o bad.png 2>err.txt; rc=$?
    [ $rc = 1 ] || fail "plot_run.py$args exited $rc, not 1: $(cat err.txt)"
    grep -q "Traceback" err.txt && fail "plot_run.py$args: a traceback: $(cat err.txt)"
    [ "$(wc -l < err.txt)" = 1 ] && grep -q "^plot_run.py: error: $2" err.txt || fail "plot_run.py$args said: $(cat err.txt)"
    [ -e bad.png ] && fail "plot_run.py$args wrote a PNG"
    return 0
  }
  sed '5s/"loss": [^,]*,/"loss": oops,/' m.jsonl > bad.jsonl
  fails bad.jsonl -- "bad.jsonl:5: not valid JSON"
  sed '3s/"load": \[[^]]*\]/"load": "many"/' t.jsonl > badt.jsonl
  fails m.jsonl --routing badt.jsonl -- "badt.jsonl:3: \"load\" is not a list of numbers"
  fails missing.jsonl -- "cannot read missing.jsonl: No such file or directory"
  : > empty.jsonl
  fails empty.jsonl -- "empty.jsonl is empty"
  fails t.jsonl -- "t.jsonl:1: a step's line without \"loss\""
  "$py" "$plot" 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "usage: plot_run.py" err.txt || fail "no arguments: rc $rc: $(cat err.txt)"
  echo "ok: plot_run.py writes a $(wc -c < run.png)-byte PNG; bad input is one line naming the file and line" ;;

checkpoint_read)
  build tiny
  ./tiny --steps 3 --checkpoint ck --quiet || fail "run"
  "$moec" plan --json "$src/examples/tiny.moe" > plan.json || fail "moec plan"
  python3 -c 'import safetensors, numpy' 2>/dev/null || { echo "SKIP: python3 safetensors/numpy not installed (pip install safetensors numpy)"; exit 77; }
  python3 - ck/model.safetensors plan.json <<'PY' || fail "safetensors read-back"
import json, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
tensors = load_file(sys.argv[1])
plan = json.load(open(sys.argv[2]))
want = {t["name"]: t["shape"] for l in plan["layers"] for t in l["tensors"]}
assert set(tensors) == set(want), (sorted(tensors), sorted(want))
for name, arr in tensors.items():
    assert list(arr.shape) == want[name], (name, arr.shape, want[name])
    assert arr.dtype == np.float32 and np.isfinite(arr).all(), name
with safe_open(sys.argv[1], "np") as f:
    assert f.metadata()["format"] == "pt", f.metadata()
w = tensors["layernorm_0.weight"] if "layernorm_0.weight" in tensors else tensors[sorted(tensors)[0]]
print("read", len(tensors), "tensors; all shapes as planned; first values", w.ravel()[:3])
PY
  echo "ok: Python's safetensors reads the checkpoint" ;;

checkpoint_corrupt)
  build tiny
  ./tiny --steps 4 --checkpoint ck --quiet || fail "run"
  cp -r ck good
  # refuses DAMAGE: resuming from ck exits 1 with a message that names the file
  # and matches the pattern DAMAGE; a fresh run refuses to overwrite ck; ck's
  # files stay as they were (nothing is lost) and nothing is left beside it
  refuses() {
    sums=$(cksum ck/*)
    ./tiny --steps 8 --checkpoint ck --resume 2>err.txt; rc=$?
    [ $rc = 1 ] || fail "$1: resuming exited $rc, not 1: $(cat err.txt)"
    grep -q "$2" err.txt || fail "$1: the message lacks /$2/: $(cat err.txt)"
    ./tiny --steps 8 --checkpoint ck 2>err2.txt; rc=$?
    [ $rc = 1 ] || fail "$1: a fresh run exited $rc, not 1 (did it overwrite the checkpoint?)"
    grep -q "ck exists but is not a valid checkpoint" err2.txt || fail "$1: unclear: $(cat err2.txt)"
    [ "$(cksum ck/*)" = "$sums" ] || fail "$1: the damaged checkpoint was changed"
    for x in ck.*; do [ -e "$x" ] && fail "$1: $x was left beside the checkpoint"; done
  }
  # flip FILE OFFSET: inverts the byte at OFFSET (it differs whatever it was)
  flip() {
    b=$(od -An -tu1 -j "$2" -N1 "$1" | tr -d ' ')
    [ -n "$b" ] || fail "$1 has no byte $2"
    # shellcheck disable=SC2059
    printf "\\$(printf %o $((b ^ 255)))" | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null
  }
  # the length of a safetensors header: the little-endian u64 of bytes 0..7
  hlen() { od -An -tu8 --endian=little -N8 "$1" | tr -d ' '; }
  # the xxh64 that MANIFEST.json lists for FILE
  listed() { sed -n "s/.*\"name\": \"$1\".*\"xxh64\": \"\([0-9a-f]*\)\".*/\1/p" good/MANIFEST.json; }
  hashed() { echo "\`$1\` has xxh64 [0-9a-f]\{16\} but MANIFEST.json lists $(listed "$1")"; }

  # truncated weights
  head -c 100 good/model.safetensors > ck/model.safetensors
  refuses "truncated" "\`model.safetensors\` is 100 bytes but MANIFEST.json lists [0-9]* (truncated or replaced)"
  # one byte of the optimizer state's JSON header: the hash catches it before
  # the header is parsed
  n=$(hlen good/optimizer.safetensors)
  [ "$n" -gt 200 ] || fail "the optimizer header is $n bytes, too short for the test"
  rm -rf ck && cp -r good ck && flip ck/optimizer.safetensors 200
  refuses "a flipped header byte" "$(hashed optimizer.safetensors)"
  # one byte of the weights' tensor data, which no parser can see: only the hash
  n=$(hlen good/model.safetensors) size=$(wc -c < good/model.safetensors)
  rm -rf ck && cp -r good ck && flip ck/model.safetensors $(((8 + n + size) / 2))
  cmp -s good/model.safetensors ck/model.safetensors && fail "the flip changed nothing"
  refuses "a flipped data byte" "$(hashed model.safetensors)"
  # the manifest's own step, edited: its own hash catches it (issue 17)
  rm -rf ck && cp -r good ck && sed -i 's/^  "step": 4,$/  "step": 2,/' ck/MANIFEST.json
  cmp -s good/MANIFEST.json ck/MANIFEST.json && fail "the edit of the step changed nothing"
  refuses "an edited step" "ck/MANIFEST.json is damaged: its text has xxh64 [0-9a-f]\{16\} but its \`manifest_xxh64\` says"
  # a leftover half-written checkpoint beside a good one changes nothing
  rm -rf ck && cp -r good ck && mkdir ck.tmp-XXXXXX && echo junk > ck.tmp-XXXXXX/model.safetensors
  ./tiny --steps 8 --checkpoint ck --resume --quiet || fail "a leftover temporary directory broke resume"
  # ... and a look-alike without moec's marker is not moec's: it is left alone
  [ "$(cat ck.tmp-XXXXXX/model.safetensors 2>/dev/null)" = junk ] || fail "a ck.tmp-XXXXXX that moec did not make was removed"
  rm -rf ck.tmp-XXXXXX
  echo "ok: truncated checkpoints, flipped bytes (header and data) and an edited step are clear errors and stay untouched" ;;

checkpoint_overwrite)
  # a run without --resume does not replace a valid checkpoint unless told to
  # (--overwrite); refused, it writes nothing (issue 17)
  build tiny
  ./tiny --steps 50 --checkpoint ck --quiet || fail "run"
  sums=$(cksum ck/*)
  ./tiny --steps 20 --checkpoint ck --metrics m.jsonl >out.txt 2>err.txt; rc=$?
  [ $rc = 1 ] || fail "a fresh run over a step-50 checkpoint exited $rc, not 1"
  grep -q "ck holds a checkpoint at step 50, which this run would replace; continue it with --resume, or start over with --overwrite" err.txt ||
    fail "unclear: $(cat err.txt)"
  [ "$(cksum ck/*)" = "$sums" ] || fail "the refused run changed the checkpoint"
  [ -e m.jsonl ] && fail "the refused run wrote its metrics file"
  [ -s out.txt ] && fail "the refused run printed: $(cat out.txt)"
  ./tiny --steps 20 --checkpoint ck --overwrite --quiet || fail "--overwrite exited $?"
  grep -q '"step": 20' ck/MANIFEST.json || fail "--overwrite did not replace the checkpoint"
  ./tiny --steps 30 --checkpoint ck --resume --quiet || fail "--resume exited $?"
  ./tiny --steps 40 --checkpoint ck --resume --overwrite 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "exclude each other" err.txt || fail "--resume --overwrite: rc $rc: $(cat err.txt)"
  ./tiny --steps 5 --checkpoint new --overwrite --quiet || fail "--overwrite without a checkpoint exited $?"
  echo "ok: a step-50 checkpoint is kept until --overwrite; --resume continues it" ;;

config_errors)
  # a configuration error that every rank finds is said once, by rank 0, and
  # the job exits without an abort (issue 17): no "MPI_ABORT was invoked" banner
  command -v mpirun >/dev/null 2>&1 || { echo "skip: no mpirun"; exit 77; }
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
  build tiny
  # once STATUS MESSAGE ARGS...: two ranks of tiny with ARGS exit STATUS, and
  # stderr holds MESSAGE exactly once and nothing of MPI_ABORT
  once() {
    want=$1 msg=$2; shift 2
    mpirun --oversubscribe -np 2 ./tiny --quiet "$@" >out.txt 2>err.txt; rc=$?
    [ $rc = "$want" ] || fail "$*: exit status $rc, not $want: $(cat err.txt)"
    n=$(grep -c -- "$msg" err.txt)
    [ "$n" = 1 ] || fail "$*: the message is there $n times, not once: $(cat err.txt)"
    grep -q "MPI_ABORT" err.txt && fail "$*: the ranks aborted: $(cat err.txt)"
    [ -s out.txt ] && fail "$*: the run started: $(cat out.txt)"
    return 0
  }
  once 2 "bad value 'x' for --steps" --steps x
  once 2 "unknown option '--stpes'" --stpes 3
  once 1 "error: --variant r=7,d=1,a2a=linear: no MoE layer has that variant at 2 ranks" --steps 2 --variant r=7,d=1,a2a=linear
  once 1 "error: cannot save checkpoints in \`nodir/ck\`: its parent directory \`nodir\` does not exist" --steps 2 --checkpoint nodir/ck
  ./tiny --steps 2 --checkpoint ck --quiet || fail "a checkpoint to resume"
  once 1 "error: ck holds a checkpoint at step 2, which this run would replace" --steps 4 --checkpoint ck
  once 1 "error: the checkpoint in ck is at step 2, and --steps 2 is the total to reach" --steps 2 --checkpoint ck --resume
  sed -i 's/^  "step": 2,$/  "step": 1,/' ck/MANIFEST.json
  once 1 "ck/MANIFEST.json is damaged" --steps 4 --checkpoint ck --resume
  once 1 "error: cannot write the metrics file nodir/m.jsonl" --steps 2 --metrics nodir/m.jsonl
  once 1 "error: cannot write the routing trace nodir/t.jsonl" --steps 2 --routing-trace nodir/t.jsonl
  echo "ok: configuration errors under mpirun -np 2: one message, no abort" ;;

diverge)
  # a step whose loss or gradient norm is not finite never reaches the weights,
  # the optimizer state or a checkpoint (issue 17): --on-nan stop (the default)
  # ends the run naming the layer, --on-nan skip goes on without that update
  "$moec" build "$src/tests/model/diverge.moe" -o diverge >/dev/null || fail "moec build diverge"
  # valid_json FILE: every line parses (null, never nan)
  valid_json() {
    python3 -c 'import json, sys; [json.loads(l) for l in open(sys.argv[1])]' "$1" 2>/dev/null ||
      fail "$1 is not valid JSON lines: $(grep -n nan "$1" | head -2)"
  }
  ./diverge --checkpoint ck --checkpoint-every 1 --metrics m.jsonl --quiet >out.txt 2>err.txt; rc=$?
  [ $rc = 1 ] || fail "stop: exit status $rc, not 1: $(cat err.txt)"
  grep -q "error: training diverged at step 2: the loss is NaN and the gradient norm is NaN; the output of layer \`experts_0\` went non-finite first" err.txt ||
    fail "stop: the message does not say the step and the layer: $(cat err.txt)"
  grep -q "the checkpoint in ck stays at step 1, the last one saved" err.txt || fail "stop: no word on the checkpoint: $(cat err.txt)"
  [ "$(field step m.jsonl | tr '\n' ' ')" = "1 2 " ] || fail "stop: the metrics do not hold steps 1 and 2: $(field step m.jsonl)"
  [ "$(field loss m.jsonl | tail -1)" = null ] && [ "$(field grad_norm m.jsonl | tail -1)" = null ] ||
    fail "stop: step 2's loss and gradient norm are not null: $(tail -1 m.jsonl | cut -c1-120)"
  valid_json m.jsonl
  grep -q '"step": 1,' ck/MANIFEST.json || fail "stop: the checkpoint is not at step 1, the last good one: $(grep '"step"' ck/MANIFEST.json)"
  ./diverge --checkpoint ck --resume --steps 1 --quiet 2>err.txt && fail "a checkpoint at step 1 resumed to step 1"
  grep -q "is at step 1, and --steps 1" err.txt || fail "the step-1 checkpoint does not load: $(cat err.txt)"
  # the weights of step 1, from a run that stops there: equal to the kept checkpoint's
  ./diverge --steps 1 --checkpoint good --quiet || fail "a 1-step run"
  cmp -s good/model.safetensors ck/model.safetensors || fail "stop: the kept checkpoint's weights are not step 1's"
  # skip: every step in the metrics, the skipped ones null and counted; the
  # weights and the optimizer state after skipped steps are those before them
  ./diverge --on-nan skip --checkpoint sk --checkpoint-every 1 --metrics s.jsonl >out.txt 2>err.txt ||
    fail "skip: exit status $?: $(cat err.txt)"
  [ "$(field step s.jsonl | tr '\n' ' ')" = "1 2 3 4 " ] || fail "skip: the metrics do not hold steps 1-4: $(field step s.jsonl)"
  [ "$(field skipped s.jsonl | tr '\n' ' ')" = "0 1 2 3 " ] || fail "skip: skipped counts $(field skipped s.jsonl | tr '\n' ' ')"
  [ "$(field loss s.jsonl | tail -1)" = null ] || fail "skip: step 4's loss is not null"
  valid_json s.jsonl
  [ "$(grep -c "warning: step [234]: the loss is NaN.*Its update was skipped (--on-nan skip" err.txt)" = 3 ] ||
    fail "skip: no warning for each skipped step: $(cat err.txt)"
  grep -q "3 steps skipped (non-finite loss or gradient norm)" out.txt || fail "skip: the summary does not count them: $(tail -3 out.txt)"
  grep -q '"step": 4,' sk/MANIFEST.json && grep -q '"skipped_steps": "3"' sk/MANIFEST.json || fail "skip: the checkpoint is not at step 4 with 3 skipped"
  cmp -s good/model.safetensors sk/model.safetensors && cmp -s good/optimizer.safetensors sk/optimizer.safetensors ||
    fail "skip: the weights or the optimizer state changed in skipped steps"
  # a resume keeps counting
  ./diverge --on-nan skip --checkpoint sk --resume --steps 5 --metrics s.jsonl --quiet || fail "skip: resume"
  [ "$(field skipped s.jsonl | tail -1)" = 4 ] || fail "skip: after a resume the count is $(field skipped s.jsonl | tail -1), not 4"
  ./diverge --on-nan maybe 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "bad value 'maybe' for --on-nan (stop or skip)" err.txt || fail "--on-nan maybe: $rc $(cat err.txt)"
  # under mpirun every rank sees the same global loss: one message, no abort
  if command -v mpirun >/dev/null 2>&1; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
    rm -rf ck
    mpirun --oversubscribe -np 2 ./diverge --checkpoint ck --checkpoint-every 1 --quiet >out.txt 2>err.txt; rc=$?
    [ $rc = 1 ] || fail "stop under mpirun: exit status $rc, not 1: $(cat err.txt)"
    [ "$(grep -c "training diverged at step 2" err.txt)" = 1 ] || fail "stop under mpirun: not one message: $(cat err.txt)"
    grep -q "MPI_ABORT" err.txt && fail "stop under mpirun aborts: $(cat err.txt)"
    grep -q '"step": 1,' ck/MANIFEST.json || fail "stop under mpirun: the checkpoint is not at step 1"
  fi
  echo "ok: a diverging run stops naming the layer, or skips the updates; nothing non-finite is saved" ;;

checkpoint_location)
  # a checkpoint location that cannot be written is found before step 1, not at
  # the first save after all the training (issue 17)
  build tiny
  # refused WHAT MESSAGE [PREFIX...]: the run exits 1 before step 1, says MESSAGE
  refused() {
    what=$1 msg=$2; shift 2
    rm -f m.jsonl
    "$@" ./tiny --steps 3 --checkpoint "$what/ck" --metrics m.jsonl >out.txt 2>err.txt; rc=$?
    [ $rc = 1 ] || fail "$what/ck: exited $rc, not 1: $(cat err.txt)"
    grep -q "$msg" err.txt || fail "$what/ck: the message lacks /$msg/: $(cat err.txt)"
    [ -s out.txt ] && fail "$what/ck: the run started before failing: $(cat out.txt)"
    [ -e m.jsonl ] && fail "$what/ck: the run wrote its metrics file"
  }
  refused nodir "cannot save checkpoints in \`nodir/ck\`: its parent directory \`nodir\` does not exist; create it"
  [ -e nodir ] && fail "the run created nodir"
  touch afile
  refused afile "cannot save checkpoints in \`afile/ck\`: \`afile\` is not a directory"
  # a read-only parent: as the user nobody where we are root (permission bits
  # do not stop root), else as ourselves
  mkdir ro && chmod 555 ro
  drop=none
  for way in "" "setpriv --reuid=65534 --regid=65534 --clear-groups"; do
    # shellcheck disable=SC2086 # $way is a command prefix, split on purpose
    if ! $way touch ro/probe 2>/dev/null && $way ./tiny --help >/dev/null 2>&1; then drop=$way; break; fi
  done
  if [ "$drop" = none ]; then
    echo "note: no way to be refused writing a chmod 555 directory here (setpriv missing?); read-only case not run"
  else
    # shellcheck disable=SC2086
    refused ro "cannot save checkpoints in \`ro/ck\`: its parent directory \`ro\` is not writable (Permission denied); make it writable" $drop
  fi
  echo "ok: a missing, non-directory or read-only location is refused before step 1" ;;

checkpoint_lock)
  # two runs on one checkpoint directory: the second is refused at once, naming
  # the first's pid, and the first finishes fine (issue 17)
  build tiny
  ./tiny --steps 600 --checkpoint ck --checkpoint-every 50 --quiet 2>first.txt & first=$!
  i=0
  while [ "$(cat ck.moec-lock 2>/dev/null)" != "$first" ]; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "the first run (pid $first) took no lock in 30 s"
    sleep 0.1
  done
  ./tiny --steps 600 --checkpoint ck --overwrite --quiet 2>err.txt; rc=$?
  kill -0 $first 2>/dev/null || fail "the first run ended before the second was tried (make it longer)"
  [ $rc = 1 ] || fail "the second run exited $rc, not 1: $(cat err.txt)"
  grep -q "checkpoint \`ck\` is in use by another run (pid $first, which holds \`ck.moec-lock\`); wait for it to end" err.txt ||
    fail "unclear: $(cat err.txt)"
  wait $first || fail "the first run failed: $(cat first.txt)"
  grep -q '"step": 600' ck/MANIFEST.json || fail "the first run's checkpoint is not at step 600"
  [ -e ck.moec-lock ] && fail "the lock file was left behind"
  # a lock file nobody holds (its run was killed) is taken over
  echo 99999 > ck.moec-lock
  ./tiny --steps 610 --checkpoint ck --resume --quiet || fail "a stale lock file stopped a run"
  # one held by another program (flock from util-linux) is respected
  if command -v flock >/dev/null; then
    flock ck.moec-lock sh -c 'echo 4242 > ck.moec-lock; sleep 3' & holder=$!
    sleep 1
    ./tiny --steps 620 --checkpoint ck --resume --quiet 2>err.txt && fail "a run ignored a held lock"
    grep -q "pid 4242" err.txt || fail "unclear: $(cat err.txt)"
    wait $holder
  fi
  echo "ok: a second run on ck is refused with the first's pid; the first reaches step 600" ;;

checkpoint_user_dirs)
  # a run never moves, overwrites or removes what it did not create: a user's
  # DIR.old beside a checkpoint stays as it was (issue 17)
  build tiny
  ./tiny --steps 10 --checkpoint good --quiet || fail "run"
  sums() { (cd "$1" && cksum -- * | sort); }
  # results of a user's beside a checkpoint that is replaced twice
  cp -a good s4 && mkdir s4.old && echo data > s4.old/results.csv
  ./tiny --checkpoint s4 --checkpoint-every 10 --steps 30 --overwrite --quiet || fail "s4: exited $?"
  [ "$(cat s4.old/results.csv 2>/dev/null)" = data ] || fail "s4.old/results.csv was removed or changed"
  grep -q '"step": 30' s4/MANIFEST.json || fail "s4 is not at step 30"
  # a user's backup of a checkpoint (mv s1 s1.old), no s1: a fresh run makes s1
  cp -a good s1 && mv s1 s1.old && want=$(sums s1.old)
  ./tiny --checkpoint s1 --checkpoint-every 10 --steps 20 --quiet || fail "s1: exited $?"
  [ "$(sums s1.old)" = "$want" ] || fail "the backup s1.old was moved or changed"
  grep -q '"step": 20' s1/MANIFEST.json || fail "s1 is not at step 20"
  # no s3 and a user's s3.old that is no checkpoint at all
  mkdir s3.old && echo data > s3.old/results.csv
  ./tiny --checkpoint s3 --checkpoint-every 10 --steps 20 --quiet 2>err.txt || fail "s3: exited $?: $(cat err.txt)"
  [ "$(cat s3.old/results.csv 2>/dev/null)" = data ] || fail "s3.old was moved or changed"
  [ "$(ls s3.old)" = results.csv ] || fail "something was written into s3.old: $(ls s3.old)"
  for x in s4.* s1.* s3.*; do
    case $x in s4.old|s1.old|s3.old) ;; *) fail "$x was left beside the checkpoints" ;; esac
  done
  echo "ok: a user's s4.old, s1.old and s3.old are left alone" ;;

bad_input)
  build tiny
  build bytes_small
  ./bytes_small --data /nonexistent/corpus.txt 2>err.txt; rc=$?
  [ $rc = 1 ] && grep -q "cannot open the data file /nonexistent/corpus.txt" err.txt || fail "missing data file: rc $rc: $(cat err.txt)"
  printf 'tiny' > small.txt
  ./bytes_small --data small.txt 2>err.txt; rc=$?
  [ $rc = 1 ] && grep -q "has 4 bytes" err.txt || fail "too-small data file: rc $rc: $(cat err.txt)"
  ./tiny --metrics /nonexistent/dir/m.jsonl 2>err.txt; rc=$?
  [ $rc = 1 ] && grep -q "cannot write the metrics file" err.txt || fail "unwritable metrics: rc $rc: $(cat err.txt)"
  ./tiny --bogus 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "unknown option '--bogus'" err.txt || fail "unknown flag: rc $rc: $(cat err.txt)"
  ./tiny --comm nccl --backend cpu --steps 1 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "\-\-comm nccl needs the cuda backend" err.txt && grep -q "use --comm mpi" err.txt ||
    fail "--comm nccl --backend cpu: rc $rc: $(cat err.txt)"
  for bad in "--steps 0" "--steps abc" "--steps" "--tokens -3" "--backend gpu" "--log-every 0" "--comm gloo"; do
    # shellcheck disable=SC2086
    ./tiny $bad 2>err.txt; rc=$?
    [ $rc = 2 ] || fail "'$bad' exited $rc, not 2"
    grep -q "Try" err.txt || fail "'$bad': no usage hint: $(cat err.txt)"
  done
  # limits said as they are: --tokens's is 32-bit token indices, --generate's 2^20
  ./tiny --tokens 1e11 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "from 1 to 2147483647" err.txt || fail "--tokens 1e11: rc $rc: $(cat err.txt)"
  ./tiny --tokens 2147483648 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "from 1 to 2147483647" err.txt || fail "--tokens 2^31: rc $rc: $(cat err.txt)"
  ./tiny --generate 1048577 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "from 0 to 1048576" err.txt || fail "--generate 2^20 + 1: rc $rc: $(cat err.txt)"
  # a --variant that is not one is a usage error; a well-formed one no layer has is not
  for bad in nonsense a2a=foo r=1,d=1,a2a=foo r=1,d=1 :r=1,d=1,a2a=linear r=-1,d=1,a2a=linear; do
    ./tiny --variant "$bad" --steps 1 2>err.txt; rc=$?
    [ $rc = 2 ] && grep -q "bad value '$bad' for --variant (r=R,d=D,a2a=linear or 2dh" err.txt ||
      fail "--variant $bad: rc $rc: $(cat err.txt)"
  done
  ./tiny --variant r=7,d=1,a2a=linear --steps 1 --backend cpu 2>err.txt; rc=$?
  [ $rc = 1 ] && grep -q "no MoE layer has that variant" err.txt || fail "--variant r=7: rc $rc: $(cat err.txt)"
  ./tiny --variant experts_0:r=1,d=1,a2a=linear --steps 1 --backend cpu --quiet 2>err.txt ||
    fail "a good --variant LAYER:V failed: $(cat err.txt)"
  # the header says who chooses the variants
  ./tiny --variant r=1,d=1,a2a=linear --steps 1 --backend cpu > out.txt 2>&1 || fail "a forced variant failed"
  grep -q "^variants: forced by --variant r=1,d=1,a2a=linear" out.txt || fail "forced, the header says: $(grep '^variants' out.txt)"
  ./tiny --steps 1 --backend cpu > out.txt 2>&1 || fail "a plain run failed"
  grep -q "^variants: chosen each step by measured time" out.txt || fail "the header says: $(grep '^variants' out.txt)"
  ./tiny --steps 3 --metrics out.jsonl extra 2>/dev/null && fail "a stray argument was accepted"
  [ -e out.jsonl ] && fail "a usage error left a metrics file"
  printf 'model d { dim = 8; tokens = 16; ffn f { hidden = 16; } }\ntrain { optimizer = sgd; lr = 1e30; steps = 5; }\n' > diverge.moe
  "$moec" build diverge.moe -o diverge || fail "build diverge"
  ./diverge --quiet 2>err.txt; rc=$?
  [ $rc = 1 ] && grep -q "training diverged" err.txt || fail "NaN loss: rc $rc: $(cat err.txt)"
  echo "ok: bad input gives clear messages and the documented exit status" ;;

inference)
  printf '# inference only\nmodel inf { dim = 32; tokens = 64; moe e { experts = 4; hidden = 64; top_k = 2; capacity_factor = 0; activation = swiglu; } }\n' > inf.moe
  "$moec" build inf.moe -o inf || fail "build"
  ./inf --steps 5 > out.txt || fail "exited $?"
  grep -q "inference: 5 forward steps" out.txt || fail "no inference header: $(cat out.txt)"
  grep -q "ran 5 steps" out.txt || fail "no summary: $(cat out.txt)"
  echo "ok: an inference binary runs forward steps and reports them" ;;

mfu)
  build tiny
  # with a peak: an MFU column, and metrics whose mfu is tflops / peak and tflops is flops / time
  MOEC_PEAK_TFLOPS=0.5 ./tiny --steps 4 --log-every 1 --metrics m.jsonl > out.txt || fail "run with MOEC_PEAK_TFLOPS: exit $?"
  grep -q "TFLOP/s    MFU    ms/step" out.txt || fail "no MFU column: $(cat out.txt)"
  grep -q "MFU: peak 0.5 TFLOP/s per rank, from MOEC_PEAK_TFLOPS" out.txt || fail "the header does not say where the peak comes from"
  [ "$(grep -c '%  *[0-9.]*  *[0-9.]*%' out.txt)" = 4 ] || fail "not 4 rows with an MFU value: $(cat out.txt)"
  "$moec" plan --json "$src/examples/tiny.moe" > plan.json || fail "moec plan"
  flops=$(python3 -c 'import json,sys; f=json.load(open(sys.argv[1]))["flops_per_step"]; print(f["forward"]+f["backward"])' plan.json)
  python3 - m.jsonl "$flops" 0.5 <<'PY' || fail "mfu and tflops of the metrics do not agree with flops / time / peak"
import json, sys
flops, peak = float(sys.argv[2]), float(sys.argv[3])
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 4
for r in rows:
    tf = flops / (r["ms"] / 1e3) / 1e12
    assert abs(r["tflops"] - tf) <= 1e-9 * tf, (r["tflops"], tf)
    assert abs(r["mfu"] - tf / peak) <= 1e-9 * tf / peak, (r["mfu"], tf / peak)
print("mfu of step 1:", rows[0]["mfu"])
PY
  # ... and its table column is the same number, in percent
  awk '$1 ~ /^[0-9]+$/ { print $8 }' out.txt | head -1 > col.txt
  python3 -c 'import json,sys; print("%.1f%%" % (100 * json.loads(open(sys.argv[1]).readline())["mfu"]))' m.jsonl > want.txt
  cmp -s col.txt want.txt || fail "the MFU column says $(cat col.txt), the metrics $(cat want.txt)"
  # without: no column, no mfu key; tflops still there
  ./tiny --steps 2 --log-every 1 --metrics n.jsonl > out2.txt || fail "run without a peak"
  grep -q "MFU" out2.txt && fail "an MFU column on the cpu without MOEC_PEAK_TFLOPS: $(cat out2.txt)"
  grep -q '"mfu"' n.jsonl && fail "mfu in the metrics without a peak"
  grep -q '"tflops"' n.jsonl || fail "no tflops in the metrics"
  MOEC_PEAK_TFLOPS=fast ./tiny --steps 1 2>err.txt; rc=$?
  [ $rc = 2 ] && grep -q "MOEC_PEAK_TFLOPS" err.txt || fail "a bad MOEC_PEAK_TFLOPS: rc $rc: $(cat err.txt)"
  echo "ok: MFU column and metrics with MOEC_PEAK_TFLOPS, none without" ;;

oom_message)
  # the memory check before any allocation, with the device memory faked
  # (MOEC_TEST_DEVICE_MEMORY=FREE,TOTAL bytes; on a GPU it is cuMemGetInfo's)
  build tiny
  MOEC_TEST_DEVICE_MEMORY=79000000000,81000000000 ./tiny --tokens 8000000 --steps 1 >out.txt 2>err.txt; rc=$?
  [ $rc = 1 ] || fail "a plan larger than the device exited $rc, not 1: $(cat err.txt)"
  [ "$(grep -c 'out of GPU memory' err.txt)" = 1 ] || fail "not one message: $(cat err.txt)"
  for w in "on rank 0" "the plan needs [0-9.]* GB on this rank" "saved activations" "79.00 GB free of 81.00 GB" \
           "--tokens N; now 8000000; about" "more ranks" "hidden"; do
    grep -q -- "$w" err.txt || fail "the message lacks '$w': $(cat err.txt)"
  done
  [ -s out.txt ] && fail "something was printed before the failure: $(cat out.txt)"
  MOEC_TEST_DEVICE_MEMORY=79000000000,81000000000 ./tiny --steps 2 --quiet || fail "a plan that fits failed"
  if command -v mpirun >/dev/null 2>&1; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
    # rank 1 short, rank 0 not: every rank stops, rank 1 says why, once
    mpirun --oversubscribe -np 1 ./tiny --steps 2 --quiet : -np 1 -x MOEC_TEST_DEVICE_MEMORY=1000,2000 \
      ./tiny --steps 2 --quiet >out.txt 2>&1 && fail "mpirun succeeded with a rank out of memory"
    [ "$(grep -c 'error: out of GPU memory' out.txt)" = 1 ] || fail "not one message from 2 ranks: $(cat out.txt)"
    grep -q "out of GPU memory on rank 1" out.txt || fail "not rank 1's message: $(cat out.txt)"
    grep -q "MPI_ABORT" out.txt && fail "the ranks were aborted: $(cat out.txt)"
    echo "ok: 2 ranks stop together, one message"
  fi
  echo "ok: a plan larger than the device's free memory fails at start with one clear message" ;;

watchdog)
  # --timeout: a rank that stops (SIGSTOP, as a hung GPU leaves it) ends the
  # job within the timeout plus 30 s, with exit status 3 and a message from a
  # live rank that names the collective, the step and the stopped rank; no
  # process is left behind; a long but healthy step does not fire it (issue 17)
  command -v mpirun >/dev/null 2>&1 || { echo "skip: no mpirun"; exit 77; }
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
  # three experts for three ranks
  printf 'model w3 {\n  dim = 16; tokens = 32; dtype = fp32;\n  repeat 2 { residual { rmsnorm; moe e { experts = 3; hidden = 64; top_k = 2; capacity_factor = 0; } } }\n}\nparallel { adaptive_r = auto; overlap_degree = 1, 2; }\ntrain { steps = 20; optimizer = adam; lr = 3e-3; seed = 2; }\n' > w3.moe
  "$moec" build w3.moe -o w3 >/dev/null 2>&1 || fail "moec build w3"
  exe=$(readlink -f w3)
  # leftovers: the pids of processes of this binary still there; stopped or
  # not, they are woken and killed, and the test fails
  leftovers() {
    left=""
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/exe" 2>/dev/null)" = "$exe" ] && left="$left ${p#/proc/}"
    done
    [ -z "$left" ] && return 0
    # shellcheck disable=SC2086 # a list of pids
    kill -CONT $left 2>/dev/null; kill -KILL $left 2>/dev/null
    fail "processes left behind after the job ended:$left"
  }
  # stopped R: rank R stops at step 3 of a run with --timeout 3
  stopped() {
    t0=$(date +%s)
    timeout -k 5 45 mpirun --oversubscribe -np 3 -x MOEC_TEST_STOP_RANK="$1,3" ./w3 --steps 100000 --timeout 3 \
      --quiet >out.txt 2>err.txt; rc=$?
    took=$(($(date +%s) - t0))
    sleep 1; leftovers
    [ $rc = 124 ] || [ $rc = 137 ] && fail "rank $1 stopped: the job hung (killed by timeout after $took s)"
    [ $rc = 3 ] || fail "rank $1 stopped: exit status $rc, not 3: $(cat err.txt)"
    [ $took -le 33 ] || fail "rank $1 stopped: the job took $took s to end, more than --timeout 3 + 30 s"
    grep -q "error: [a-z_]* at step 3 did not complete in 3 s (--timeout 3): rank $1 did not answer a roll call" err.txt ||
      fail "rank $1 stopped: the message does not name the collective, the step and rank $1: $(cat err.txt)"
    [ "$(grep -c 'did not complete' err.txt)" = 1 ] || fail "rank $1 stopped: not one message: $(cat err.txt)"
    echo "ok: rank $1 stopped at step 3: the job ended in $took s, status 3: $(grep 'did not complete' err.txt)"
  }
  stopped 2
  stopped 0 # the lowest live rank, 1, says it
  # a rank that dies ends the job at once, as before (mpirun sees it go), the
  # watchdog's long default timeout notwithstanding
  mpirun --oversubscribe -np 3 ./w3 --steps 100000 --metrics d.jsonl --quiet >out.txt 2>&1 & job=$!
  i=0
  while [ "$(cat d.jsonl 2>/dev/null | wc -l)" -lt 3 ]; do
    i=$((i + 1)); [ $i -le 600 ] || { kill -KILL $job; fail "no 3 steps in 60 s"; }
    sleep 0.1
  done
  victim=$(for p in /proc/[0-9]*; do [ "$(readlink "$p/exe" 2>/dev/null)" = "$exe" ] && echo "${p#/proc/}"; done | tail -1)
  t0=$(date +%s)
  kill -KILL "$victim"
  i=0
  while kill -0 $job 2>/dev/null; do
    i=$((i + 1)); [ $i -le 300 ] || { kill -KILL $job; leftovers; fail "the job did not end in 30 s after a rank died"; }
    sleep 0.1
  done
  took=$(($(date +%s) - t0))
  wait $job && fail "the job exited 0 after a rank died"
  sleep 1; leftovers
  [ $took -le 5 ] || fail "the job took $took s to end after a rank died"
  echo "ok: a rank killed -9: the job ended in $took s"
  # a step longer than the timeout whose collectives wait little: no alarm
  MOEC_TEST_SLEEP_STEP=2,4 timeout -k 5 60 mpirun --oversubscribe -np 3 -x MOEC_TEST_SLEEP_STEP ./w3 --steps 3 \
    --timeout 2 --quiet 2>err.txt || fail "a healthy 4 s step with --timeout 2 failed: $(cat err.txt)"
  leftovers
  for bad in -1 abc 1.5 31536001; do
    ./w3 --timeout "$bad" --steps 1 2>err.txt; rc=$?
    [ $rc = 2 ] && grep -q "bad value '$bad' for --timeout (whole seconds from 0" err.txt ||
      fail "--timeout $bad: rc $rc: $(cat err.txt)"
  done
  ./w3 --help | grep -q -- "--timeout SECONDS" || fail "--help does not list --timeout"
  echo "ok: a stopped rank ends the job with a message; a long healthy step does not" ;;

soak)
  # 2000 steps at 4 ranks with the variants cycling, checkpoints every 100,
  # the whole job killed (-9) halfway and resumed: memory stays flat after the
  # resume, and the metrics file holds every step 1..2000 once (issue 17).
  # Label slow: a minute or two on 2 cores.
  command -v mpirun >/dev/null 2>&1 || { echo "skip: no mpirun"; exit 77; }
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
  started=$(date +%s)
  printf 'model soak {\n  dim = 64; tokens = 128; dtype = fp32;\n  repeat 2 { residual { rmsnorm; moe e { experts = 4; hidden = 128; top_k = 2; capacity_factor = 0; } } }\n}\nparallel { adaptive_r = auto; overlap_degree = 1, 2; }\ntrain { steps = 2000; optimizer = adam; lr = 1e-3; seed = 3; }\n' > soak.moe
  "$moec" build soak.moe -o soak >/dev/null 2>&1 || fail "moec build soak"
  exe=$(readlink -f soak)
  # the pids of the ranks (processes of this binary)
  ranks() { for p in /proc/[0-9]*; do [ "$(readlink "$p/exe" 2>/dev/null)" = "$exe" ] && echo "${p#/proc/}"; done; }
  # the last step in the metrics file (0 before the first)
  last_step() { s=$(grep -v '"resumed"' m.jsonl 2>/dev/null | tail -1 | sed -n 's/^{"step": \([0-9]*\),.*/\1/p'); echo "${s:-0}"; }
  run="mpirun --oversubscribe -np 4 ./soak --steps 2000 --variant cycle --checkpoint ck --checkpoint-every 100 --metrics m.jsonl --quiet"
  $run >out1.txt 2>&1 & job=$!
  i=0
  while [ "$(last_step)" -lt 1000 ]; do
    kill -0 $job 2>/dev/null || fail "the first run ended before step 1000: $(cat out1.txt)"
    i=$((i + 1)); [ $i -le 6000 ] || { kill -KILL $job; fail "no step 1000 in 10 minutes"; }
    sleep 0.1
  done
  # every rank and mpirun at once, as a node's loss or a scheduler's kill -9 would
  # shellcheck disable=SC2046 # a list of pids
  kill -KILL $job $(ranks) 2>/dev/null
  wait $job 2>/dev/null
  sleep 1
  [ -z "$(ranks)" ] || fail "ranks left after kill -9: $(ranks)"
  killed_at=$(last_step)
  ck=$(sed -n 's/.*"step": \([0-9]*\).*/\1/p' ck/MANIFEST.json | head -1)
  [ -n "$ck" ] && [ "$ck" -ge 900 ] && [ "$ck" -le "$killed_at" ] && [ $((ck % 100)) = 0 ] ||
    fail "after the kill at step $killed_at the checkpoint is at step '$ck'"
  echo "killed at step $killed_at; the checkpoint is at step $ck"
  # the resumed run, its ranks' resident memory (VmRSS) and its peak so far
  # (VmHWM) sampled with the step it was at
  $run --resume >out2.txt 2>&1 & job=$!
  : > rss.txt
  while kill -0 $job 2>/dev/null; do
    step=$(last_step)
    for p in $(ranks); do
      kb=$(sed -n 's/^Vm\(RSS\|HWM\):[^0-9]*\([0-9]*\) kB/\2/p' "/proc/$p/status" 2>/dev/null | tr '\n' ' ')
      [ -n "$kb" ] && echo "$p $step $kb" >> rss.txt
    done
    sleep 0.2
  done
  wait $job || fail "the resumed run exited $?: $(cat out2.txt)"
  # per rank: its peak (VmHWM) at the first sample past the save 100 steps
  # after the resume (a save's buffers come and go: their peak is in both
  # figures, and a leak grows the later one), and at its last sample, which
  # must be near the end; VmRSS's range from there is shown
  # (rss.txt: pid, step, VmHWM, VmRSS in kB, in /proc's order)
  awk -v from=$((ck + 101)) '$2 >= from { if (!($1 in base)) { base[$1] = $3; lo[$1] = $4 }
      if ($4 > hi[$1]) hi[$1] = $4; if ($4 < lo[$1]) lo[$1] = $4; top[$1] = $3; last[$1] = $2 }
    END { n = 0; bad = 0
      for (p in base) { n++; g = (top[p] - base[p]) / base[p]
        printf "rank pid %s: peak %d kB at step %d, %d kB at step %d (%+.2f%%); resident %d to %d kB\n",
               p, base[p], from, top[p], last[p], 100 * g, lo[p], hi[p]
        if (g > 0.02 || last[p] < 1900) bad = 1 }
      exit !(n == 4 && !bad) }' rss.txt ||
    fail "memory grew by more than 2% after the resume, or was not sampled to the end at 4 ranks (rss.txt)"
  grep -v '"resumed"' m.jsonl | sed -n 's/^{"step": \([0-9]*\),.*/\1/p' > got.txt
  seq 1 2000 > want.txt
  cmp -s got.txt want.txt || fail "the metrics do not hold steps 1..2000 once each ($(wc -l < got.txt) lines; $(sort -n got.txt | uniq -d | head -3 | tr '\n' ' ')duplicated)"
  [ -e ck.moec-lock ] && fail "the resumed run left its lock file"
  echo "ok: killed -9 at step $killed_at, resumed from $ck: steps 1..2000 once each, memory flat; $(($(date +%s) - started)) s" ;;

*) echo "unknown mode $mode"; exit 2 ;;
esac

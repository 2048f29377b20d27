#!/bin/sh
# cost_test.sh MODE MOEC SRCDIR WORKDIR [MPIEXEC] — the cost model as a user
# meets it (docs/PLAN.md, "The cost model"). Each MODE is one CTest:
#   golden     `moec plan --json` with a fixed calibration (tests/model/cost/
#              calibration.json) and network, diffed against the golden file
#   speed      `moec plan --ranks 2048 --ranks-per-node 8` answers within a second
#   bad_input  a garbage or missing calibration, a malformed --net, a bad
#              --ranks-per-node: a clear message and a non-zero exit, no crash
#   predicted  select = predicted at 2 ranks (mpirun): every step runs the
#              variant `moec plan` predicts best, and no step explores
#   explore    select = auto at 2 ranks: with the prediction, exploring stops
#              before the candidate predicted far slower (6 steps, not 9)
#   calibrate  ./model --calibrate at 1 rank and at 2 (mpirun): files moec plan
#              reads, the second with the all-to-all's alpha and beta; on the
#              backend a run would take (cuda under tests/emu: emu.calibrate;
#              EXPECT_BACKEND says which)
# Exit 77 means "skipped" (no mpirun), with the reason printed.
set -u
mode=$1 moec=$2 src=$3 work=$4 mpiexec=${5:-mpirun}
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $mode: $*"; exit 1; }
cost=$src/tests/model/cost
net="nvlink=450GB/s,ib=8x400Gb/s,alpha_intra=3us,alpha_inter=10us"
export OPENBLAS_NUM_THREADS=1
# the step at which a metrics file's first selector table appears (exploring ends), or "none"
explored_at() {
  python3 -c 'import json,sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if "selector" in d: print(d["step"]); break
else: print("none")' "$1"
}

case $mode in
golden)
  # run from the source tree, so the calibration's path in the JSON is the same everywhere
  (cd "$src" && "$moec" plan --json --gpu tests/model/cost/calibration.json --net "$net" --ranks 128 \
      --ranks-per-node 8 tests/model/cost/scale.moe) > plan.json || fail "moec plan"
  diff -u "$cost/scale.json" plan.json || fail "the plan's JSON differs from tests/model/cost/scale.json"
  python3 -c 'import json,sys; p = json.load(open(sys.argv[1]))["prediction"]
l = p["layers"][0]; v = {x["name"]: x for x in l["variants"]}
assert l["best"] == min(v, key=lambda n: v[n]["total_ns"]), "best is not the least total"
for x in v.values():
    terms = sum(x[k] for k in x if k.endswith("_ns") and k not in ("total_ns", "a2a_intra_ns", "a2a_inter_ns"))
    assert abs(terms - x["total_ns"]) <= 8, "terms do not add up to the total: %s" % x["name"]' plan.json \
    || fail "the prediction is not consistent"
  echo "ok: the plan's JSON is the golden file's" ;;

speed)
  start=$(date +%s%N)
  "$moec" plan --ranks 2048 --ranks-per-node 8 "$src/bench/scale_gpt.moe" > plan.txt || fail "moec plan"
  "$moec" plan --json --gpu "$cost/calibration.json" --ranks 2048 --ranks-per-node 8 "$src/bench/scale_gpt.moe" \
    > plan.json || fail "moec plan --json"
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  grep -q "best: r=" plan.txt || fail "no best variant in the text"
  [ "$ms" -lt 1000 ] || fail "two plans at 2048 ranks took $ms ms"
  echo "ok: two plans at 2048 ranks in $ms ms" ;;

bad_input)
  spec=$src/examples/tiny.moe
  printf 'garbage' > garbage.json
  "$moec" plan --gpu garbage.json "$spec" > /dev/null 2> err.txt; rc=$?
  [ $rc = 1 ] && grep -q "garbage.json:1:[0-9]*: not a calibration (bad JSON" err.txt || fail "garbage calibration: rc $rc, $(cat err.txt)"
  "$moec" plan --gpu missing.json "$spec" > /dev/null 2> err.txt; rc=$?
  [ $rc = 1 ] && grep -q "cannot read the calibration missing.json" err.txt || fail "missing calibration: $(cat err.txt)"
  printf '{"format": "moec-calibration", "version": 1, "dtype_bytes": 4, "launch_s": 1e-6, "gemm": []}' > empty.json
  "$moec" build --gpu empty.json "$spec" -o x > /dev/null 2> err.txt; rc=$?
  [ $rc = 1 ] && grep -q "no .gemm. measurements" err.txt && [ ! -e x ] || fail "empty calibration at build: $(cat err.txt)"
  for bad in "nvlink" "nvlink=fast" "alpha_intra=3" "speed=1GB/s" "overlap=7"; do
    "$moec" plan --net "$bad" "$spec" > /dev/null 2> err.txt; rc=$?
    [ $rc = 2 ] && grep -q "^moec: error: --net" err.txt || fail "--net $bad: rc $rc, $(cat err.txt)"
  done
  sed 's/"a2a": {.*}/"a2a": null/' "$cost/calibration.json" > noa2a.json
  "$moec" plan --gpu noa2a.json --net nvlink=measured "$spec" > /dev/null 2> err.txt; rc=$?
  [ $rc = 2 ] && grep -q "has no all-to-all measurement" err.txt || fail "nvlink=measured without one: $(cat err.txt)"
  "$moec" plan --ranks 6 --ranks-per-node 4 "$spec" > /dev/null 2> err.txt; rc=$?
  [ $rc = 2 ] && grep -q "does not divide" err.txt || fail "--ranks-per-node 4 of 6: $(cat err.txt)"
  sed 's/explore_steps = 2;/explore_steps = 2; select = predicted;/' "$cost/pick.moe" > pred.moe
  "$moec" build --gpu none pred.moe -o pred > /dev/null || fail "moec build --gpu none"
  ./pred --steps 1 > /dev/null 2> err.txt && fail "select = predicted without a calibration ran"
  grep -q "needs a calibration in the binary" err.txt || fail "no clear message: $(cat err.txt)"
  echo "ok: bad calibrations and networks are refused with a message" ;;

predicted)
  command -v "$mpiexec" >/dev/null 2>&1 || { echo "skipped: no $mpiexec"; exit 77; }
  sed 's/explore_steps = 2;/explore_steps = 2; select = predicted;/' "$cost/pick.moe" > pred.moe
  "$moec" build --gpu "$cost/calibration.json" pred.moe -o pred > /dev/null || fail "moec build"
  export MOEC_NET="nvlink=10MB/s"
  best=$("$moec" plan --json --gpu "$cost/calibration.json" --net "$MOEC_NET" --ranks 2 pred.moe |
         python3 -c 'import json,sys; print(json.load(sys.stdin)["prediction"]["layers"][0]["best"])')
  "$mpiexec" -np 2 -x MOEC_NET ./pred --steps 5 --metrics m.jsonl > out.txt || fail "the run failed"
  grep -q "predicted by the cost model" out.txt || fail "the header does not say predicted: $(grep ^variants out.txt)"
  ran=$(python3 -c 'import json,sys; print(" ".join(sorted({json.loads(l)["variants"]["experts"] for l in open(sys.argv[1])})))' m.jsonl)
  [ "$ran" = "$best" ] || fail "the steps ran '$ran', and the predicted best is $best"
  [ "$(explored_at m.jsonl)" = none ] || fail "select = predicted explored"
  echo "ok: every step ran the predicted best, $best, and none explored" ;;

explore)
  command -v "$mpiexec" >/dev/null 2>&1 || { echo "skipped: no $mpiexec"; exit 77; }
  "$moec" build --gpu "$cost/calibration.json" "$cost/pick.moe" -o with > /dev/null || fail "moec build"
  "$moec" build --gpu none "$cost/pick.moe" -o without > /dev/null || fail "moec build --gpu none"
  export MOEC_NET="nvlink=10MB/s"
  "$mpiexec" -np 2 -x MOEC_NET ./with --steps 10 --metrics with.jsonl --quiet || fail "the run with the prediction failed"
  "$mpiexec" -np 2 -x MOEC_NET ./without --steps 10 --metrics without.jsonl --quiet || fail "the run without failed"
  a=$(explored_at with.jsonl) b=$(explored_at without.jsonl)
  # 3 candidates, a warm-up and explore_steps = 2 runs each: 9 steps without;
  # with, the 2 r = 1 candidates (6 steps), r = 0 predicted > 1.5x the best
  [ "$b" = 9 ] || fail "without the prediction exploring ended at step $b, not 9"
  [ "$a" = 6 ] || fail "with the prediction exploring ended at step $a, not 6"
  python3 -c 'import json,sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d["step"] <= 6: assert d["variants"]["experts"] != "r=0,d=1,a2a=linear", "r=0 explored at step %d" % d["step"]
    if "selector" in d: assert "predicted_ms" in d["selector"]["experts"], "no predicted_ms"' with.jsonl ||
    fail "the pruned candidate ran"
  echo "ok: exploring took $a steps with the prediction, $b without" ;;

calibrate)
  command -v "$mpiexec" >/dev/null 2>&1 || { echo "skipped: no $mpiexec"; exit 77; }
  want=${EXPECT_BACKEND:-cpu}
  "$moec" build --gpu none "$cost/pick.moe" -o pick > /dev/null || fail "moec build"
  ./pick --calibrate c1.json > out.txt || fail "--calibrate failed"
  grep -q "written to c1.json" out.txt || fail "no word of the file written: $(cat out.txt)"
  "$mpiexec" -np 2 ./pick --calibrate c2.json --quiet || fail "--calibrate at 2 ranks failed"
  python3 -c 'import json,sys
for f, ranks in (("c1.json", 0), ("c2.json", 2)):
    c = json.load(open(f))
    assert c["backend"] == sys.argv[1], "%s: backend %s, not %s" % (f, c["backend"], sys.argv[1])
    kinds = {p["kind"] for p in c["gemm"]}
    assert kinds == {"nn", "tn", "nt"}, "%s: GEMM kinds %s" % (f, kinds)
    assert all(p["flops_per_s"] > 0 for p in c["gemm"]) and all(v > 0 for v in c["bandwidth"].values()), f
    if ranks: assert c["a2a"] and c["a2a"]["ranks"] == 2 and c["a2a"]["beta_bytes_per_s"] > 0, "%s: a2a %s" % (f, c["a2a"])
    else: assert c["a2a"] is None, "c1.json: an all-to-all at one rank"' "$want" || fail "the calibrations are wrong"
  "$moec" plan --gpu c1.json --ranks 2 "$cost/pick.moe" | grep -q "best: r=" || fail "moec plan cannot use c1.json"
  "$moec" plan --gpu c2.json --net nvlink=measured,alpha_intra=measured --ranks 2 "$cost/pick.moe" |
    grep -q "best: r=" || fail "moec plan cannot use c2.json's all-to-all"
  echo "ok: calibrations of the $want backend at 1 and 2 ranks, read by moec plan" ;;

*) fail "unknown mode" ;;
esac

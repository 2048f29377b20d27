#!/bin/sh
# balance_test.sh MOEC SRCDIR WORKDIR — examples/deepseek_v3_like.moe as a user
# trains it: DeepSeek-V3's auxiliary-loss-free balancing must visibly even
# out the experts' load. Two runs of 80 steps on the same bytes, the example
# and the same model with `bias_update = 0`. For each MoE layer, the spread of
# the per-expert load (coefficient of variation, std / mean, over the 32
# experts) averaged over the last 10 steps must be under 3/4 of the first 10
# steps' and under 1/2 of the unbalanced run's last 10 (measured: 0.30 -> 0.15
# with the balancing, 0.55 -> 0.56 and 1.80 without), and the balanced run's
# loss no worse than 1.05 x the other's.
set -u
moec=$1 src=$2 work=$3
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: balance: $*"; exit 1; }
export OPENBLAS_NUM_THREADS=1
corpus=$src/examples/data/corpus.txt
if [ ! -s "$corpus" ]; then # a bare tree (no set-up): a text of its own
  awk 'BEGIN { srand(7); n = split("in the beginning god created heaven and earth was without form void " \
         "darkness upon face of deep spirit moved waters said let there be light", w, " ");
       for (i = 0; i < 40000; i++) printf "%s%s", w[1 + int(rand() * n)], i % 12 == 11 ? "\n" : " " }' > text.txt
  corpus=text.txt
fi
"$moec" build "$src/examples/deepseek_v3_like.moe" -o v3 2>/dev/null >/dev/null || fail "moec build the example"
sed 's/bias_update = [0-9.e-]*;/bias_update = 0;/' "$src/examples/deepseek_v3_like.moe" > flat.moe
grep -q "bias_update = 0;" flat.moe || fail "the example has no bias_update to turn off"
"$moec" build flat.moe -o flat 2>/dev/null >/dev/null || fail "moec build (bias_update = 0)"
./v3 --data "$corpus" --steps 80 --metrics v3.jsonl --quiet || fail "the example's run"
./flat --data "$corpus" --steps 80 --metrics flat.jsonl --quiet || fail "the run without balancing"
python3 - v3.jsonl flat.jsonl <<'PY' || fail "the balancing did not even the load out (above)"
import json, sys
def spreads(path):
    rows = [json.loads(l) for l in open(path) if '"expert_load"' in l]
    out = {}
    for name in rows[0]["expert_load"]:
        cv = []
        for r in rows:
            load = r["expert_load"][name]
            mean = sum(load) / len(load)
            cv.append((sum((x - mean) ** 2 for x in load) / len(load)) ** 0.5 / mean)
        out[name] = (sum(cv[:10]) / 10, sum(cv[-10:]) / 10)
    return out, rows[-1]["loss"]
(bal, lb), (flat, lf) = spreads(sys.argv[1]), spreads(sys.argv[2])
ok = True
for name, (first, last) in bal.items():
    good = last < 0.75 * first and last < 0.5 * flat[name][1]
    ok &= good
    print("%s: load spread %.3f -> %.3f with the balancing; %.3f -> %.3f without  %s"
          % (name, first, last, flat[name][0], flat[name][1], "ok" if good else "FAIL"))
print("loss at the end: %.4f balanced, %.4f not" % (lb, lf))
ok &= lb <= 1.05 * lf
sys.exit(0 if ok else 1)
PY
echo "ok: the bias balancing evens out the experts' load"

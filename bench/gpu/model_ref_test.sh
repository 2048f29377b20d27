#!/bin/sh
# model_ref_test.sh MOEC PYTHON OUTDIR — bench/gpu/model_ref.py on the cpu: a
# model that uses every layer kind and router option the twin has (an n-gram
# embedding with seq, layernorm and rmsnorm, a gelu FFN, causal grouped-query
# attention with rotary positions, bidirectional attention with biases and no
# positions, dropless swiglu and relu experts with and without biases, a
# sigmoid gate with groups, route_scale, a trained balancing bias, a shared
# expert and the z-loss, and fixed, batch-prioritized and dynamic capacities
# that drop a third of the claims) is trained 4 steps by moec, checkpointed,
# and the twin's held-out loss on that checkpoint must be moec's to 1e-6 (it
# agrees to about 1e-7; a wrong rotary sign, group ranking, gate bias, missing
# shared expert, drop order, priority or dynamic cap each moves it 6e-5 or
# more). Then the comparison must fail on a
# loss off by 1e-5, the timing path must train, and a plan the twin cannot
# build must be refused with a message, and session.sh's twin phase must give
# its table on the cpu. Exit 77 when PYTHON has no torch.
set -u
moec=$1 py=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
fail() { echo "FAIL: $*" >&2; exit 1; }
"$py" -c "import torch" 2> /dev/null || { echo "skipped: $py cannot import torch (set MOEC_TORCH_PYTHON)"; exit 77; }
rm -rf "$out" && mkdir -p "$out" && cd "$out" || exit 1
cat "$root"/docs/*.md "$root/README.md" > corpus.txt
cat > twin.moe <<'EOF'
model twin {
  dim = 32; tokens = 256; vocab = 256; context = 2; seq = 64; dtype = fp32;
  residual { layernorm; ffn f { hidden = 64; activation = gelu; } }
  repeat 2 {
    residual { rmsnorm; attention attn { heads = 4; kv_heads = 2; } }
    residual { rmsnorm; moe experts { experts = 4; hidden = 48; top_k = 2; capacity_factor = 0;
                                      activation = swiglu; } }
  }
  residual { rmsnorm; moe router { experts = 8; hidden = 32; top_k = 2; capacity_factor = 0; gate = sigmoid;
                                   groups = 4; top_groups = 2; bias_update = 0.01; shared_experts = 1;
                                   route_scale = 2.0; bias = false; z_loss = 0.001; } }
  residual { rmsnorm; attention bi { heads = 2; head_dim = 8; causal = false; rope = 0; bias = true; } }
  residual { rmsnorm; moe top1 { experts = 4; hidden = 32; top_k = 1; capacity_factor = 0; activation = relu; } }
  residual { rmsnorm; moe fixed { experts = 8; hidden = 64; top_k = 2; capacity_factor = 0.5; } }
  residual { rmsnorm; moe prio { experts = 8; hidden = 64; top_k = 2; capacity_factor = 0.6;
                                 batch_prioritized = true; } }
  residual { rmsnorm; moe dyn { experts = 4; hidden = 64; top_k = 2; capacity_factor = -1.05;
                                activation = swiglu; } }
  rmsnorm;
}
train { steps = 4; optimizer = adam; lr = 1e-2; seed = 3; eval_every = 4; }
EOF
"$moec" plan --json twin.moe > plan.json 2> /dev/null || fail "moec plan"
"$moec" build twin.moe -o model > build.log 2>&1 || fail "moec build: $(tail -n 3 build.log)"
./model --backend cpu --data corpus.txt --checkpoint ck --metrics m.jsonl > run.log 2>&1 || fail "the run: $(tail -n 3 run.log)"
x=$(python3 -c 'import json,sys; r = [json.loads(l) for l in open(sys.argv[1])][-1]
assert r["dropped"] > 0.1, "too few claims dropped to test the capacities: %r" % r["dropped"]
print(repr(r["eval_loss"]))' m.jsonl) || fail "the metrics: no eval_loss, or nothing dropped"
"$py" "$here/model_ref.py" check plan.json --ckpt ck --data corpus.txt --eval-loss "$x" > check.txt 2>&1 \
  || fail "the twin's held-out loss is not moec's: $(cat check.txt)"
cat check.txt
off=$(python3 -c "print(repr($x * (1 + 1e-5)))")
"$py" "$here/model_ref.py" check plan.json --ckpt ck --data corpus.txt --eval-loss "$off" > off.txt 2>&1
[ $? = 1 ] || fail "a loss off by 1e-5 passed the comparison: $(cat off.txt)"
"$py" "$here/model_ref.py" bench plan.json --data corpus.txt --device cpu --steps 3 --warmup 1 --modes eager \
  --json bench.json > bench.txt 2>&1 || fail "the timing path: $(tail -n 3 bench.txt)"
python3 -c 'import json, math, sys
r = json.load(open(sys.argv[1]))
assert r["best_mode"] == "eager" and r["best_ms"] > 0, r
m = r["modes"]["eager"]
assert math.isfinite(m["first_loss"]) and abs(m["first_loss"] - math.log(256)) < 1.5, m' bench.json \
  || fail "the timing path's result: $(cat bench.json)"
"$moec" plan --json "$root/examples/switch8.moe" > noseq.json 2> /dev/null || fail "moec plan switch8"
"$py" "$here/model_ref.py" bench noseq.json --data corpus.txt --device cpu --steps 2 > refused.txt 2>&1
rc=$?
[ $rc = 2 ] && grep -q "needs a model with vocab" refused.txt || fail "a model without vocab: exit $rc, $(cat refused.txt)"
# session.sh's twin phase, on the cpu: the table's row and its same-function check
MOEC_TORCH_PYTHON=$py bash "$here/session.sh" --backend cpu --phases twin --twin "$out/twin.moe" \
  --twin-data "$out/corpus.txt" --steps 4 --warmup 1 --build "$(cd "$(dirname "$moec")/.." && pwd)" \
  --out "$out/session" > session.txt 2>&1 || fail "session.sh's twin phase: $(tail -n 5 session.txt)"
grep -q "^| twin | .* (eager) | .*| [0-9.]*, [0-9.]* ([0-9.e-]*) |$" "$out/session/report.md" \
  || fail "session.sh's twin table: $(grep -A 4 'Whole models' "$out/session/report.md")"
echo "ok: the twin is moec's model"

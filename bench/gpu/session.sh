#!/bin/bash
# session.sh — everything the one-GPU issue checks and measures, in one call on
# the GPU machine (a device session has about 30 minutes, 10 a command): build,
# the `gpu` CTest label, the layer benchmark against PyTorch (and with
# MOEC_CUBLASLT=0), the step time of every example (with CUDA graphs, and
# without them: MOEC_CUDA_GRAPHS=0), the attention kernels against PyTorch's
# scaled_dot_product_attention (attn), the GPT-MoE with attention against the
# n-gram one at the same steps and tokens (gpt; needs examples/data/corpus.txt,
# carried to the machine), and the cost model's calibration of the GPU
# (calibrate: data/calibration/h100.json and the cost model's one-GPU check), and the
# cost of each router option of today's models against the same layer without it
# (routers: bench/gpu/router_bench.sh), and issue 18's references (refs: moec's
# layer on issue 18's seven configurations, SGD and AdamW, against the
# grouped-GEMM PyTorch layer in both precision schemes, the loop layer and the
# roofline; bench/gpu/grouped_ref.py), and whole models against their PyTorch
# twins (twin: bench/gpu/model_ref.py, the same model with SDPA attention and the
# grouped-GEMM MoE in moec's precision scheme, timed in the same call with the
# same-run bf16 GEMM peak). Each phase writes its
# log and its table under --out; report.md gathers them with the command, the
# GPU, the date and the commit, ready for bench/RESULTS.md. A phase that fails
# is recorded and the next one runs; --deadline stops starting phases in time.
#
# usage: bench/gpu/session.sh [options]
#   --out DIR            where logs, tables and report.md go (default: $OUT, else a new /tmp dir)
#   --build DIR          the build tree (default: build); made with RelWithDebInfo when missing
#   --phases "LIST"      of build tests layer layer_blas examples examples_nographs attn gpt calibrate
#                        routers twin refs ab profile (default: all but twin, refs, ab and profile,
#                        in that order; refs needs a call of its own: about 8 minutes; twin about
#                        4; ab about 7; profile, ncu on issue 18's configurations, unknown: try it
#                        with --profile-configs on one first)
#   --profile-configs L  the profile phase's configurations (default issue18)
#   --tests REGEX        ctest -R REGEX within the gpu label (default: every gpu test)
#   --examples "LIST"    example names (default: every examples/*.moe that trains or runs)
#   --steps N            steps an example runs (default 25); --warmup N: not measured (default 5)
#   --ab-base REV        the ab phase: the tree at REV (git archive, built under --out) against this
#                        one, gate and layer time on issue 18's configurations (bench/gpu/gate_bench.sh)
#   --twin "LIST"        specs the twin phase runs (default: examples/gpt_moe.moe examples/gpt_moe_bytes.moe)
#   --twin-data FILE     the bytes they train on (default: each spec's own data)
#   --deadline S         start no phase after S seconds (default 0: none)
#   --backend cpu        run the examples, routers, refs and twin phases on the cpu (to test
#                        this script without a GPU; routers and refs on tiny configs)
# The twin and refs phases run PyTorch with $MOEC_TORCH_PYTHON (default python3).
# Exit: 0 every phase that ran passed, 1 one failed, 2 a usage error.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-} build=$root/build phases="build tests layer layer_blas examples examples_nographs attn gpt calibrate routers" tests_re= examples=
steps=25 warm=5 deadline=0 backend=cuda twin="examples/gpt_moe.moe examples/gpt_moe_bytes.moe" twin_data=
py=${MOEC_TORCH_PYTHON:-python3} ab_base= profile_configs=issue18
usage() { sed -n '2,/^# Exit/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
args="$*"
while [ $# -gt 0 ]; do
  case $1 in
  --out) out=$2; shift ;;
  --build) build=$2; shift ;;
  --phases) phases=$2; shift ;;
  --tests) tests_re=$2; shift ;;
  --examples) examples=$2; shift ;;
  --steps) steps=$2; shift ;;
  --warmup) warm=$2; shift ;;
  --deadline) deadline=$2; shift ;;
  --twin) twin=$2; shift ;;
  --ab-base) ab_base=$2; shift ;;
  --profile-configs) profile_configs=$2; shift ;;
  --twin-data) twin_data=$2; shift ;;
  --backend) backend=$2; shift ;;
  -h|--help) usage ;;
  *) echo "session.sh: unknown option $1" >&2; usage ;;
  esac
  [ $# -gt 0 ] && shift
done
for p in $phases; do
  case $p in build|tests|layer|layer_blas|examples|examples_nographs|attn|gpt|calibrate|routers|twin|refs|ab|profile) ;; *) echo "session.sh: no phase '$p'" >&2; usage ;; esac
done
case $backend in cpu|cuda) ;; *) echo "session.sh: --backend is cuda or cpu" >&2; exit 2 ;; esac
case " $phases " in
*" ab "*) [ -n "$ab_base" ] && git -C "$root" rev-parse --verify -q "$ab_base^{commit}" > /dev/null ||
  { echo "session.sh: the ab phase needs --ab-base REV, a commit of this repository" >&2; exit 2; } ;;
esac
[ "$steps" -gt "$warm" ] 2>/dev/null || { echo "session.sh: --steps must exceed --warmup" >&2; exit 2; }
[ -n "$out" ] || out=$(mktemp -d /tmp/moec-session.XXXXXX)
mkdir -p "$out" || { echo "session.sh: cannot make $out" >&2; exit 1; }
case $build in /*) ;; *) build=$root/$build ;; esac
[ -n "$examples" ] || examples=$(cd "$root/examples" && ls *.moe | sed 's/\.moe$//' | tr '\n' ' ')
# a machine that went cold between calls has no build: make it first
case " $phases " in
*" build "*) ;;
*) [ -x "$build/compiler/moec" ] || { echo "session.sh: no $build/compiler/moec: building first"; phases="build $phases"; } ;;
esac

start=$(date +%s) failed=0
report=$out/report.md
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
{
  echo "# moec on one GPU: session report"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- GPU: ${gpu:-none found}; host: $(nproc) cores"
  echo "- command: \`bench/gpu/session.sh $args\`"
  echo
} > "$report"
elapsed() { echo $(($(date +%s) - start)); }
# phase NAME: false when the deadline has passed (the phase is listed as not run)
phase() {
  if [ "$deadline" -gt 0 ] && [ "$(elapsed)" -ge "$deadline" ]; then
    echo "## $1: not run (the deadline of $deadline s had passed)" >> "$report"
    echo >> "$report"
    return 1
  fi
  echo "== $1 ($(elapsed) s)"
  return 0
}
result() { # NAME RC SECONDS
  echo "- $1: $([ "$2" = 0 ] && echo ok || echo "FAILED (exit $2)"), $3 s" >> "$out/phases.txt"
  [ "$2" = 0 ] || failed=1
}
: > "$out/phases.txt"

for p in $phases; do
  phase "$p" || continue
  t0=$(date +%s)
  case $p in
  build)
    { [ -f "$build/CMakeCache.txt" ] || cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo; } \
      > "$out/build.log" 2>&1 && cmake --build "$build" >> "$out/build.log" 2>&1
    rc=$?
    [ $rc = 0 ] || tail -n 30 "$out/build.log"
    ;;
  tests)
    (cd "$build" && ctest -L gpu --timeout 240 --output-on-failure ${tests_re:+-R "$tests_re"}) > "$out/gpu.log" 2>&1
    rc=$?
    {
      echo "## \`ctest -L gpu\`${tests_re:+ -R $tests_re}"
      echo
      echo '```'
      grep -E "Test +#|tests passed|tests failed" "$out/gpu.log"
      echo '```'
      echo
    } >> "$report"
    grep -E "tests passed|tests failed" "$out/gpu.log"
    ;;
  layer|layer_blas)
    env=()
    [ "$p" = layer_blas ] && env=(MOEC_CUBLASLT=0)
    extra=()
    [ "$p" = layer_blas ] && extra=(--no-torch --no-startup)
    env "${env[@]}" bash "$here/layer_bench.sh" --moec "$build/compiler/moec" --steps 20 --warmup 5 \
      --out "$out/$p" "${extra[@]}" > "$out/$p.md" 2> "$out/$p.err"
    rc=$?
    {
      echo "## Layer benchmark${env:+ with ${env[*]}}"
      echo
      echo "Command: \`${env:+${env[*]} }bash bench/gpu/layer_bench.sh --moec build/compiler/moec --steps 20 --warmup 5${extra:+ ${extra[*]}}\`"
      echo
      cat "$out/$p.md"
      [ $rc = 0 ] || { echo; echo "Failed (exit $rc): $(tail -n 5 "$out/$p.err")"; }
      echo
    } >> "$report"
    ;;
  examples|examples_nographs)
    genv=()
    [ "$p" = examples_nographs ] && genv=(MOEC_CUDA_GRAPHS=0)
    mkdir -p "$out/$p"
    rc=0
    rows=()
    for x in $examples; do
      spec=$root/examples/$x.moe
      [ -f "$spec" ] || { echo "no example $x" >> "$out/$p/errors.txt"; rc=1; continue; }
      bin=$out/$p/$x
      "$build/compiler/moec" build "$spec" -o "$bin" > "$out/$p/$x.build.log" 2>&1 || {
        echo "$x: moec build failed: $(tail -n 3 "$out/$p/$x.build.log")" >> "$out/$p/errors.txt"
        rc=1
        continue
      }
      env "${genv[@]}" timeout 300 "$bin" --backend "$backend" --steps "$steps" --metrics "$out/$p/$x.jsonl" \
        --kernel-cache "$out/kc" --log-every 1000 > "$out/$p/$x.log" 2>&1 || {
        echo "$x: the run failed: $(tail -n 3 "$out/$p/$x.log")" >> "$out/$p/errors.txt"
        rc=1
        continue
      }
      rows+=("$x")
    done
    {
      echo "## Step time of the examples${genv:+ with ${genv[*]}}"
      echo
      echo "Per example: \`build/compiler/moec build examples/X.moe -o X && ${genv:+${genv[*]} }./X --backend $backend --steps $steps" \
           "--metrics X.jsonl\`; the median over steps $((warm + 1))-$steps of the metrics' ms, tflops, mfu and" \
           "update_ms (the header's backend line says what computed in bf16)."
      echo
      python3 - "$out/$p" "$warm" "${rows[@]}" <<'PY'
import json, os, sys
d, warm, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def med(v):
    v = sorted(x for x in v if x is not None)
    return None if not v else (v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)
def f(x, fmt):
    return "-" if x is None else fmt % x
print("| example | backend line | ms / step | model TFLOP/s | MFU | optimizer ms |")
print("|---|---|---:|---:|---:|---:|")
for n in names:
    rows = [json.loads(l) for l in open(os.path.join(d, n + ".jsonl"))]
    rows = [r for r in rows if r.get("step", 0) > warm and "ms" in r]
    head = next((l.strip() for l in open(os.path.join(d, n + ".log")) if l.startswith("backend")), "?")
    mfu = med([r.get("mfu") for r in rows])
    print("| %s | %s | %s | %s | %s | %s |" % (
        n, head.split(",")[0], f(med([r["ms"] for r in rows]), "%.2f"), f(med([r.get("tflops") for r in rows]), "%.1f"),
        f(None if mfu is None else 100 * mfu, "%.1f%%"), f(med([r.get("update_ms") for r in rows]), "%.2f")))
PY
      [ -s "$out/$p/errors.txt" ] && { echo; sed 's/^/- /' "$out/$p/errors.txt"; }
      echo
    } >> "$report"
    ;;
  attn)
    cmake --build "$build" --target attn_bench > "$out/attn_build.log" 2>&1 &&
      python3 "$here/attn_bench.py" --bench "$build/bench/attn_bench" --json "$out/attn.json" > "$out/attn.md" 2>&1
    rc=$?
    { echo "## Attention: moec's kernels against PyTorch's scaled_dot_product_attention"; echo
      echo "Command: \`python3 bench/gpu/attn_bench.py --bench build/bench/attn_bench\`"; echo
      cat "$out/attn.md"; echo; } >> "$report"
    ;;
  gpt)
    # the same steps and tokens: held-out loss of attention + experts against the n-gram model
    rc=0
    mkdir -p "$out/gpt"
    for x in gpt_moe_bytes gpt_moe; do
      "$build/compiler/moec" build "$root/examples/$x.moe" -o "$out/gpt/$x" > "$out/gpt/$x.build.log" 2>&1 &&
        (cd "$root" && timeout 400 "$out/gpt/$x" --backend cuda --metrics "$out/gpt/$x.jsonl" --kernel-cache "$out/kc" \
          --generate 300 --prompt "And it came to pass" > "$out/gpt/$x.log" 2>&1) || { rc=1; tail -n 5 "$out/gpt/$x.log"; }
    done
    { echo "## GPT-MoE with attention against the n-gram GPT-MoE (same steps, tokens, data)"; echo
      echo "Command: \`moec build examples/X.moe -o X && ./X --backend cuda --metrics X.jsonl --generate 300\`"; echo
      for x in gpt_moe_bytes gpt_moe; do
        echo "- $x: last eval_loss $(sed -n 's/.*"eval_loss": \([0-9.]*\).*/\1/p' "$out/gpt/$x.jsonl" | tail -n 1)," \
             "median ms/step $(sed -n 's/.*"ms": \([0-9.]*\).*/\1/p' "$out/gpt/$x.jsonl" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')"
      done
      echo; echo "Sample of gpt_moe:"; echo; echo '```'; sed -n '/^sample/,$p' "$out/gpt/gpt_moe.log"; echo '```'; echo
    } >> "$report"
    ;;
  calibrate)
    (cd "$root" && OUT_DIR="$out/cost" bash bench/cost_gpu.sh "$out/h100.json" "$build") > "$out/calibrate.log" 2>&1
    rc=$?
    { echo "## The cost model: calibration of this GPU and its one-GPU check"; echo
      echo "Command: \`bench/cost_gpu.sh\` (the calibration is $out/h100.json: commit it as data/calibration/h100.json;" \
           "its validation includes the compute terms of issue 18's seven configurations)"; echo
      echo '```'; tail -n 80 "$out/calibrate.log"; echo '```'; echo; } >> "$report"
    ;;
  routers)
    # its own header (command, device, commit) and a table per config; --backend
    # cpu runs it on a tiny config (a test of the phase, not a figure)
    rargs=(--steps 30 --warmup 5)
    [ "$backend" = cpu ] && rargs=(--backend cpu --configs "256,64,128,8,2" --steps "$steps" --warmup "$warm")
    sh "$here/router_bench.sh" --moec "$build/compiler/moec" "${rargs[@]}" --out "$out/routers" \
      > "$out/routers.md" 2> "$out/routers.err"
    rc=$?
    { sed 's/^# /## /' "$out/routers.md"
      [ $rc = 0 ] || { echo; echo "Failed (exit $rc): $(tail -n 5 "$out/routers.err")"; }
      echo; } >> "$report"
    ;;
  twin)
    # Issue 18: each model against its PyTorch twin, both trained $steps steps on
    # the same data in this call; MFU of both against the bf16 GEMM peak measured
    # here (on the cpu: no peak, and the twin runs eager only).
    mkdir -p "$out/twin"
    rc=0 rows=()
    tdev=cuda tmodes=eager,compile peak= tscheme=moec ttol=1e-2
    [ "$backend" = cpu ] && tdev=cpu tmodes=eager tscheme=fp32 ttol=1e-6
    if [ "$backend" = cuda ]; then
      peak=$("$py" -c "import sys; sys.path.insert(0, sys.argv[1]); import torch_ref; print('%.1f' % torch_ref.gemm_peak())" \
        "$here" 2> "$out/twin/peak.err") || { peak=; rc=1; }
    fi
    for spec in $twin; do
      case $spec in /*) ;; *) spec=$root/$spec ;; esac
      x=$(basename "$spec" .moe) d=$out/twin/$x
      mkdir -p "$d"
      dflag=()
      [ -n "$twin_data" ] && dflag=(--data "$twin_data")
      tdata=$twin_data
      [ -n "$tdata" ] || tdata=$(sed -n 's/.*data *= *bytes("\([^"]*\)").*/\1/p' "$spec" | head -n 1)
      case $tdata in /*) ;; *) tdata=$root/$tdata ;; esac
      if ! "$build/compiler/moec" plan --json "$spec" > "$d/plan.json" 2> "$d/build.log" ||
         ! "$build/compiler/moec" build "$spec" -o "$d/model" >> "$d/build.log" 2>&1; then
        echo "$x: moec failed: $(tail -n 3 "$d/build.log")" >> "$out/twin/errors.txt"; rc=1; continue
      fi
      # the held-out loss at the last step and the checkpoint there: the twin's check
      (cd "$root" && timeout 400 "$d/model" --backend "$backend" --steps "$steps" --metrics "$d/moec.jsonl" \
        --kernel-cache "$out/kc" --log-every 1000 --eval-every "$steps" --checkpoint "$d/ck" --overwrite \
        "${dflag[@]}" > "$d/moec.log" 2>&1) || {
        echo "$x: the moec run failed: $(tail -n 3 "$d/moec.log")" >> "$out/twin/errors.txt"; rc=1; continue; }
      "$py" "$here/model_ref.py" bench "$d/plan.json" --data "$tdata" --device $tdev --steps "$steps" --warmup "$warm" \
        --modes $tmodes --json "$d/twin.json" > "$d/twin.txt" 2>&1 || {
        echo "$x: the twin failed: $(tail -n 3 "$d/twin.txt")" >> "$out/twin/errors.txt"; rc=1; continue; }
      ev=$(python3 -c 'import json,sys; print(repr([json.loads(l) for l in open(sys.argv[1])][-1]["eval_loss"]))' \
        "$d/moec.jsonl" 2> /dev/null)
      "$py" "$here/model_ref.py" check "$d/plan.json" --ckpt "$d/ck" --data "$tdata" --eval-loss "${ev:-nan}" \
        --device $tdev --scheme $tscheme --tol $ttol > "$d/check.txt" 2>&1 || {
        echo "$x: the twin's held-out loss on moec's checkpoint is not moec's: $(tail -n 1 "$d/check.txt")" \
          >> "$out/twin/errors.txt"; rc=1; }
      rows+=("$x")
    done
    { echo "## Whole models against their PyTorch twins"; echo
      echo "Per model: \`moec build SPEC -o M && ./M --backend $backend --steps $steps --metrics moec.jsonl\`, then" \
           "\`$py bench/gpu/model_ref.py bench plan.json --device $tdev --steps $steps --warmup $warm --modes $tmodes\`" \
           "on the plan of the same spec (\`moec plan --json SPEC\`). Medians over steps $((warm + 1))-$steps; TFLOP/s" \
           "with the plan's FLOPs for both; MFU against the bf16 GEMM peak measured in this call${peak:+ ($peak TFLOP/s)}." \
           "Same function: moec's held-out loss after the last step against the twin's on moec's checkpoint" \
           "(\`model_ref.py check --scheme $tscheme --device $tdev\`; tolerance $ttol relative)."
      echo
      "$py" - "$out/twin" "$warm" "$peak" "${rows[@]}" <<'PY'
import json, os, sys
d, warm, peak, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
peak = float(peak) if peak else None
def med(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
def mfu(t):
    return "-" if peak is None else "%.1f%%" % (100 * t / peak)
print("| model | moec ms | moec TFLOP/s | moec MFU | twin ms (mode) | twin TFLOP/s | twin MFU | MoE kernel | twin / moec "
      "| held-out loss: moec, twin (difference) |")
print("|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
for n in names:
    plan = json.load(open(os.path.join(d, n, "plan.json")))
    flops = plan["flops_per_step"]["forward"] + plan["flops_per_step"]["backward"]
    rows = [json.loads(l) for l in open(os.path.join(d, n, "moec.jsonl"))]
    ms = med([r["ms"] for r in rows if r.get("step", 0) > warm and "ms" in r])
    t = json.load(open(os.path.join(d, n, "twin.json")))
    tm = t["best_ms"]
    try:
        chk = open(os.path.join(d, n, "check.txt")).read().split()
        same = "%s, %s (%s)" % (chk[chk.index("moec") + 1].rstrip(","), chk[3], chk[chk.index("difference") + 1])
    except (OSError, ValueError, IndexError):
        same = "no check"
    print("| %s | %.2f | %.1f | %s | %.2f (%s) | %.1f | %s | %s | **%.2fx** | %s |" % (
        n, ms, flops / ms / 1e9, mfu(flops / ms / 1e9), tm, t["best_mode"], flops / tm / 1e9, mfu(flops / tm / 1e9),
        t["moe_kernel"], tm / ms, same))
PY
      [ -s "$out/twin/errors.txt" ] && { echo; sed 's/^/- /' "$out/twin/errors.txt"; }
      echo; } >> "$report"
    ;;
  ab)
    # This tree against the one at --ab-base, built here from git archive: the gate's
    # spans (traced) and the layer's time (untraced, with graphs) on issue 18's
    # configurations, each build in turn (bench/gpu/gate_bench.sh; SGD, bf16).
    mkdir -p "$out/ab/src"
    rc=0
    base=$(git -C "$root" rev-parse --short "$ab_base")
    if git -C "$root" archive "$ab_base" | tar -x -C "$out/ab/src" &&
       cmake -S "$out/ab/src" -B "$out/ab/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$out/ab/build.log" 2>&1 &&
       cmake --build "$out/ab/build" >> "$out/ab/build.log" 2>&1; then
      abcfg=$(python3 "$here/layer_bench.py" preset issue18)
      sh "$here/gate_bench.sh" --configs "$abcfg" --steps 20 --warmup 5 --out "$out/ab/runs" \
        "$out/ab/build/compiler/moec" "$build/compiler/moec" > "$out/ab.md" 2> "$out/ab.err" || rc=1
    else
      rc=1
      tail -n 20 "$out/ab/build.log"
    fi
    { echo "## A/B: this tree against $base (issue 18's configurations)"; echo
      echo "Command: \`bash bench/gpu/session.sh --phases ab --ab-base $ab_base\` (the base built from git archive," \
           "then \`bench/gpu/gate_bench.sh --steps 20 --warmup 5 BASE_MOEC THIS_MOEC\` on \`layer_bench.py preset" \
           "issue18\`). The first rows are the base's."; echo
      cat "$out/ab.md"
      [ $rc = 0 ] || { echo; echo "Failed: $(tail -n 5 "$out/ab.err" 2> /dev/null)"; }
      echo; } >> "$report"
    ;;
  profile)
    # Where a layer's step goes, kernel by kernel (ncu, each kernel's time and DRAM
    # bytes), against the copy bandwidth measured here (bench/gpu/kernel_profile.py).
    bw=$("$py" -c "import sys; sys.path.insert(0, sys.argv[1]); import torch_ref; print('%.0f' % torch_ref.copy_bandwidth())" \
      "$here" 2> "$out/profile_bw.err") || bw=
    python3 "$here/kernel_profile.py" run --moec "$build/compiler/moec" --configs "$profile_configs" --steps 2 \
      ${bw:+--copy-gbps "$bw"} --out "$out/profile" > "$out/profile.md" 2> "$out/profile.err"
    rc=$?
    { echo "## Kernel profile: where the layer's step goes"; echo
      echo "Command: \`python3 bench/gpu/kernel_profile.py run --configs \"$profile_configs\" --steps 2${bw:+ --copy-gbps $bw}\`" \
           "(copy bandwidth measured in this call by torch_ref.copy_bandwidth)."; echo
      sed 's/^# /### /' "$out/profile.md"
      [ $rc = 0 ] || { echo; echo "Failed (exit $rc): $(tail -n 5 "$out/profile.err")"; }
      echo; } >> "$report"
    ;;
  refs)
    # Issue 18's table with SGD and AdamW in one call (600 s). torch_ref.py runs once
    # for both optimizers (one torch.compile a config and scheme serves both), then
    # moec's layers with each optimizer, sharing one NVRTC kernel cache.
    # Expected on an H100 (not yet run): the peaks ~10 s; the loop layer, 7 configs x
    # 2 optimizers x 13 steps, ~20 s (the 128- and 64-expert loops are 0.1-0.3 s a
    # step); the grouped layer, 7 configs x 2 schemes, each one torch.compile of
    # forward + backward (guessed 15-30 s cold) and 2 x 13 steps eager and compiled:
    # 200-420 s, so --compile-until 240 starts no compile after 240 s (later configs
    # eager only, their rows say so); moec, 7 configs x 2 optimizers at 12 steps,
    # ~10-15 s each with its NVRTC start: ~150-200 s. About 450-500 s in all; run it
    # alone: --phases refs (after build, in an earlier call or with it cached).
    mkdir -p "$out/refs"
    rc=0 refjson=()
    [ "$backend" = cpu ] && rref=(--device cpu --configs 256,64,128,4,2,1.0 256,64,128,4,2,0,swiglu --modes eager) \
      || rref=(--configs issue18 --compile-until 240)
    if "$py" "$here/torch_ref.py" "${rref[@]}" --optimizers sgd,adam --grouped --warmup 3 --reps 10 \
         --json "$out/refs/torch.json" > "$out/refs/torch.txt" 2>&1; then
      refjson=(--ref-json "$out/refs/torch.json")
    else
      rc=1
      refjson=(--no-torch)
      tail -n 5 "$out/refs/torch.txt"
    fi
    rcfg=(--configs issue18)
    [ "$backend" = cpu ] && rcfg=(--backend cpu --configs "256,64,128,4,2,1.0 256,64,128,4,2,0,swiglu" --grouped --keep-going)
    for o in sgd adam; do
      bash "$here/layer_bench.sh" --moec "$build/compiler/moec" "${rcfg[@]}" --optimizer $o --steps 12 --warmup 3 \
        --no-startup "${refjson[@]}" --kernel-cache "$out/refs/kc" --out "$out/refs/$o" \
        > "$out/refs/$o.md" 2> "$out/refs/$o.err" || rc=1
    done
    { echo "## Issue 18: moec's layer against the grouped-GEMM references and the roofline"; echo
      echo "Commands: \`python3 bench/gpu/torch_ref.py ${rref[*]} --optimizers sgd,adam --grouped --warmup 3 --reps 10" \
           "--json torch.json\`, then for O in sgd, adam: \`bash bench/gpu/layer_bench.sh --moec build/compiler/moec" \
           "${rcfg[*]} --optimizer O --steps 12 --warmup 3 --no-startup --ref-json torch.json\`"; echo
      for o in sgd adam; do
        echo "### $o"; echo
        sed "s/^# /#### /" "$out/refs/$o.md"
        [ -s "$out/refs/$o.err" ] && { echo; echo "stderr: $(tail -n 5 "$out/refs/$o.err")"; }
        echo
      done
      echo "torch_ref.py's own output:"; echo; echo '```'; cat "$out/refs/torch.txt"; echo '```'; echo
    } >> "$report"
    ;;
  esac
  result "$p" "$rc" $(($(date +%s) - t0))
done
{
  echo "## Phases"
  echo
  cat "$out/phases.txt"
  echo "- total: $(elapsed) s"
} >> "$report"
cat "$out/phases.txt"
echo "report: $report"
exit $failed

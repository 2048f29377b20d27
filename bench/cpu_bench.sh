#!/bin/sh
# cpu_bench.sh — what the examples cost on this machine's CPU, against the
# machine's own reference measured in the same run.
#
#   bench/cpu_bench.sh [MOEC]        (or: cmake --build BUILD --target bench-cpu)
#
# MOEC is the moec binary (default: build/compiler/moec); the runtime it links
# into the model binaries is the one of its build tree. Sections (SECTIONS, by
# default all four, in this order):
#   ref    the reference: OpenBLAS cblas_sgemm GFLOP/s on 2048x2048 fp32 matrices
#          (bench/sgemm_ref.c, compiled here with cc -O2 -lopenblas), with
#          OpenBLAS's own threads (one per core) and with OPENBLAS_NUM_THREADS=1.
#          It is measured again before each of the sections below, and each
#          section's fractions use the reference measured just before it.
#   build  `moec build` of every examples/*.moe: BUILD_RUNS timed runs (default
#          7) after one untimed run; median, min and max wall time; and the
#          median of `moec emit` (check, lower, write the C driver) alike: the
#          rest of a build is cc compiling the driver and linking.
#   train  one process per example: REPEATS runs (default 3) of N steps, with
#          --metrics; the step time is the median over the steps after the first
#          WARM (default 2) of all runs, tokens/s likewise; model TFLOP/s from
#          `moec plan --json` (forward + backward FLOPs of the step) over that
#          median, and the table's own TFLOP/s column (median of the same steps);
#          the fraction is against the sgemm reference of the same number of
#          threads. tiny and bytes_small run 30 steps, switch8 and gpt_moe_bytes
#          4, deepseek_like (inference only) 3 forward steps, and is skipped when
#          its planned memory is over half of MemTotal or 80% of MemAvailable.
#          tiny and bytes_small run twice: with OpenBLAS's default threads and
#          with OPENBLAS_NUM_THREADS=1.
#   dist   under mpirun --oversubscribe (OPENBLAS_NUM_THREADS=1, as the tests):
#          tiny.moe at -np 1, 2, 4 with the selector choosing (30 steps), then
#          every candidate variant of `moec plan --ranks W` forced with --variant
#          (20 steps): tiny.moe at -np 2 and 4, at -np 4 with MOEC_LOCAL_SIZE=2
#          (two simulated nodes of 2 ranks: the 2dh variants), and bench/e2.moe
#          (2 experts < 4 ranks: r = 0, 1, 2) at -np 4, plain and with
#          MOEC_LOCAL_SIZE=2.
# and, only when SECTIONS names it:
#   contention  tiny (30 steps) and bytes_small (10 steps), one process, while
#          one busy loop per core holds the machine, with OpenBLAS's default
#          threads and with one: how a loaded machine (a test suite beside the
#          run) changes the step time. The busy loops are this script's own
#          children, ended at the end of the section (or on exit).
# A figure whose per-run medians spread by more than NOISE (default 0.2) of
# their median is measured again, REPEATS more runs, once; the tables mark it.
# Every row carries the 1-minute load average (/proc/loadavg) when it started:
# the machine is shared, and this script's own processes count in it too.
#
# Output: markdown tables on stdout. The raw files (metrics JSONL, tables, plans)
# stay in BENCH_DIR when it is set, else in a temporary directory removed at the
# end. Timings are measurements, never assertions: the script fails only when a
# build or a run fails.
#
# Environment: SECTIONS, BUILD_RUNS, REPEATS, WARM, NOISE, BENCH_DIR,
# MOEC_BUILD_TYPE (printed in the header).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
moec=${1:-$root/build/compiler/moec}
sections=${SECTIONS:-ref build train dist}
build_runs=${BUILD_RUNS:-7}
repeats=${REPEATS:-3}
warm=${WARM:-2}
noise=${NOISE:-0.2}
corpus=$root/examples/data/corpus.txt

die() {
  echo "cpu_bench.sh: $*" >&2
  exit 1
}
[ -x "$moec" ] || die "no moec binary at $moec; build it first or pass its path"
command -v python3 >/dev/null 2>&1 || die "python3 is needed (statistics)"
command -v cc >/dev/null 2>&1 || die "cc is needed (the sgemm reference and moec build)"

# the byte-level examples' text (does nothing when it is there)
sh "$root/tools/make-corpus.sh" >&2 || die "no $corpus: tools/make-corpus.sh failed"

hogs=
tmpdir=
cleanup() {
  [ -z "$hogs" ] || kill $hogs 2>/dev/null || true
  [ -z "$tmpdir" ] || rm -rf "$tmpdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ -n "${BENCH_DIR:-}" ]; then
  dir=$BENCH_DIR
  mkdir -p "$dir"
else
  dir=$(mktemp -d "${TMPDIR:-/tmp}/moec-cpu-bench.XXXXXX")
  tmpdir=$dir
fi
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/bin" "$dir/runs" "$dir/emit"

has() {
  case " $sections " in *" $1 "*) return 0 ;; esac
  return 1
}
load1() { cut -d' ' -f1 /proc/loadavg; }

# --- statistics (python3) --------------------------------------------------------
cat >"$dir/stats.py" <<'EOF'
import collections, json, re, statistics, subprocess, sys, time

def short(v):  # {"layer": "r=1,d=2,a2a=linear", ...} -> "r1d2L ..."
    out = []
    for name in v.values():
        m = re.match(r"r=(\d+),d=(\d+),a2a=(\w+)", name)
        out.append(f"r{m[1]}d{m[2]}{'H' if m[3] == '2dh' else 'L'}" if m else name)
    return " ".join(out)

def fmt(x, nd=1):
    return f"{x:.{nd}f}"

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "time":  # time N CMD...: wall ms of N runs after one untimed run
    n, argv = int(args[0]), args[1:]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        t.append((time.perf_counter() - t0) * 1e3)
    print(fmt(statistics.median(t)), fmt(min(t)), fmt(max(t)))
elif cmd == "plan":  # plan JSON: flops per rank per step, memory bytes, variants, tokens
    p = json.load(open(args[0]))
    f = p["flops_per_step"]
    moe = [l for l in p["layers"] if l["kind"] == "moe"]
    names = [v["name"] for v in moe[0]["variants"]] if moe else []
    sent = {v["name"]: v["send_bytes"] for v in moe[0]["variants"]} if moe else {}
    if args[1:] == ["flops"]:
        print("%.0f" % (f["forward"] + f["backward"]))
    elif args[1:] == ["mem"]:
        print(sum(p["memory_bytes"].values()))
    elif args[1:] == ["variants"]:
        print(" ".join(names))
    elif args[1:] == ["tokens"]:
        print(p["tokens_per_rank"])
    elif args[1] == "sent":  # bytes one rank sends per step in all MoE layers
        print(sum(next(v["send_bytes"] for v in l["variants"] if v["name"] == args[2]) for l in moe))
elif cmd == "runs":  # runs WARM NOISE FILE...: the step statistics of metrics files
    warm, noise, files = int(args[0]), float(args[1]), args[2:]
    ms, tps, per_run, var = [], [], [], collections.Counter()
    for fn in files:
        rows = [json.loads(l) for l in open(fn) if l.strip()]
        rows = [r for r in rows if "ms" in r and r["step"] > warm]
        if not rows:
            sys.exit(f"{fn}: no step after the first {warm}")
        ms += [r["ms"] for r in rows]
        tps += [r["tokens_per_s"] for r in rows]
        per_run.append(statistics.median(r["ms"] for r in rows))
        var.update(short(r["variants"]) for r in rows)
    med = statistics.median(ms)
    spread = (max(per_run) - min(per_run)) / statistics.median(per_run)
    top, k = var.most_common(1)[0]
    # median ms, runs' medians min and max, median tokens/s, steps, variants, noisy
    print(f"{med:.3f} {min(per_run):.3f} {max(per_run):.3f} {statistics.median(tps):.0f} "
          f"{len(ms)} {int(spread > noise)} {top.replace(' ', '+')} {k}")
elif cmd == "table":  # table WARM FILE...: median of the TFLOP/s column
    warm, vals = int(args[0]), []
    for fn in args[1:]:
        for line in open(fn):
            f = line.split()
            if len(f) >= 9 and f[0].isdigit() and int(f[0]) > warm:
                vals.append(float(f[6]))
    print(f"{statistics.median(vals):.3f}" if vals else "-")
elif cmd == "div":  # div A B [ND]
    a, b = float(args[0]), float(args[1])
    print(fmt(a / b, int(args[2]) if len(args) > 2 else 3))
EOF
st() { python3 "$dir/stats.py" "$@"; }

# --- header ------------------------------------------------------------------------
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
if commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null); then
  commit="commit $commit ($(git -C "$root" status --porcelain --untracked-files=no | wc -l | tr -d ' ') tracked files modified in the work tree)"
else
  commit="not a git checkout"
fi
echo "# moec CPU benchmark"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); $commit; sources $root"
echo "- machine: nproc $(nproc), $cpu, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr)"
echo "- moec: $moec (build type ${MOEC_BUILD_TYPE:-unknown}); cc: $(cc --version | head -n 1)"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- raw files: $dir"
echo

# --- the reference -----------------------------------------------------------------
cc -O2 -o "$dir/bin/sgemm_ref" "$here/sgemm_ref.c" -lopenblas || die "cannot build bench/sgemm_ref.c (libopenblas-dev?)"
ref2=0
ref1=0
reference() { # $1: where; sets ref2 (default threads) and ref1 (one thread), GFLOP/s
  l=$(load1)
  "$dir/bin/sgemm_ref" 2048 9 >"$dir/ref_$1_all.txt"
  OPENBLAS_NUM_THREADS=1 "$dir/bin/sgemm_ref" 2048 9 >"$dir/ref_$1_one.txt"
  ref2=$(awk 'NR == 1 {print $4}' "$dir/ref_$1_all.txt")
  ref1=$(awk 'NR == 1 {print $4}' "$dir/ref_$1_one.txt")
  t2=$(awk 'NR == 1 {print $7}' "$dir/ref_$1_all.txt")
  echo "reference before $1 (load $l): OpenBLAS sgemm 2048^3 fp32, median of 9:" \
       "$ref2 GFLOP/s with $t2 threads ($(awk 'NR == 1 {print $5 "-" $6}' "$dir/ref_$1_all.txt")), $ref1 GFLOP/s with 1" \
       "($(awk 'NR == 1 {print $5 "-" $6}' "$dir/ref_$1_one.txt")); $(sed -n 2p "$dir/ref_$1_all.txt")"
  echo
}
has ref && reference start

# --- moec build --------------------------------------------------------------------
build_all() {
  for spec in "$root"/examples/*.moe "$here/e2.moe"; do
    name=$(basename "$spec" .moe)
    (cd "$root" && "$moec" build "$spec" -o "$dir/bin/$name") || die "moec build $spec failed"
  done
}
if has build; then
  echo "## moec build ($build_runs timed runs after 1 untimed, wall ms; moec emit alone likewise)"
  echo
  echo "| spec | lines | median ms | min ms | max ms | moec emit median ms | load |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for spec in "$root"/examples/*.moe; do
    name=$(basename "$spec" .moe)
    l=$(load1)
    set -- $(cd "$root" && st time "$build_runs" "$moec" build "examples/$name.moe" -o "$dir/bin/$name")
    e=$(cd "$root" && st time "$build_runs" "$moec" emit "examples/$name.moe" -o "$dir/emit/$name" | cut -d' ' -f1)
    echo "| $name.moe | $(wc -l <"$spec" | tr -d ' ') | **$1** | $2 | $3 | $e | $l |"
  done
  echo
fi
build_all

# --- training steps, one process ---------------------------------------------------
# run_train NAME STEPS THREADS(default|1): REPEATS runs (and REPEATS more when
# noisy); prints the table row.
run_train() {
  name=$1 steps=$2 threads=$3
  spec=$root/examples/$name.moe
  data=
  grep -q 'bytes(' "$spec" && data="--data $corpus"
  "$moec" plan --json "$spec" >"$dir/runs/$name.plan.json"
  flops=$(st plan "$dir/runs/$name.plan.json" flops)
  l=$(load1)
  files= logs= i=0 n=$repeats again=0
  while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    m=$dir/runs/$name.t$threads.$i.jsonl
    log=$dir/runs/$name.t$threads.$i.log
    rm -f "$m"
    # in a directory of its own: a spec's checkpoint = "..." is written there
    mkdir -p "$dir/runs/cwd" && rm -rf "$dir/runs/cwd/"*
    if [ "$threads" = 1 ]; then
      (cd "$dir/runs/cwd" && OPENBLAS_NUM_THREADS=1 "$dir/bin/$name" --steps "$steps" --metrics "$m" --log-every 1 $data) >"$log" ||
        die "$name failed (see $log)"
    else
      (cd "$dir/runs/cwd" && "$dir/bin/$name" --steps "$steps" --metrics "$m" --log-every 1 $data) >"$log" ||
        die "$name failed (see $log)"
    fi
    files="$files $m" logs="$logs $log"
    if [ "$i" -eq "$n" ] && [ "$again" -eq 0 ]; then
      set -- $(st runs "$warm" "$noise" $files)
      if [ "$6" -eq 1 ]; then again=1 n=$((n + repeats)); fi
    fi
  done
  rm -rf "$dir/runs/cwd"
  set -- $(st runs "$warm" "$noise" $files)
  ms=$1 lo=$2 hi=$3 tps=$4 nst=$5 var=$(echo "$7" | tr '+' ' ') vk=$8
  tf=$(awk -v f="$flops" -v ms="$ms" 'BEGIN {printf "%.4f", f / (ms / 1e3) / 1e12}')
  tab=$(st table "$warm" $logs)
  if [ "$threads" = 1 ]; then ref=$ref1 th=1; else ref=$ref2 th=$(nproc); fi
  frac=$(awk -v t="$tf" -v r="$ref" 'BEGIN {printf "%.1f%%", 100 * t * 1e3 / r}')
  gf=$(awk -v f="$flops" 'BEGIN {printf "%.1f", f / 1e9}')
  mark=
  [ "$again" -eq 1 ] && mark=" (re-run: noisy)"
  echo "| $name | $th | $i x $steps | $nst | **$ms** | $lo-$hi$mark | $tps | $gf | $tf | $tab | $frac | $var ($vk/$nst) | $l |"
}

if has train; then
  reference train
  echo "## Training step time, one process ($repeats runs; the median over steps > $warm of all runs)"
  echo
  echo "| example | BLAS threads | runs x steps | steps measured | median ms/step | runs' medians ms | tokens/s | model GFLOP/step | model TFLOP/s | table TFLOP/s | of sgemm | variants (steps) | load |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
  run_train tiny 30 default
  run_train tiny 30 1
  run_train bytes_small 30 default
  run_train bytes_small 30 1
  run_train switch8 4 default
  run_train gpt_moe_bytes 4 default
  "$moec" plan --json "$root/examples/deepseek_like.moe" >"$dir/runs/deepseek_like.plan.json"
  need=$(st plan "$dir/runs/deepseek_like.plan.json" mem)
  total=$(awk '/MemTotal/ {print $2 * 1024}' /proc/meminfo)
  avail=$(awk '/MemAvailable/ {print $2 * 1024}' /proc/meminfo)
  if awk -v n="$need" -v t="$total" -v a="$avail" 'BEGIN {exit !(n <= 0.5 * t && n <= 0.8 * a)}'; then
    run_train deepseek_like 3 default
    dsnote="deepseek_like: inference only (forward steps); planned memory $(awk -v n="$need" 'BEGIN {printf "%.2f GB", n / 1e9}'), run"
  else
    dsnote="deepseek_like: SKIPPED, planned memory $(awk -v n="$need" 'BEGIN {printf "%.2f GB", n / 1e9}') is over half of MemTotal or 80% of MemAvailable"
  fi
  echo
  echo "$dsnote; memory available at the time $(awk -v a="$avail" 'BEGIN {printf "%.1f GB", a / 1e9}')."
  echo
fi

# --- distributed -------------------------------------------------------------------
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
# run_dist NAME NP LOCAL(0: none) STEPS VARIANT(auto: the selector)
run_dist() {
  name=$1 np=$2 ls=$3 steps=$4 v=$5
  if [ "$ls" = 0 ]; then envx= lsn=-; else envx="-x MOEC_LOCAL_SIZE=$ls" lsn=$ls; fi
  force=
  [ "$v" = auto ] || force="--variant $v"
  tag=$name.np$np.ls$ls.$(echo "$v" | tr ',=' '__')
  l=$(load1)
  files= i=0 n=$repeats again=0
  while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    m=$dir/runs/$tag.$i.jsonl
    rm -f "$m"
    OPENBLAS_NUM_THREADS=1 mpirun --oversubscribe -np "$np" $envx -x OPENBLAS_NUM_THREADS \
      "$dir/bin/$name" --steps "$steps" --metrics "$m" --quiet $force >"$dir/runs/$tag.$i.log" 2>&1 ||
      die "mpirun -np $np $name $force failed (see $dir/runs/$tag.$i.log)"
    files="$files $m"
    if [ "$i" -eq "$n" ] && [ "$again" -eq 0 ]; then
      set -- $(st runs "$warm" "$noise" $files)
      if [ "$6" -eq 1 ]; then again=1 n=$((n + repeats)); fi
    fi
  done
  set -- $(st runs "$warm" "$noise" $files)
  ms=$1 lo=$2 hi=$3 tps=$4 nst=$5 var=$(echo "$7" | tr '+' ' ') vk=$8
  if [ "$ls" = 0 ]; then
    "$moec" plan --json --ranks "$np" "$spec" >"$dir/runs/$tag.plan.json"
  else
    MOEC_LOCAL_SIZE=$ls "$moec" plan --json --ranks "$np" "$spec" >"$dir/runs/$tag.plan.json"
  fi
  flops=$(st plan "$dir/runs/$tag.plan.json" flops)
  tf=$(awk -v f="$flops" -v w="$np" -v ms="$ms" 'BEGIN {printf "%.4f", f * w / (ms / 1e3) / 1e12}')
  if [ "$np" -ge "$(nproc)" ]; then ref=$ref2; else ref=$ref1; fi
  frac=$(awk -v t="$tf" -v r="$ref" 'BEGIN {printf "%.1f%%", 100 * t * 1e3 / r}')
  sps=$(awk -v ms="$ms" 'BEGIN {printf "%.1f", 1e3 / ms}')
  mark=
  [ "$again" -eq 1 ] && mark=" (re-run: noisy)"
  if [ "$v" = auto ]; then
    echo "| $name | $np | $lsn | selector | $i x $steps | **$ms** | $lo-$hi$mark | $sps | $tps | $tf | $frac | $var ($vk/$nst) | $l |"
  else
    sent=$(st plan "$dir/runs/$tag.plan.json" sent "$v" | awk '{printf "%.0f", $1 / 1e3}')
    echo "| $name | $np | $lsn | $v | $i x $steps | **$ms** | $lo-$hi$mark | $sps | $tps | $tf | $frac | $sent | $l |"
  fi
}
variants_of() { # SPEC NP LOCAL
  if [ "$3" = 0 ]; then
    "$moec" plan --json --ranks "$2" "$1" >"$dir/runs/variants.json"
  else
    MOEC_LOCAL_SIZE=$3 "$moec" plan --json --ranks "$2" "$1" >"$dir/runs/variants.json"
  fi
  st plan "$dir/runs/variants.json" variants
}

if has dist; then
  command -v mpirun >/dev/null 2>&1 || die "mpirun is needed for the dist section"
  reference dist
  spec=$root/examples/tiny.moe
  echo "## Distributed: tiny.moe under the selector (mpirun --oversubscribe, OPENBLAS_NUM_THREADS=1, same tokens per rank)"
  echo
  echo "| spec | ranks | MOEC_LOCAL_SIZE | variant | runs x steps | median ms/step | runs' medians ms | steps/s | tokens/s (all ranks) | model TFLOP/s | of sgemm | variants (steps) | load |"
  echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
  for np in 1 2 4; do run_dist tiny "$np" 0 30 auto; done
  run_dist tiny 4 2 30 auto
  echo
  echo "## Distributed: each variant forced with --variant (20 steps a run)"
  echo
  echo "| spec | ranks | MOEC_LOCAL_SIZE | variant | runs x steps | median ms/step | runs' medians ms | steps/s | tokens/s (all ranks) | model TFLOP/s | of sgemm | kB sent/rank/step (all MoE layers, plan) | load |"
  echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for cfg in "tiny 2 0" "tiny 4 0" "tiny 4 2" "e2 4 0" "e2 4 2"; do
    set -- $cfg
    name=$1 np=$2 ls=$3
    if [ "$name" = e2 ]; then spec=$here/e2.moe; else spec=$root/examples/$name.moe; fi
    for v in $(variants_of "$spec" "$np" "$ls"); do
      run_dist "$name" "$np" "$ls" 20 "$v"
    done
  done
  echo
fi

# --- contention (not in the default SECTIONS) -------------------------------------
if has contention; then
  reference contention
  echo "## Contention: one process while $(nproc) busy loops (sh -c 'while :; do :; done') hold every core"
  echo
  echo "| example | BLAS threads | runs x steps | steps measured | median ms/step | runs' medians ms | tokens/s | model GFLOP/step | model TFLOP/s | table TFLOP/s | of sgemm (unloaded) | variants (steps) | load |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
  k=0
  while [ "$k" -lt "$(nproc)" ]; do
    sh -c 'while :; do :; done' &
    hogs="$hogs $!"
    k=$((k + 1))
  done
  sleep 1
  run_train tiny 30 default
  run_train tiny 30 1
  run_train bytes_small 10 default
  run_train bytes_small 10 1
  kill $hogs
  hogs=
  echo
fi

echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u '+%Y-%m-%d %H:%M UTC')"

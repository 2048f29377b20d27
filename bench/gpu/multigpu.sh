#!/usr/bin/env bash
# multigpu.sh — the multi-GPU issue in one script, on 2, 4 or 8 GPUs of one host,
# one rank per GPU, NCCL, under mpirun. Phases, each selectable and each going on
# when another failed:
#   tests     ctest -L multigpu --output-on-failure in the build tree
#   a2a       build/bench/a2a_bench (if built) at W = 2, 4, 8, and at 8 as two nodes (2dh)
#   adaptive  one MoE layer (T tokens per rank, M, H, k; E = 2, 8, 64; bf16) at each W:
#             every variant (--variant cycle; as two nodes too, MOEC_LOCAL_SIZE = W/2)
#             and select = auto; per-variant step, layer and trace terms; auto / best
#   overlap   --overlap-config at the largest W, d = 1, 2, 4 forced, traced: step time
#             against max(all-to-all, experts), and how much the all-to-all overlaps
#   bytes     a byte-level example made dropless at the largest W and at W = 1 with
#             the same global batch: the loss trajectories compared
# Writes OUT/report.md (for bench/RESULTS.md: command, machine, NCCL, date, commit, a
# section per phase, the time each phase took against its estimate). Run it again
# with other --phases and the same --out: the report holds every phase run there.
# Every run is under `timeout`; NCCL_NVLS_ENABLE=0 reaches every rank (mpirun -x).
#
# usage: bench/gpu/multigpu.sh [options]
#   --build DIR          the build tree: its compiler/moec, bench/a2a_bench, ctest (default: build)
#   --out DIR            specs, binaries, logs, metrics, traces, report.md (default: a new /tmp dir)
#   --export DIR         after each phase, copy report.md, logs.tar.gz and the d = 2 trace
#                        here (3 files; on the device machine: $OUT)
#   --phases "LIST"      of tests a2a adaptive overlap bytes, run in that order (default: all)
#   --deadline S         start no run later than S seconds after the start; a run's timeout
#                        is cut to what is left (the device's limit is 600 s a command)
#   --gpus N             GPUs to use (default: nvidia-smi -L); world sizes above are left out
#   --worlds "2 4 8"     adaptive's world sizes (default: those of 2, 4, 8 that fit)
#   --experts "2 8 64"   adaptive's E              --layer T,M,H,k (default 16384,2048,2048,2)
#   --cycles N           measured steps of each variant (default 5), after --warm-cycles N (2)
#   --auto-steps N       auto's measured steps after its exploration (20), --auto-warm N (2)
#   --two-node-min W     two-node runs at W >= this (default 4: at 2, 2dh is linear's copy)
#   --overlap-config T,M,H,E,k   (default 16384,2048,1024,8,2: all-to-all ~ experts on NVLink)
#   --overlap-steps N    (default 23, the first 3 not measured)
#   --bytes-examples "LIST"  (default "bytes_small gpt_moe_bytes")   --bytes-steps N (200)
#   --backend cpu        tiny configs at -np 2 on the cpu backend and the mpi comm: the whole
#                        pipeline without a GPU (bench.multigpu_cpu); not a measurement
#   --dry-run            print the plan (every run, its estimated time, the phases' sums)
# Exit: 0 when every run of the phases asked for ran and passed, 1 otherwise, 2 usage.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
argv0="bench/gpu/multigpu.sh $*"
die() { echo "multigpu.sh: $*" >&2; exit 1; }
usage() { sed -n '/^# usage/,/^# Exit/s/^# \{0,1\}//p' "$0" >&2; exit 2; }

build=$root/build out= export_dir= phases="tests a2a adaptive overlap bytes" deadline=0 gpus= dry=0
backend=cuda worlds= experts= layer= cycles= warm_cycles= auto_steps= auto_warm= two_node_min=
ocfg= osteps= bex= bsteps=
while [ $# -gt 0 ]; do
  case $1 in
  --build) build=$2; shift ;;
  --out) out=$2; shift ;;
  --export) export_dir=$2; shift ;;
  --phases) phases=$2; shift ;;
  --deadline) deadline=$2; shift ;;
  --gpus) gpus=$2; shift ;;
  --worlds) worlds=$2; shift ;;
  --experts) experts=$2; shift ;;
  --layer) layer=$2; shift ;;
  --cycles) cycles=$2; shift ;;
  --warm-cycles) warm_cycles=$2; shift ;;
  --auto-steps) auto_steps=$2; shift ;;
  --auto-warm) auto_warm=$2; shift ;;
  --two-node-min) two_node_min=$2; shift ;;
  --overlap-config) ocfg=$2; shift ;;
  --overlap-steps) osteps=$2; shift ;;
  --bytes-examples) bex=$2; shift ;;
  --bytes-steps) bsteps=$2; shift ;;
  --backend) backend=$2; shift ;;
  --dry-run) dry=1 ;;
  -h|--help) usage ;;
  *) echo "multigpu.sh: unknown option $1" >&2; usage ;;
  esac
  [ $# -gt 0 ] && shift
done
for p in $phases; do
  case $p in tests|a2a|adaptive|overlap|bytes) ;; *) echo "multigpu.sh: no phase '$p'" >&2; usage ;; esac
done
case $backend in cuda|cpu) ;; *) echo "multigpu.sh: --backend is cuda or cpu" >&2; exit 2 ;; esac
# the defaults: the issue's sizes on GPUs; tiny ones on the cpu (seconds, two ranks)
if [ "$backend" = cuda ]; then
  : "${experts:=2 8 64}" "${layer:=16384,2048,2048,2}" "${cycles:=5}" "${warm_cycles:=2}" "${auto_steps:=20}"
  : "${auto_warm:=2}" "${two_node_min:=4}" "${ocfg:=16384,2048,1024,8,2}" "${osteps:=23}"
  : "${bex:=bytes_small gpt_moe_bytes}" "${bsteps:=200}"
  comm=nccl
else
  : "${experts:=1 2 4}" "${layer:=256,64,128,1}" "${cycles:=2}" "${warm_cycles:=1}" "${auto_steps:=4}"
  : "${auto_warm:=1}" "${two_node_min:=2}" "${ocfg:=512,64,64,2,2}" "${osteps:=6}" "${bex:=bytes_small}"
  : "${bsteps:=12}" "${gpus:=2}"
  comm=mpi
fi
owarm=$(( osteps > 6 ? 3 : 2 ))
explore=3 # the adaptive specs' explore_steps (the language's default)

build=$(cd "$build" 2>/dev/null && pwd) || die "no build tree at $build (cmake -S . -B build && cmake --build build)"
moec=$build/compiler/moec
[ -x "$moec" ] || die "no moec at $moec: build it (cmake --build $build)"
command -v python3 >/dev/null 2>&1 || die "python3 is needed"
mpiexec=${MPIEXEC:-$(command -v mpirun)} || true
[ -n "$mpiexec" ] || die "no mpirun on PATH (or set MPIEXEC)"
# the GPUs a run of W ranks takes: the first W of CUDA_VISIBLE_DEVICES where it is set, else 0..W-1
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then visible=$CUDA_VISIBLE_DEVICES; else visible=$(seq -s, 0 63); fi
if [ -z "$gpus" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU [0-9]'); else gpus=0; fi
  v=$(echo "$visible" | tr ',' '\n' | grep -c '[^ ]')
  [ "$v" -lt "$gpus" ] && gpus=$v
  if [ "$gpus" = 0 ]; then
    [ "$dry" = 1 ] || die "no NVIDIA GPU found (nvidia-smi -L); run on the GPU machine, or --backend cpu, or --dry-run"
    gpus=8
    echo "(no GPU here: the plan is for 8; --gpus N plans for another count)"
  fi
fi
fits=
for w in 2 4 8; do [ "$w" -le "$gpus" ] && fits="$fits $w"; done
[ -n "$fits" ] || die "$gpus GPU(s): the issue needs 2 or more"
wmax=${fits##* }
: "${worlds:=$fits}"
for w in $worlds; do
  [ "$w" -le "$gpus" ] || { echo "multigpu.sh: --worlds: $w ranks need $w GPUs, $gpus found" >&2; exit 2; }
done
[ -n "$out" ] || out=$(mktemp -d /tmp/moec-multigpu.XXXXXX)
mkdir -p "$out" || die "cannot make $out"
out=$(cd "$out" && pwd)
kc=$out/kernel-cache
export NCCL_NVLS_ENABLE=0 # NVLink multicast off: on a shared host it can take every GPU out of service
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
py() { python3 "$here/multigpu.py" "$@"; }
lb() { python3 "$here/layer_bench.py" "$@"; }
t_start=$(date +%s)
elapsed() { echo $(( $(date +%s) - t_start )); }

# --- runs ------------------------------------------------------------------------------------
# A JSON object of KEY VALUE pairs (numbers as numbers, the rest as strings).
jrec() {
  local s="{" sep="" k v
  while [ $# -gt 1 ]; do
    k=$1 v=$2
    shift 2
    if [[ $v =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; then s+="$sep\"$k\": $v"
    else v=${v//\\/\\\\}; v=${v//\"/\\\"}; s+="$sep\"$k\": \"$v\""; fi
    sep=", "
  done
  printf '%s}\n' "$s"
}
rec=()           # fields the next run's record adds (KEY VALUE ...)
phase_est=0 phase_runs=0 phase_bad=0 any_bad=0
# job PHASE ID EST_S SHOWN CMD...: CMD under timeout, its output in OUT/PHASE/ID.log,
# one line in runs.jsonl; returns CMD's status. SHOWN is the command as the report shows it.
job() {
  local phase=$1 id=$2 est=$3 shown=$4
  shift 4
  local log=$out/$phase/$id.log cap rc secs t0
  phase_est=$((phase_est + est))
  phase_runs=$((phase_runs + 1))
  if [ "$dry" = 1 ]; then
    printf '  %-30s ~%5s s  %s\n' "$id" "$est" "$shown"
    rec=()
    return 0
  fi
  cap=$((3 * est + 120))
  [ "$cap" -gt 900 ] && cap=900
  if [ "$deadline" -gt 0 ]; then
    local left=$((deadline - $(elapsed)))
    if [ "$left" -lt 30 ]; then
      jrec phase "$phase" id "$id" w "${w:-0}" rc skipped why "out of time: --deadline $deadline s" \
        secs 0 est "$est" cmd "$shown" "${rec[@]}" >> "$out/runs.jsonl"
      echo "  $id: not run, the --deadline is near"
      phase_bad=$((phase_bad + 1))
      rec=()
      return 1
    fi
    [ "$cap" -gt $((left - 10)) ] && cap=$((left - 10))
  fi
  t0=$(date +%s)
  timeout -k 10 "$cap" "$@" > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  jrec phase "$phase" id "$id" w "${w:-0}" rc "$rc" secs "$secs" est "$est" cap "$cap" cmd "$shown" log "$log" \
    "${rec[@]}" >> "$out/runs.jsonl"
  rec=()
  if [ "$rc" = 0 ]; then
    echo "  $id: ${secs} s (estimated ${est} s)"
  else
    echo "  $id: FAILED (exit $rc$([ "$rc" = 124 ] && echo ', timed out'), ${secs} s): $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-300)"
    phase_bad=$((phase_bad + 1))
  fi
  return "$rc"
}
# mrun PHASE ID EST_S W [VAR=VALUE...] -- BIN ARGS...: BIN under mpirun -np W, on the first
# W GPUs (CUDA_VISIBLE_DEVICES), every variable passed to every rank with -x
mrun() {
  local phase=$1 id=$2 est=$3
  w=$4
  shift 4
  local -a envs=(NCCL_NVLS_ENABLE=0) x=()
  if [ "$backend" = cuda ]; then
    envs+=("CUDA_VISIBLE_DEVICES=$(echo "$visible" | cut -d, -f"1-$w")" NCCL_DEBUG=VERSION)
  else
    envs+=(OPENBLAS_NUM_THREADS=1 OMPI_MCA_mpi_yield_when_idle=1)
  fi
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  local e
  for e in "${envs[@]}"; do x+=(-x "${e%%=*}"); done
  local shown="${envs[*]} mpirun -np $w ${*//$out\//}"
  job "$phase" "$id" "$est" "$shown" env "${envs[@]}" "$mpiexec" --oversubscribe -np "$w" "${x[@]}" "$@"
}
# estimated seconds of a run: its start (CUDA, NCCL at W ranks, kernels from the cache) and steps
est_run() { # W STEPS STEP_MS
  if [ "$backend" = cuda ]; then awk -v w="$1" -v n="$2" -v ms="$3" 'BEGIN { printf "%d", 8 + w / 2 + n * ms / 1e3 + 0.5 }'
  else awk -v w="$1" -v n="$2" -v ms="$3" 'BEGIN { printf "%d", 1 + n * ms / 1e3 + 0.5 }'; fi
}

# --- the report ----------------------------------------------------------------------------------
machine() {
  {
    echo "Commands (in this order, into one --out):"
    echo
    sed 's/^/    /' "$out/commands.txt"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')" \
         "($(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ') tracked files modified)"
    if [ "$backend" = cuda ]; then
      echo "- GPUs: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null |
        sort | uniq -c | sed 's/^ *\([0-9]*\) \(.*\), \(.*\), \(.*\)/\1 x \2 (\3), driver \4/' | paste -sd';' -)"
      local v
      v=$(cat "$out"/*/*.log 2>/dev/null | grep -o -m 1 'NCCL version [^ ]*')
      echo "- NCCL: ${v:-no run printed its version (NCCL_DEBUG=VERSION)}; NCCL_NVLS_ENABLE=0"
    else
      echo "- No GPU: the cpu backend and the mpi comm, tiny configs: a test of this script, not a measurement"
    fi
    echo "- MPI: $("$mpiexec" --version 2>/dev/null | head -n 1); host: $(nproc) cores, $(sed -n 's/^model name\t*: //p' /proc/cpuinfo | head -n 1)"
    if [ "$backend" = cuda ] && nvidia-smi topo -m > "$out/topo.txt" 2>/dev/null; then
      echo
      echo "<details><summary>nvidia-smi topo -m</summary>"
      echo
      sed 's/^/    /' "$out/topo.txt"
      echo "</details>"
    fi
  } > "$out/machine.txt"
}
export_files() {
  [ -n "$export_dir" ] || return 0
  mkdir -p "$export_dir" || { echo "warning: cannot make $export_dir"; return 0; }
  cp "$out/report.md" "$export_dir/report.md"
  # what the report was made of (no binaries, kernels or the adaptive runs' traces)
  (cd "$out" && find . -path ./kernel-cache -prune -o -type f \( -name '*.log' -o -name '*.jsonl' -o -name '*.json' \
     -o -name '*.moe' -o -name '*.tsv' -o -name '*.txt' -o -name '*.md' \) ! -name '*.trace.json' -print |
     tar czf "$export_dir/logs.tar.gz" -T -)
  [ -f "$out/overlap/d2.trace.json" ] && cp "$out/overlap/d2.trace.json" "$export_dir/overlap_d2.trace.json"
  return 0
}
# phase_end NAME: the phase's line of budget.tsv, the report, the export
phase_end() {
  local used=$(( $(date +%s) - phase_t0 )) result=ok
  [ "$phase_bad" -gt 0 ] && result="$phase_bad failed or not run (of $phase_runs runs)"
  [ -n "$phase_note" ] && result="$([ "$result" = ok ] || echo "$result; ")$phase_note"
  if [ "$dry" = 1 ]; then
    echo "  = phase $1: $phase_runs runs, about $phase_est s"
    total_est=$((total_est + phase_est))
    return
  fi
  [ "$phase_bad" -gt 0 ] && any_bad=1
  grep -v "^$1	" "$out/budget.tsv" > "$out/budget.tmp" 2>/dev/null
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$phase_est" "$used" "$phase_runs" "$result" >> "$out/budget.tmp"
  mv "$out/budget.tmp" "$out/budget.tsv"
  machine
  py report "$out" || echo "warning: the report could not be written"
  export_files
  echo "== phase $1: $used s used of an estimated $phase_est s ($result); $(elapsed) s since the start"
}
phase_begin() {
  phase_t0=$(date +%s) phase_est=0 phase_runs=0 phase_bad=0 phase_note=
  echo "== phase $1"
  [ "$dry" = 1 ] && return
  mkdir -p "$out/$1"
  # a phase run again replaces its earlier runs in the report
  [ -f "$out/runs.jsonl" ] && { grep -v "^{\"phase\": \"$1\"," "$out/runs.jsonl" > "$out/runs.tmp"; mv "$out/runs.tmp" "$out/runs.jsonl"; }
}
# a failure outside a run (a spec that does not build): in the budget line and the exit status
phase_fail() {
  phase_note="${phase_note:+$phase_note; }$1"
  phase_bad=$((phase_bad + 1))
  echo "  $1"
  [ "$dry" = 1 ] || jrec phase "$ph" id "$ph" w 0 rc failed why "$1" secs 0 est 0 >> "$out/runs.jsonl"
}
# a phase that cannot run at all: one line of runs.jsonl says why; a failure of the
# script's run unless OPTIONAL is given (a tool of another branch that is not built)
phase_skip() { # PHASE WHY [optional]
  phase_note="skipped: $2"
  [ "${3:-}" = optional ] || phase_bad=$((phase_bad + 1))
  echo "  skipped: $2"
  [ "$dry" = 1 ] || jrec phase "$1" id "$1" w 0 rc skipped why "$2" secs 0 est 0 >> "$out/runs.jsonl"
}

# --- phases --------------------------------------------------------------------------------------
phase_tests() {
  # on the cpu, the tests of tests/multigpu alone (they skip): a ctest of the whole build
  # tree would clobber the log of a ctest that runs this script
  local dir=$build
  [ "$backend" = cpu ] && dir=$build/tests/multigpu
  [ -f "$dir/CTestTestfile.cmake" ] || { phase_skip tests "no CTestTestfile.cmake in $dir"; return; }
  local n
  n=$(cd "$dir" && ctest -N -L multigpu 2>/dev/null | grep -c 'Test *#')
  [ "$backend" = cpu ] && rm -rf "$dir/Testing"
  local each=2
  [ "$backend" = cuda ] && each=20
  w=0 rec=(ctest_dir "$dir")
  job tests ctest $((each * n)) "cd ${dir#"$root"/} && ctest -L multigpu --output-on-failure" \
    sh -c 'cd "$0" && exec ctest -L multigpu --output-on-failure' "$dir"
  # every test's own output, for the report (SKIP messages, the comparisons)
  [ "$dry" = 1 ] || cp "$dir/Testing/Temporary/LastTest.log" "$out/tests/LastTest.log" 2>/dev/null
}
phase_a2a() {
  local bench=$build/bench/a2a_bench
  if [ ! -x "$bench" ]; then
    phase_skip a2a "${bench#"$root"/} is not built (the all-to-all benchmark comes from another branch); nothing measured" optional
    return
  fi
  local w est=5 sizes=()
  [ "$backend" = cuda ] && est=45
  # on the cpu (a test of this script): small sizes, few calls
  [ "$backend" = cpu ] && sizes=(--min 4K --max 64K --iters 2 --warmup 1 --repeats 2)
  for w in $fits; do
    rec=(json "$out/a2a/w$w.json")
    mrun a2a "w$w" "$est" "$w" -- "$bench" --backend "$backend" --comm "$comm" "${sizes[@]}" \
      --json "$out/a2a/w$w.json"
  done
  if [ "$wmax" -ge "$two_node_min" ]; then
    rec=(json "$out/a2a/w${wmax}_2nodes.json" local $((wmax / 2)))
    mrun a2a "w${wmax}_2nodes" "$est" "$wmax" MOEC_LOCAL_SIZE=$((wmax / 2)) -- "$bench" \
      --backend "$backend" --comm "$comm" "${sizes[@]}" --json "$out/a2a/w${wmax}_2nodes.json"
  fi
}
phase_adaptive() {
  local T M H k E w spec bin plan n1 n2 ms steps
  IFS=, read -r T M H k <<< "$layer"
  local par="adaptive_r = auto; overlap_degree = 1, 2, 4; all_to_all = linear, 2dh; select = auto; explore_steps = $explore;"
  local meta=(layer "T = $T per rank, M = $M, H = $H, k = $k, capacity_factor 1.0, relu" cycles "$cycles"
              warm_cycles "$warm_cycles" explore "$explore" auto_steps "$auto_steps" auto_warm "$auto_warm")
  mkdir -p "$out/adaptive"
  for E in $experts; do
    spec=$out/adaptive/E$E.moe bin=$out/adaptive/E$E
    lb spec "$T" "$M" "$H" "$E" "$k" 1.0 bf16 sgd relu 100 vocab=256 by=multigpu.sh "parallel=$par" > "$spec" &&
      "$moec" check "$spec" && { [ "$dry" = 1 ] || "$moec" build "$spec" -o "$bin" > /dev/null; } || {
      phase_fail "moec could not check or build ${spec#"$out"/}"; continue; }
  done
  for w in $worlds; do
    for E in $experts; do
      spec=$out/adaptive/E$E.moe bin=$out/adaptive/E$E plan=$out/adaptive/E${E}_W$w.plan.json
      [ -f "$spec" ] || continue
      "$moec" plan --json --ranks "$w" "$spec" > "$plan" 2>/dev/null || {
        phase_fail "E = $E at W = $w: moec plan fails: $("$moec" plan --ranks "$w" "$spec" 2>&1 | head -n 1)"
        continue; }
      local base=(--backend "$backend" --kernel-cache "$kc" --log-every 1000)
      [ "$w" -gt 1 ] && base+=(--comm "$comm")
      n1=$(py candidates "$plan" 1 | wc -w)
      ms=$(py estimate "$plan" "$backend" 1)
      steps=$((n1 * (warm_cycles + cycles)))
      rec=(kind cycle E "$E" nodes 1 warm_steps $((n1 * warm_cycles)) plan "$plan" metrics "$out/adaptive/E${E}_W${w}_cycle.jsonl"
           trace "$out/adaptive/E${E}_W${w}_cycle.trace.json" "${meta[@]}")
      mrun adaptive "E${E}_W${w}_cycle" "$(est_run "$w" "$steps" "$ms")" "$w" -- "$bin" "${base[@]}" --variant cycle \
        --steps "$steps" --metrics "$out/adaptive/E${E}_W${w}_cycle.jsonl" --trace "$out/adaptive/E${E}_W${w}_cycle.trace.json"
      if [ "$w" -ge "$two_node_min" ]; then
        n2=$(py candidates "$plan" 2 | wc -w)
        ms=$(py estimate "$plan" "$backend" 2)
        steps=$((n2 * (warm_cycles + cycles)))
        rec=(kind cycle E "$E" nodes 2 local $((w / 2)) warm_steps $((n2 * warm_cycles)) plan "$plan"
             metrics "$out/adaptive/E${E}_W${w}_2nodes.jsonl" trace "$out/adaptive/E${E}_W${w}_2nodes.trace.json" "${meta[@]}")
        mrun adaptive "E${E}_W${w}_2nodes" "$(est_run "$w" "$steps" "$ms")" "$w" MOEC_LOCAL_SIZE=$((w / 2)) -- "$bin" \
          "${base[@]}" --variant cycle --steps "$steps" --metrics "$out/adaptive/E${E}_W${w}_2nodes.jsonl" \
          --trace "$out/adaptive/E${E}_W${w}_2nodes.trace.json"
      fi
      ms=$(py estimate "$plan" "$backend" 1)
      steps=$((n1 * (explore + 1) + auto_warm + auto_steps)) # a warm-up round, explore rounds
      rec=(kind auto E "$E" nodes 1 plan "$plan" metrics "$out/adaptive/E${E}_W${w}_auto.jsonl" "${meta[@]}")
      mrun adaptive "E${E}_W${w}_auto" "$(est_run "$w" "$steps" "$ms")" "$w" -- "$bin" "${base[@]}" --steps "$steps" \
        --metrics "$out/adaptive/E${E}_W${w}_auto.jsonl"
    done
  done
}
phase_overlap() {
  local T M H E k d spec bin plan ms
  IFS=, read -r T M H E k <<< "$ocfg"
  [ -n "$k" ] || { phase_skip overlap "--overlap-config is T,M,H,E,k, not $ocfg"; return; }
  mkdir -p "$out/overlap"
  spec=$out/overlap/layer.moe bin=$out/overlap/layer plan=$out/overlap/layer.plan.json
  lb spec "$T" "$M" "$H" "$E" "$k" 1.0 bf16 sgd relu 100 vocab=256 by=multigpu.sh \
    "parallel=adaptive_r = 1; overlap_degree = 1, 2, 4; all_to_all = linear; select = fixed;" > "$spec" &&
    "$moec" plan --json --ranks "$wmax" "$spec" > "$plan" 2>/dev/null &&
    { [ "$dry" = 1 ] || "$moec" build "$spec" -o "$bin" > /dev/null; } ||
    { phase_skip overlap "moec could not plan or build $spec at $wmax ranks"; return; }
  ms=$(py estimate "$plan" "$backend" 1)
  for d in 1 2 4; do
    rec=(d "$d" config "T = $T, M = $M, H = $H, E = $E, k = $k" steps "$osteps" warm_steps "$owarm"
         metrics "$out/overlap/d$d.jsonl" trace "$out/overlap/d$d.trace.json")
    mrun overlap "d$d" "$(est_run "$wmax" "$osteps" "$ms")" "$wmax" -- "$bin" --backend "$backend" --comm "$comm" \
      --kernel-cache "$kc" --log-every 1000 --variant "r=1,d=$d,a2a=linear" --steps "$osteps" \
      --metrics "$out/overlap/d$d.jsonl" --trace "$out/overlap/d$d.trace.json"
  done
}
phase_bytes() {
  local corpus=$root/examples/data/corpus.txt ex spec bin t g ms_tok
  if [ ! -s "$corpus" ] && [ "$dry" = 0 ]; then
    (cd "$root" && sh tools/make-corpus.sh) > "$out/bytes/corpus.log" 2>&1 ||
      { phase_skip bytes "no $corpus, and tools/make-corpus.sh could not write it (no bible-kjv here?): carry examples/data/corpus.txt to this machine"; return; }
  fi
  for ex in $bex; do
    [ -f "$root/examples/$ex.moe" ] || { phase_fail "no examples/$ex.moe"; continue; }
    spec=$out/bytes/$ex.moe bin=$out/bytes/$ex
    mkdir -p "$out/bytes"
    # dropless; no checkpoints (the run measures training, and writes nothing into the tree)
    local drop='s/capacity_factor = [-0-9.e]*;/capacity_factor = 0;/'
    grep -q capacity_factor "$root/examples/$ex.moe" || drop='s/\(top_k = [0-9]*;\)/\1 capacity_factor = 0;/'
    sed -e "$drop" -e 's/checkpoint = "[^"]*";//; s/checkpoint_every = [0-9]*;//' "$root/examples/$ex.moe" > "$spec"
    "$moec" check "$spec" && { [ "$dry" = 1 ] || "$moec" build "$spec" -o "$bin" > /dev/null; } ||
      { phase_fail "moec could not check or build ${spec#"$out"/}"; continue; }
    t=$(sed -n 's/.*tokens = \([0-9]*\);.*/\1/p' "$spec" | head -n 1)
    [ "$backend" = cpu ] && t=128
    g=$((t * wmax))
    case $ex in gpt_moe_bytes) ms_tok=0.0018 ;; *) ms_tok=0.0006 ;; esac
    [ "$backend" = cpu ] && ms_tok=0.05
    local common=(--backend "$backend" --kernel-cache "$kc" --log-every 1000 --steps "$bsteps" --data "$corpus")
    rec=(example "$ex" steps "$bsteps" tokens "$g" metrics "$out/bytes/${ex}_w1.jsonl")
    mrun bytes "${ex}_w1" "$(est_run 1 "$bsteps" "$(awk -v g="$g" -v c="$ms_tok" 'BEGIN { print 2 + g * c }')")" 1 -- \
      "$bin" "${common[@]}" --tokens "$g" --metrics "$out/bytes/${ex}_w1.jsonl"
    rec=(example "$ex" steps "$bsteps" tokens "$t" metrics "$out/bytes/${ex}_w$wmax.jsonl")
    mrun bytes "${ex}_w$wmax" "$(est_run "$wmax" "$bsteps" "$(awk -v g="$t" -v c="$ms_tok" 'BEGIN { print 4 + g * c }')")" \
      "$wmax" -- "$bin" "${common[@]}" --comm "$comm" --tokens "$t" --metrics "$out/bytes/${ex}_w$wmax.jsonl"
  done
}

# --- main ----------------------------------------------------------------------------------------
if [ "$dry" = 1 ]; then
  echo "dry run: the plan of bench/gpu/multigpu.sh --backend $backend on $gpus GPU(s) (world sizes$fits); nothing runs"
  echo "  estimates: a run's start (CUDA, NCCL, kernels from the cache) plus its steps at rates of multigpu.py's RATES"
  out_note="(specs in $out)"
else
  printf '%s\n' "$argv0" >> "$out/commands.txt"
  echo "multigpu.sh: --backend $backend, $gpus GPU(s), world sizes$fits; files in $out"
fi
total_est=0
for ph in $phases; do # in the order given (the report's sections keep theirs)
  phase_begin "$ph"
  "phase_$ph"
  phase_end "$ph"
done
if [ "$dry" = 1 ]; then
  echo "total: about $total_est s ($(( (total_est + 59) / 60 )) min) of runs, plus the build $out_note"
  exit 0
fi
echo "report: $out/report.md$([ -n "$export_dir" ] && echo "; exported to $export_dir"); $(elapsed) s in all"
exit "$any_bad"

#!/bin/sh
# layer_bench.sh — the GPU layer benchmark: one MoE layer per configuration
# (T, M, H, E, k, f), built by moec and trained on the cuda backend, against
# the references measured in the same run by bench/gpu/torch_ref.py (the GEMM
# peak, a plain PyTorch MoE layer); prints a markdown table for
# bench/RESULTS.md, and the NVRTC cold and warm start.
#
# usage: bench/gpu/layer_bench.sh [options]
#   --moec PATH        moec to build with (default: build/compiler/moec)
#   --dtype bf16|fp32  the spec's dtype (default bf16; when the runtime computes
#                      in another, the rows say what ran, and a note says so)
#   --configs "T,M,H,E,k,f[,act] ..."   (default: the three of bench/RESULTS.md); a 7th field
#                      is that config's activation (else --activation's); or a preset's name:
#                      issue18 (issue 18's seven; it turns on --grouped and --keep-going)
#   --grouped          the references also measure issue 18's grouped-GEMM layer (torch_ref.py
#                      --grouped: moec's precision scheme and pure bf16, eager and compiled), and
#                      the table has issue 18's columns (those, the loop, % of peak, the roofline)
#   --ref-optimizers L torch_ref.py measures its layers with each of L (e.g. sgd,adam: one
#                      compile serves both); default: --optimizer's
#   --ref-json FILE    take the references from FILE (torch_ref.py --json of the same session,
#                      e.g. --ref-optimizers sgd,adam of a run with the other optimizer); no torch run
#   --ref-args "ARGS"  more arguments of torch_ref.py (e.g. "--warmup 2 --reps 10 --compile-until 300")
#   --kernel-cache DIR the runs' NVRTC kernel cache (default: OUT/kc; share one between runs)
#   --keep-going       a config whose moec run fails is listed as failed, the others still run
#   --steps N          steps a run (default 20); --warmup N: steps not measured (default 5:
#                      select = fixed, so no exploration; the kernels are compiled at start)
#   --optimizer sgd|adam (default sgd)   --activation relu|gelu|silu|swiglu (default relu)
#   --out DIR          where specs, binaries, logs and metrics go (default: a new /tmp dir)
#   --no-torch         skip the PyTorch references     --no-startup: skip the NVRTC start
#   --backend cpu      run on the cpu backend (to test this script without a GPU; tiny configs)
#   --dry-run          write the specs, check them with moec check, print their plans; no run
# Exit: 0 done, 1 a failure (no GPU among them), 2 a usage error.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
moec=$root/build/compiler/moec
dtype=bf16 steps=20 warm=5 opt=sgd act=relu out= torch=1 startup=1 backend=cuda dry=0
grouped=0 ref_opts= ref_json= ref_args= keep=0 kcache=
configs="16384,2048,2048,8,2,1.0 4096,1024,4096,64,2,1.0 16384,2048,2048,8,2,0"
die() { echo "layer_bench.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^# Exit/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
  --moec) moec=$2; shift ;;
  --dtype) dtype=$2; shift ;;
  --configs) configs=$2; shift ;;
  --steps) steps=$2; shift ;;
  --warmup) warm=$2; shift ;;
  --optimizer) opt=$2; shift ;;
  --activation) act=$2; shift ;;
  --out) out=$2; shift ;;
  --no-torch) torch=0 ;;
  --grouped) grouped=1 ;;
  --ref-optimizers) ref_opts=$2; shift ;;
  --ref-json) ref_json=$2; shift ;;
  --ref-args) ref_args=$2; shift ;;
  --keep-going) keep=1 ;;
  --kernel-cache) kcache=$2; shift ;;
  --no-startup) startup=0 ;;
  --backend) backend=$2; shift ;;
  --dry-run) dry=1 ;;
  -h|--help) usage ;;
  *) echo "layer_bench.sh: unknown option $1" >&2; usage ;;
  esac
  [ $# -gt 0 ] && shift
done
case $dtype in bf16|fp32) ;; *) echo "layer_bench.sh: --dtype is bf16 or fp32, not $dtype" >&2; exit 2 ;; esac
case $backend in cpu|cuda) ;; *) echo "layer_bench.sh: --backend is cuda or cpu" >&2; exit 2 ;; esac
[ "$steps" -gt "$warm" ] 2>/dev/null || { echo "layer_bench.sh: --steps must exceed --warmup" >&2; exit 2; }
[ -x "$moec" ] || die "no moec at $moec (build it: cmake --build build), or give --moec PATH"
command -v python3 >/dev/null 2>&1 || die "python3 is needed"
[ -n "$out" ] || out=$(mktemp -d /tmp/moec-layer-bench.XXXXXX)
mkdir -p "$out" || die "cannot make $out"
py() { python3 "$here/layer_bench.py" "$@"; }
case $configs in
*,*) ;;
*) pre=$(py preset "$configs" 2>/dev/null) || { echo "layer_bench.sh: no preset '$configs' (issue18), nor T,M,H,E,k,f" >&2; exit 2; }
   configs=$pre
   grouped=1 keep=1 ;;
esac
[ -n "$ref_opts" ] || ref_opts=$opt
[ -z "$ref_json" ] || [ -f "$ref_json" ] || die "no --ref-json $ref_json"
# act_of CONFIG: its activation (the 7th field), else --activation's
act_of() { echo "$1" | awk -F, -v d="$act" '{print (NF > 6) ? $7 : d}'; }

# --- the specs ------------------------------------------------------------------------
i=0
for c in $configs; do
  i=$((i + 1))
  set -- $(echo "$c" | tr ',' ' ')
  [ $# = 6 ] || [ $# = 7 ] || { echo "layer_bench.sh: a config is T,M,H,E,k,f[,act], not $c" >&2; exit 2; }
  py spec "$1" "$2" "$3" "$4" "$5" "$6" "$dtype" "$opt" "$(act_of "$c")" "$steps" > "$out/c$i.moe"
  "$moec" check "$out/c$i.moe" || die "moec check $out/c$i.moe failed"
  "$moec" plan --json "$out/c$i.moe" > "$out/c$i.plan.json" || die "moec plan $out/c$i.moe failed"
done
n=$i
py spec 1024 256 512 8 2 1.0 "$dtype" "$opt" "$act" 2 > "$out/startup.moe"
"$moec" check "$out/startup.moe" || die "moec check $out/startup.moe failed"

if [ "$dry" = 1 ]; then
  echo "dry run: $n specs in $out, each checked by moec check"
  i=0
  for c in $configs; do
    i=$((i + 1))
    set -- $(py plan "$out/c$i.plan.json")
    echo "  c$i ($c): model $(awk -v f="$1" 'BEGIN {printf "%.1f", f / 1e9}') GFLOP/step, planned memory $(awk -v b="$2" 'BEGIN {printf "%.2f", b / 1e9}') GB -> $out/c$i.moe"
  done
  echo "a run would: moec build each; ./BIN --backend $backend --steps $steps --metrics M --kernel-cache $out/kc;"
  echo "  median of layer_ms over steps > $warm; python3 $here/torch_ref.py --configs ... --dtypes ...$([ "$grouped" = 1 ] && echo " --grouped --optimizers $ref_opts"); the table"
  exit 0
fi

# --- the GPU ----------------------------------------------------------------------------
if [ "$backend" = cuda ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    die "no NVIDIA GPU found here (nvidia-smi does not list one); run this on the GPU machine, or --dry-run"
  fi
  gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)
else
  gpu="none (cpu backend: a test of the script, not a GPU figure)"
  torch=0
fi

# --- build ------------------------------------------------------------------------------
for i in $(seq 1 "$n") startup; do
  case $i in startup) s=startup ;; *) s=c$i ;; esac
  "$moec" build "$out/$s.moe" -o "$out/$s" >/dev/null || die "moec build $out/$s.moe failed"
done
[ "$backend" = cuda ] && {
  "$out/startup" --backend cuda --steps 1 --no-kernel-cache --quiet > "$out/probe.txt" 2>&1 ||
    die "the cuda backend does not start: $(cat "$out/probe.txt")"
}

echo "# moec GPU layer benchmark"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')" \
     "($(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ') tracked files modified)"
echo "- GPU: $gpu; host: $(nproc) cores, $(sed -n 's/^model name\t*: //p' /proc/cpuinfo | head -n 1)"
echo "- spec dtype $dtype, optimizer $opt, activation $act, $steps steps a run, the first $warm not measured; files in $out"
echo

# --- NVRTC cold and warm start ------------------------------------------------------------
if [ "$startup" = 1 ] && [ "$backend" = cuda ]; then
  cold= warm_t=
  for r in 1 2; do
    rm -rf "$out/kc_start"
    cold="$cold $(py time "$out/startup" --backend cuda --steps 1 --kernel-cache "$out/kc_start" --quiet)" ||
      die "startup run failed"
  done
  for r in 1 2 3; do
    warm_t="$warm_t $(py time "$out/startup" --backend cuda --steps 1 --kernel-cache "$out/kc_start" --quiet)" ||
      die "startup run failed"
  done
  "$out/startup" --backend cuda --steps 1 --kernel-cache "$out/kc_start" | grep '^kernels:' > "$out/startup.kernels"
  grep -q "from the cache" "$out/startup.kernels" || echo "warning: the warm start did not use the cache: $(cat "$out/startup.kernels")"
  med() { echo "$@" | tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
  echo "$(med $cold) $(med $warm_t) $(echo $cold | tr ' ' '/') $(echo $warm_t | tr ' ' '/')" > "$out/startup.txt"
  echo "NVRTC start (whole process, --steps 1, small spec): cold $(echo $cold) s; warm $(echo $warm_t) s"
else
  : > "$out/startup.txt"
fi

# --- the layers ---------------------------------------------------------------------------
: > "$out/ours.jsonl"
: > "$out/failed.txt"
# fail MSG: stop, or with --keep-going note the config as failed and go on
fail() {
  [ "$keep" = 1 ] || die "$1"
  echo "  FAILED: $1"
  echo "$c: $1" >> "$out/failed.txt"
}
i=0
for c in $configs; do
  i=$((i + 1))
  t0=$(date +%s)
  # the kernels cached by the first run: the steps measure the layer, not NVRTC
  run_c() {
    timeout 300 "$out/c$i" --backend "$backend" --steps "$steps" --metrics "$out/c$i.jsonl" \
      --kernel-cache "${kcache:-$out/kc}" --log-every 1 > "$out/c$i.log" 2>&1
  }
  if ! run_c; then
    # a runtime without a bf16 path may refuse it: say so, and measure fp32 instead
    if [ "$dtype" = bf16 ] && grep -qi "bf16" "$out/c$i.log"; then
      echo "  note: c$i failed in bf16 ($(grep -i bf16 "$out/c$i.log" | head -n 1)); measuring it in fp32"
      set -- $(echo "$c" | tr ',' ' ')
      py spec "$1" "$2" "$3" "$4" "$5" "$6" fp32 "$opt" "$(act_of "$c")" "$steps" > "$out/c$i.moe"
      "$moec" build "$out/c$i.moe" -o "$out/c$i" >/dev/null || { fail "moec build $out/c$i.moe (fp32) failed"; continue; }
      run_c || { fail "c$i ($c) failed in fp32 too, or took over 300 s: $(tail -n 5 "$out/c$i.log")"; continue; }
    else
      fail "c$i ($c) failed or took over 300 s: $(tail -n 5 "$out/c$i.log")"
      continue
    fi
  fi
  py row "$c" "$dtype" "$out/c$i.log" "$out/c$i.jsonl" "$warm" "$out/c$i.plan.json" "$(act_of "$c")" >> "$out/ours.jsonl" ||
    { fail "cannot read $out/c$i.jsonl"; continue; }
  ran=$(py dtype "$out/c$i.log")
  echo "c$i ($c): $(tail -n 1 "$out/ours.jsonl" | python3 -c 'import json,sys; o=json.load(sys.stdin); print("layer %.2f ms, step %.1f ms, %.1f TFLOP/s" % (o["layer_ms"], o["step_ms"], o["useful_tflops"]))') ($ran, $(($(date +%s) - t0)) s)"
  [ "$ran" = "$dtype" ] || echo "  note: dtype $dtype asked, the runtime computed in $ran (the header: $(grep '^backend' "$out/c$i.log"))"
done
echo

# --- the references, in the same run --------------------------------------------------------
ref=-
if [ -n "$ref_json" ]; then
  ref=$ref_json
elif [ "$torch" = 1 ]; then
  dts=$(python3 -c 'import json,sys; print(",".join(sorted({json.loads(l)["dtype"] for l in open(sys.argv[1])} | {sys.argv[2]})))' "$out/ours.jsonl" "$dtype")
  dts=$(echo "$dts" | tr ',' '\n' | grep -E '^(bf16|fp32)$' | paste -sd, -)
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    # shellcheck disable=SC2086 # $ref_args: more arguments, split
    python3 "$here/torch_ref.py" --configs $configs --dtypes "$dts" --optimizers "$ref_opts" --activation "$act" \
      $([ "$grouped" = 1 ] && echo --grouped) $ref_args --json "$out/torch.json" > "$out/torch.txt" 2>&1 &&
      ref=$out/torch.json || echo "warning: torch_ref.py failed: $(tail -n 3 "$out/torch.txt"); no references"
  else
    echo "warning: PyTorch with CUDA is not importable here; the table has no references"
  fi
fi
[ -s "$out/ours.jsonl" ] || die "no config ran: $(cat "$out/failed.txt")"
py table "$out/ours.jsonl" "$ref" "$out/startup.txt" "$opt"
if [ -s "$out/failed.txt" ]; then
  echo
  echo "Failed configs (moec):"
  sed 's/^/- /' "$out/failed.txt"
  exit 1
fi

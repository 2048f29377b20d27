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
#   --configs "T,M,H,E,k,f ..."   (default: the three of bench/RESULTS.md)
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

# --- the specs ------------------------------------------------------------------------
i=0
for c in $configs; do
  i=$((i + 1))
  set -- $(echo "$c" | tr ',' ' ')
  [ $# = 6 ] || { echo "layer_bench.sh: a config is T,M,H,E,k,f, not $c" >&2; exit 2; }
  py spec "$1" "$2" "$3" "$4" "$5" "$6" "$dtype" "$opt" "$act" "$steps" > "$out/c$i.moe"
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
  echo "  median of layer_ms over steps > $warm; python3 $here/torch_ref.py --configs ... --dtypes ...; the table"
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
i=0
for c in $configs; do
  i=$((i + 1))
  t0=$(date +%s)
  # the kernels cached by the first run: the steps measure the layer, not NVRTC
  run_c() {
    timeout 300 "$out/c$i" --backend "$backend" --steps "$steps" --metrics "$out/c$i.jsonl" \
      --kernel-cache "$out/kc" --log-every 1 > "$out/c$i.log" 2>&1
  }
  if ! run_c; then
    # a runtime without a bf16 path may refuse it: say so, and measure fp32 instead
    if [ "$dtype" = bf16 ] && grep -qi "bf16" "$out/c$i.log"; then
      echo "  note: c$i failed in bf16 ($(grep -i bf16 "$out/c$i.log" | head -n 1)); measuring it in fp32"
      set -- $(echo "$c" | tr ',' ' ')
      py spec "$1" "$2" "$3" "$4" "$5" "$6" fp32 "$opt" "$act" "$steps" > "$out/c$i.moe"
      "$moec" build "$out/c$i.moe" -o "$out/c$i" >/dev/null || die "moec build $out/c$i.moe (fp32) failed"
      run_c || die "c$i ($c) failed in fp32 too, or took over 300 s: $(tail -n 5 "$out/c$i.log")"
    else
      die "c$i ($c) failed or took over 300 s: $(tail -n 5 "$out/c$i.log")"
    fi
  fi
  py row "$c" "$dtype" "$out/c$i.log" "$out/c$i.jsonl" "$warm" "$out/c$i.plan.json" "$act" >> "$out/ours.jsonl" ||
    die "cannot read $out/c$i.jsonl"
  ran=$(py dtype "$out/c$i.log")
  echo "c$i ($c): $(tail -n 1 "$out/ours.jsonl" | python3 -c 'import json,sys; o=json.load(sys.stdin); print("layer %.2f ms, step %.1f ms, %.1f TFLOP/s" % (o["layer_ms"], o["step_ms"], o["useful_tflops"]))') ($ran, $(($(date +%s) - t0)) s)"
  [ "$ran" = "$dtype" ] || echo "  note: dtype $dtype asked, the runtime computed in $ran (the header: $(grep '^backend' "$out/c$i.log"))"
done
echo

# --- the references, in the same run --------------------------------------------------------
ref=-
if [ "$torch" = 1 ]; then
  dts=$(python3 -c 'import json,sys; print(",".join(sorted({json.loads(l)["dtype"] for l in open(sys.argv[1])} | {sys.argv[2]})))' "$out/ours.jsonl" "$dtype")
  dts=$(echo "$dts" | tr ',' '\n' | grep -E '^(bf16|fp32)$' | paste -sd, -)
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    python3 "$here/torch_ref.py" --configs $configs --dtypes "$dts" --json "$out/torch.json" > "$out/torch.txt" 2>&1 &&
      ref=$out/torch.json || echo "warning: torch_ref.py failed: $(tail -n 3 "$out/torch.txt"); no references"
  else
    echo "warning: PyTorch with CUDA is not importable here; the table has no references"
  fi
fi
py table "$out/ours.jsonl" "$ref" "$out/startup.txt"

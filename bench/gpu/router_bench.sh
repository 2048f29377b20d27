#!/bin/sh
# router_bench.sh — what each router option of today's models costs (issue
# 16): per config, the base layer (softmax gate, token choice, the config's
# capacity) and one variant per option (gate = sigmoid, + bias_update, groups
# / top_groups, z_loss, shared_experts = 2, routing = expert_choice, and
# DeepSeek-V3's together), each its own spec built by moec and run with
# select = fixed: untraced for the layer's median time (layer_ms + update_ms
# of the metrics), traced (--trace) for the median of the gate's spans, so the
# ratio to the base measured in the same run and the gate's share of the layer
# are printed, as a markdown table for bench/RESULTS.md.
#
# usage: bench/gpu/router_bench.sh [options]
#   --configs "T,M,H,E,k[,f[,act]] ..."  f: capacity_factor (default 1.0); act: relu|gelu|silu|swiglu
#                      (default relu). Default on cuda: a DeepSeek-like fine-grained layer and a
#                      Switch-like one, "16384,2048,1024,64,6,1.0,swiglu 16384,2048,2048,8,2,1.0,relu"
#   --steps N          steps a run (default 30); --warmup N: steps not measured (default 5)
#   --dtype bf16|fp32  the specs' dtype (default bf16)
#   --backend cuda|cpu (default cuda; cpu tests this script without a GPU, on tiny configs)
#   --out DIR          where specs, binaries, traces and logs go (default: a new /tmp dir)
#   --moec PATH        moec to build with (default: build/compiler/moec)
# Exit: 0 done, 1 a failure (a variant that failed is a row of the table), 2 a usage error.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
moec=$root/build/compiler/moec
configs="16384,2048,1024,64,6,1.0,swiglu 16384,2048,2048,8,2,1.0,relu"
steps=30 warm=5 dtype=bf16 backend=cuda out=
usage() { sed -n '2,/^# Exit/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
die() { echo "router_bench.sh: $*" >&2; exit 1; }
bad() { echo "router_bench.sh: $*" >&2; exit 2; }
args="$*"
while [ $# -gt 0 ]; do
  case $1 in
  --configs|--steps|--warmup|--dtype|--backend|--out|--moec)
    [ $# -ge 2 ] || { echo "router_bench.sh: $1 needs a value" >&2; usage; } ;;
  esac
  case $1 in
  --configs) configs=$2; shift ;;
  --steps) steps=$2; shift ;;
  --warmup) warm=$2; shift ;;
  --dtype) dtype=$2; shift ;;
  --backend) backend=$2; shift ;;
  --out) out=$2; shift ;;
  --moec) moec=$2; shift ;;
  -h|--help) usage ;;
  *) echo "router_bench.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
case $dtype in bf16|fp32) ;; *) bad "--dtype is bf16 or fp32, not $dtype" ;; esac
case $backend in cpu|cuda) ;; *) bad "--backend is cuda or cpu, not $backend" ;; esac
[ "$warm" -ge 0 ] 2>/dev/null && [ "$steps" -gt "$warm" ] 2>/dev/null || bad "--steps must exceed --warmup"
command -v python3 >/dev/null 2>&1 || die "python3 is needed"
py() { python3 "$here/router_bench.py" "$@"; }
lb() { python3 "$here/layer_bench.py" "$@"; }
for c in $configs; do py config "$c" >/dev/null || usage; done
[ -x "$moec" ] || die "no moec at $moec (build it: make build), or give --moec PATH"
[ -n "$out" ] || out=$(mktemp -d /tmp/moec-router-bench.XXXXXX)
mkdir -p "$out" || die "cannot make $out"

if [ "$backend" = cuda ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    die "no NVIDIA GPU found here (nvidia-smi does not list one); run this on the GPU machine, or --backend cpu"
  fi
  device=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)
else
  device="none (cpu backend: a test of the script, not a GPU figure)"
fi

echo "# Today's routers: cost per option"
echo
echo "- command: \`bench/gpu/router_bench.sh $args\`"
echo "- device: $device; host: $(nproc) cores"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')" \
     "($(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ') tracked files modified)"
echo "- spec dtype $dtype, SGD, $steps steps a run, the first $warm not measured; files in $out"
echo

: > "$out/rows.jsonl"
: > "$out/notes.txt"
rc=0
i=0
for c in $configs; do
  i=$((i + 1))
  set -- $(py config "$c")
  c6=$1 act=$2
  set -- $(echo "$c6" | tr ',' ' ')
  T=$1 M=$2 H=$3 E=$4 k=$5 f=$6
  py variants "$c" > "$out/c$i.variants" || die "cannot list the variants of $c"
  sed -n "s/^note|/$c|/p" "$out/c$i.variants" >> "$out/notes.txt"
  grep -v '^note|' "$out/c$i.variants" > "$out/c$i.list"
  while IFS='|' read -r id option items; do
    s=$out/c$i.$id
    t0=$(date +%s)
    why=
    lb spec "$T" "$M" "$H" "$E" "$k" "$f" "$dtype" sgd "$act" "$steps" "moe=$items" by=router_bench.sh > "$s.moe" &&
      "$moec" build "$s.moe" -o "$s" > "$s.build.log" 2>&1 &&
      "$moec" plan --json "$s.moe" > "$s.plan.json" 2>> "$s.build.log" ||
      why="moec build failed: $(tail -n 2 "$s.build.log" | tr '\n|' '  ')"
    # untraced (graphs on, on cuda): the layer's time; then traced: the gate's spans
    [ -n "$why" ] || timeout 300 "$s" --backend "$backend" --steps "$steps" --kernel-cache "$out/kc" \
      --metrics "$s.jsonl" --log-every 1 < /dev/null > "$s.log" 2>&1 ||
      why="the run failed: $(tail -n 2 "$s.log" | tr '\n|' '  ')"
    [ -n "$why" ] || timeout 300 "$s" --backend "$backend" --steps "$steps" --kernel-cache "$out/kc" \
      --metrics "$s.trace.jsonl" --trace "$s.trace.json" --log-every 1 < /dev/null > "$s.trace.log" 2>&1 ||
      why="the traced run failed: $(tail -n 2 "$s.trace.log" | tr '\n|' '  ')"
    [ -n "$why" ] || py row "$id" "$option" "$c" "$dtype" "$warm" "$s" >> "$out/rows.jsonl" 2> "$s.row.err" ||
      why="cannot read its metrics or trace: $(tail -n 1 "$s.row.err")"
    if [ -n "$why" ]; then
      py failed "$id" "$option" "$c" "$why" >> "$out/rows.jsonl"
      echo "c$i $id ($c): $why" >&2
      rc=1
    else
      echo "c$i $id ($c): $(($(date +%s) - t0)) s" >&2
    fi
  done < "$out/c$i.list"
done
py table "$out/rows.jsonl" "$out/notes.txt" || die "cannot make the table from $out/rows.jsonl"
exit $rc

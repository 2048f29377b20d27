#!/bin/sh
# gate_bench.sh — the MoE gate's GPU time (forward and backward, the gate
# GEMMs included) in one layer, for one or more moec builds in the same run
# (an A/B of gate kernels): each build's layer of layer_bench.sh's spec runs
# traced (--trace: CUDA events around every span, CUDA graphs off), and the
# median over the measured steps of its "gate", "gate and capacity" and "bwd
# gate" spans is printed (bench/gpu/layer_bench.py trace_spans); then untraced, for
# the layer's median time with graphs (layer_ms + update_ms of the metrics).
#
# usage: bench/gpu/gate_bench.sh [options] MOEC [MOEC ...]
#   --configs "T,M,H,E,k,f[,act] ..."  (default: layer_bench.sh's three; act: relu)
#   --steps N (default 30)  --warmup N (default 5)  --dtype bf16|fp32 (default bf16)
#   --out DIR  where specs, binaries, traces and logs go (default: a new /tmp dir)
# Exit: 0 done, 1 a failure, 2 a usage error.
set -u
here=$(cd "$(dirname "$0")" && pwd)
configs="16384,2048,2048,8,2,1.0 4096,1024,4096,64,2,1.0 16384,2048,2048,8,2,0" steps=30 warm=5 dtype=bf16 out=
usage() { sed -n '2,/^# Exit/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
die() { echo "gate_bench.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case $1 in
  --configs) configs=$2; shift ;;
  --steps) steps=$2; shift ;;
  --warmup) warm=$2; shift ;;
  --dtype) dtype=$2; shift ;;
  --out) out=$2; shift ;;
  -h|--help) usage ;;
  -*) echo "gate_bench.sh: unknown option $1" >&2; usage ;;
  *) break ;;
  esac
  shift
done
[ $# -ge 1 ] || usage
[ "$steps" -gt "$warm" ] 2>/dev/null || { echo "gate_bench.sh: --steps must exceed --warmup" >&2; exit 2; }
[ -n "$out" ] || out=$(mktemp -d /tmp/moec-gate-bench.XXXXXX)
mkdir -p "$out" || die "cannot make $out"
py() { python3 "$here/layer_bench.py" "$@"; }

echo "| build | T, M, H, E, k, f | gate fwd ms | gate bwd ms | gate ms | layer ms (graphs) |"
echo "|---|---|---:|---:|---:|---:|"
b=0
for moec in "$@"; do
  b=$((b + 1))
  [ -x "$moec" ] || die "no moec at $moec"
  i=0
  for c in $configs; do
    i=$((i + 1))
    set -- $(echo "$c" | tr ',' ' ')
    [ $# = 6 ] || [ $# = 7 ] || die "a config is T,M,H,E,k,f[,act], not $c"
    act=${7:-relu}
    s=$out/b${b}c$i
    py spec "$1" "$2" "$3" "$4" "$5" "$6" "$dtype" sgd "$act" "$steps" > "$s.moe"
    "$moec" build "$s.moe" -o "$s" >/dev/null || die "$moec build $s.moe failed"
    "$moec" plan --json "$s.moe" > "$s.plan.json" || die "$moec plan $s.moe failed"
    timeout 300 "$s" --backend cuda --steps "$steps" --kernel-cache "$out/kc$b" --trace "$s.trace.json" \
      > "$s.trace.log" 2>&1 || die "$s (traced) failed: $(tail -n 3 "$s.trace.log")"
    timeout 300 "$s" --backend cuda --steps "$steps" --kernel-cache "$out/kc$b" --metrics "$s.jsonl" \
      --log-every 1 > "$s.log" 2>&1 || die "$s failed: $(tail -n 3 "$s.log")"
    # the forward: "gate" (dropless and dynamic capacity: before the read of
    # the counts) and "gate and capacity"
    spans=$(py trace_spans "$s.trace.json" "$warm" "gate" "gate and capacity" "bwd gate") ||
      die "cannot read $s.trace.json"
    set -- $spans
    set -- "$(awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f", a + b}')" "$3"
    lm=$(py row "$c" "$dtype" "$s.log" "$s.jsonl" "$warm" "$s.plan.json" "$act" |
      python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["layer_ms"])') || die "cannot read $s.jsonl"
    echo "| $moec | $c | $1 | $2 | $(awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a + b}') | $lm |"
  done
done

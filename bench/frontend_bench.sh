#!/bin/sh
# frontend_bench.sh — how fast `moec check` reads, parses and checks a large spec.
#
#   bench/frontend_bench.sh [MOEC]        (or: cmake --build BUILD --target bench-frontend)
#
# MOEC is the moec binary (default: build/compiler/moec). It generates two specs
# of 10,000 layers each (dim 512, 2^40 parameter bytes is the limit; these have
# about 683 GB as bf16):
#   repeat.moe  `repeat 2500 { residual { rmsnorm; ffn } residual { rmsnorm; moe } }`
#   flat.moe    the same 10,000 layers written out, one key per line, unique names
#               (40,000+ lines)
# checks that each is accepted (exit 0, no diagnostics), then times `moec check`
# on each: RUNS timed runs (default 21) after WARMUP untimed ones (default 3),
# with hyperfine if it is installed, else a python3 loop. It prints a table of
# the median, min and max wall time in ms. Timings are measurements, never
# assertions: the script fails only when a spec is rejected or moec crashes.
#
# Environment: RUNS, WARMUP, BENCH_DIR (where the specs go; default a temporary
# directory, removed at the end), MOEC_BUILD_TYPE (printed in the header).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
moec=${1:-$here/../build/compiler/moec}
runs=${RUNS:-21}
warmup=${WARMUP:-3}

if [ ! -x "$moec" ]; then
  echo "frontend_bench.sh: no moec binary at $moec; build it first or pass its path" >&2
  exit 2
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "frontend_bench.sh: python3 is needed (spec generation and timing)" >&2
  exit 2
fi

if [ -n "${BENCH_DIR:-}" ]; then
  dir=$BENCH_DIR
  mkdir -p "$dir"
else
  dir=$(mktemp -d "${TMPDIR:-/tmp}/moec-bench.XXXXXX")
  trap 'rm -rf "$dir"' EXIT INT TERM
fi

# --- the specs ---------------------------------------------------------------
python3 - "$dir" <<'EOF'
import sys
d = sys.argv[1]
COPIES = 2500  # x 4 layers = 10,000 layers

head = "model bench_{kind} {{\n  dim = 512;\n  tokens = 4096;\n  dtype = bf16;\n"
tail = ("}\n"
        "parallel { adaptive_r = auto; overlap_degree = 1, 2, 4; all_to_all = linear, 2dh; }\n"
        "train { steps = 100; optimizer = adam; lr = 3e-4; log_every = 10; }\n")

with open(f"{d}/repeat.moe", "w") as f:
    f.write("# 10,000 layers written with repeat\n" + head.format(kind="repeat"))
    f.write(f"  repeat {COPIES} {{\n"
            "    residual { rmsnorm; ffn dense { hidden = 2048; activation = gelu; } }\n"
            "    residual { rmsnorm; moe experts { experts = 64; hidden = 2048; top_k = 2; } }\n"
            "  }\n")
    f.write(tail)

with open(f"{d}/flat.moe", "w") as f:
    f.write("# 10,000 layers written out, unique names\n" + head.format(kind="flat"))
    for i in range(COPIES):
        f.write("  residual {\n"
                "    rmsnorm;\n"
                f"    ffn dense_{i} {{\n"
                "      hidden = 2048;\n"
                "      activation = gelu;\n"
                "    }\n"
                "  }\n"
                "  residual {\n"
                "    rmsnorm;\n"
                f"    moe experts_{i} {{\n"
                "      experts = 64;\n"
                "      hidden = 2048;\n"
                "      top_k = 2;\n"
                "      capacity_factor = 1.25;\n"
                "    }\n"
                "  }\n")
    f.write(tail)
EOF

# --- each spec must check clean, and have 10,000 layers -----------------------
for spec in repeat flat; do
  set +e
  "$moec" check --summary "$dir/$spec.moe" >"$dir/$spec.summary" 2>"$dir/$spec.stderr"
  rc=$?
  set -e
  if [ "$rc" -ne 0 ] || [ -s "$dir/$spec.stderr" ]; then
    echo "frontend_bench.sh: moec check $spec.moe exited with status $rc (above 128: killed by signal $((rc - 128)))" >&2
    head -n 20 "$dir/$spec.stderr" >&2
    exit 1
  fi
  if ! grep -q 'layers: 10000 ' "$dir/$spec.summary"; then
    echo "frontend_bench.sh: $spec.moe does not have 10000 layers:" >&2
    cat "$dir/$spec.summary" >&2
    exit 1
  fi
done

# --- timing -------------------------------------------------------------------
if command -v hyperfine >/dev/null 2>&1; then
  timer=hyperfine
  for spec in repeat flat; do
    hyperfine --style none --warmup "$warmup" --runs "$runs" -N \
      --export-json "$dir/$spec.json" "$moec check $dir/$spec.moe" >/dev/null
  done
else
  timer="python3 loop"
fi

python3 - "$dir" "$moec" "$runs" "$warmup" "$timer" "${MOEC_BUILD_TYPE:-unknown}" <<'EOF'
import json, os, platform, statistics, subprocess, sys, time
d, moec, runs, warmup, timer, build_type = sys.argv[1:]
runs, warmup = int(runs), int(warmup)

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

def times_ms(spec):
    path = f"{d}/{spec}.moe"
    if timer == "hyperfine":
        with open(f"{d}/{spec}.json") as f:
            return [t * 1000 for t in json.load(f)["results"][0]["times"]]
    cmd = [moec, "check", path]
    for _ in range(warmup):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out.append((time.perf_counter() - t0) * 1000)
    return out

print(f"moec check speed: {moec}")
print(f"  build type {build_type}; {os.cpu_count()} CPUs, {cpu_model()}")
print(f"  {runs} timed runs after {warmup} warm-up runs, timed with {timer}")
print()
print(f"| {'spec':<11} | {'lines':>6} | {'bytes':>9} | {'layers':>6} | {'median ms':>9} | {'min ms':>7} | {'max ms':>7} |")
print(f"|{'-' * 13}|{'-' * 8}|{'-' * 11}|{'-' * 8}|{'-' * 11}|{'-' * 9}|{'-' * 9}|")
worst = 0.0
for spec in ("repeat", "flat"):
    path = f"{d}/{spec}.moe"
    with open(path, "rb") as f:
        data = f.read()
    lines = data.count(b"\n")
    t = times_ms(spec)
    med = statistics.median(t)
    worst = max(worst, med)
    print(f"| {spec + '.moe':<11} | {lines:>6} | {len(data):>9} | {10000:>6} | "
          f"{med:>9.1f} | {min(t):>7.1f} | {max(t):>7.1f} |")
print()
print(f"goal: a spec of 10,000 layers checks in under 1 s; slowest median {worst:.1f} ms: "
      + ("met" if worst < 1000 else "NOT met"))
EOF

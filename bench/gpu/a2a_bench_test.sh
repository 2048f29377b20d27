#!/bin/sh
# a2a_bench_test.sh JSON "SIZES" COMMAND... — CTest's check of a2a_bench (not a
# timing): runs COMMAND, an mpirun line of a2a_bench ... --json JSON, within
# 100 s (a hang fails the test instead of waiting for CTest's timeout), prints
# its output, then checks that the JSON and the printed table have one row per
# size of SIZES (bytes, in order), each with positive times and bandwidths for
# the reference, LINEAR and 2DH and their ratios to the reference.
set -u
json=$1
sizes=$2
shift 2
rm -f "$json"
log=$(mktemp /tmp/a2a_bench_test.XXXXXX) || exit 1
trap 'rm -f "$log"' EXIT
timeout 100 "$@" > "$log" 2>&1
status=$?
cat "$log"
if [ "$status" = 124 ]; then
  echo "a2a_bench_test: FAIL: the command hung (killed after 100 s)"
  exit 1
fi
if [ "$status" != 0 ]; then
  echo "a2a_bench_test: FAIL: exit status $status"
  exit 1
fi
python3 - "$json" "$sizes" "$log" <<'PY'
import json, re, sys
path, sizes, log = sys.argv[1], [int(s) for s in sys.argv[2].split()], sys.argv[3]
bad = []
try:
    doc = json.load(open(path))
except (OSError, ValueError) as e:
    sys.exit("a2a_bench_test: FAIL: cannot read %s: %s" % (path, e))
rows = doc.get("rows", [])
got = [r.get("size") for r in rows]
if got != sizes:
    bad.append("sizes %s, want %s" % (got, sizes))
w = doc.get("world")
for r in rows:
    if r.get("block") != r.get("size", 0) // (w or 1):
        bad.append("size %s: block %s, want size / world %s" % (r.get("size"), r.get("block"), w))
    for algo in ("ref", "linear", "2dh"):
        for key in ("_us", "_algbw", "_busbw") + (("_pct",) if algo != "ref" else ()):
            v = r.get(algo + key)
            if not isinstance(v, (int, float)) or not v > 0:
                bad.append("size %s: %s%s is %r, want a number above 0" % (r.get("size"), algo, key, v))
table = [l for l in open(log) if re.match(r"\| \d+ \| \d+ \|", l)]
if len(table) != len(sizes):
    bad.append("the printed table has %d rows, want %d" % (len(table), len(sizes)))
if bad:
    print("a2a_bench_test: FAIL:\n  " + "\n  ".join(bad))
    sys.exit(1)
print("a2a_bench_test: ok (%d sizes, reference, linear and 2dh in each; %d ranks, %d nodes of %d)"
      % (len(rows), w, doc.get("nodes"), doc.get("local_size")))
PY

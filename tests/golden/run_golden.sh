#!/bin/sh
# run_golden.sh MOEC NAME: checks NAME.moe and diffs stderr with NAME.stderr.
# The exit status must be 1 when the expected output has an error, else 0.
# Run in tests/golden/ so file names in diagnostics are stable.
set -u
moec=$1 name=$2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$moec" check "$name.moe" 2>"$out" >/dev/null
rc=$?
if grep -q ': error: ' "$name.stderr"; then want=1; else want=0; fi
if ! diff -u "$name.stderr" "$out"; then
  echo "FAIL: $name: diagnostics differ (- expected, + got)"
  exit 1
fi
if [ "$rc" != "$want" ]; then
  echo "FAIL: $name: exit status $rc, expected $want"
  exit 1
fi
echo "ok: $name (exit $rc)"

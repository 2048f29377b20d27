#!/bin/sh
# expect_fail.sh STATUS TEXT COMMAND...: runs COMMAND (an mpirun line, or a
# script that runs some), which must exit with STATUS and print TEXT (a fixed
# string) — within 60 seconds, so a rank left waiting fails the test instead
# of hanging it.
set -u
want_status=$1
want_text=$2
shift 2
out=$(timeout 60 "$@" 2>&1)
status=$?
printf '%s\n' "$out"
if [ "$status" = 124 ]; then
  echo "expect_fail: FAIL: the command hung (killed after 60 s)"
  exit 1
fi
if [ "$status" != "$want_status" ]; then
  echo "expect_fail: FAIL: exit status $status, want $want_status"
  exit 1
fi
if ! printf '%s\n' "$out" | grep -qF -- "$want_text"; then
  echo "expect_fail: FAIL: the output lacks: $want_text"
  exit 1
fi
echo "expect_fail: ok (status $status, message found)"

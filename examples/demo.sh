#!/bin/sh
# demo.sh — what `make demo` runs: every example through the compiler.
# MOEC is the moec binary (set by CMake's demo target).
set -eu
moec=${MOEC:-moec}
cd "$(dirname "$0")/.."
echo "== moec check --summary examples/*.moe"
for spec in examples/*.moe; do
  echo
  echo "-- $spec"
  "$moec" check --summary "$spec"
done
echo
echo "== a spec with mistakes (examples/broken/typos.moe): moec reports each one"
"$moec" check examples/broken/typos.moe || echo "(moec exited with status $?, as it does on errors)"

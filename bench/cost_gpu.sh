#!/bin/sh
# cost_gpu.sh — on a machine with an NVIDIA GPU: build, calibrate the GPU for
# the cost model, and validate the model there (bench/RESULTS.md, "The cost
# model"). Writes the calibration to $1 (default data/calibration/h100.json)
# and the validation tables to stdout.
#
#   bench/cost_gpu.sh [CALIBRATION.json] [BUILD_DIR]
#
# The calibration is `./cost_gpu --calibrate` of bench/cost_gpu.moe at one
# rank (the GEMM curve at its shapes, the kernels' bandwidth; no all-to-all:
# one GPU has no NVLink to measure); the validation is bench/cost_validate.py
# with the cuda backend: the compute terms against the trace at one rank, the
# same for each of $CONFIGS (default issue18: the performance issue's seven
# one-layer configurations; CONFIGS= skips them), and the ranking at 2 ranks
# sharing the GPU (the staged comm).
# It builds the tree first when BUILD_DIR has none: that needs what
# tools/install-deps.sh installs (bison >= 3.6, flex, jansson, xxhash, MPI).
set -eu
cal=${1:-data/calibration/h100.json}
build=${2:-build}
[ -f "$build/build.ninja" ] || [ -f "$build/Makefile" ] ||
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo $(command -v ninja >/dev/null && echo -G Ninja)
cmake --build "$build" -j "$(nproc)"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=${OUT_DIR:-/tmp/moec_cost_gpu}
mkdir -p "$out"
"$build/compiler/moec" build --gpu none bench/cost_gpu.moe -o "$out/cost_gpu"
"$out/cost_gpu" --backend cuda --calibrate "$cal"
python3 bench/cost_validate.py --moec "$build/compiler/moec" --spec bench/cost_gpu.moe --backend cuda \
  --np "${NP:-2}" --steps "${STEPS:-8}" --out "$out" --configs "${CONFIGS-issue18}"

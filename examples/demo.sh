#!/bin/sh
# demo.sh — what `make demo` runs (MOEC is the moec binary, set by CMake):
#  1. moec checks every example and reports a spec with mistakes;
#  2. builds examples/tiny.moe and trains it on two ranks under mpirun, each
#     MoE layer switching among its parallelism variants: the loss falls;
#  3. builds examples/bytes_small.moe, trains it on the King James Bible for
#     a few hundred steps and prints a sample of the text it learned to write;
#     draws the run (loss, learning rate, variants, each MoE layer's expert
#     load from its --routing-trace) into one PNG with tools/plot_run.py;
#  4. the same with examples/bytes_attention.moe, which reads sequences of
#     128 bytes through causal self-attention instead of an n-gram window.
set -eu
moec=${MOEC:-moec}
cd "$(dirname "$0")/.."
out=${MOEC_DEMO_DIR:-build/demo}
mkdir -p "$out"
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}

echo "== 1. moec check --summary examples/*.moe"
for spec in examples/*.moe; do
  "$moec" check --summary "$spec"
done
echo
echo "-- a spec with mistakes (examples/broken/typos.moe): moec names each one"
"$moec" check examples/broken/typos.moe || echo "(moec exited with status $?, as it does on errors)"

echo
echo "== 2. moec build examples/tiny.moe -o $out/tiny && mpirun -np 2 $out/tiny"
"$moec" build examples/tiny.moe -o "$out/tiny"
if command -v mpirun >/dev/null 2>&1; then
  # two ranks sharing this machine; as root, Open MPI wants to be told it is fine
  [ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  export OMPI_MCA_mpi_yield_when_idle=1
  mpirun --oversubscribe -np 2 "$out/tiny" --metrics "$out/tiny.jsonl"
else
  echo "(mpirun not found: one rank)"
  "$out/tiny" --metrics "$out/tiny.jsonl"
fi

echo
echo "== 3. moec build examples/bytes_small.moe -o $out/bytes_small && $out/bytes_small --generate 300"
sh tools/make-corpus.sh
"$moec" build examples/bytes_small.moe -o "$out/bytes_small"
"$out/bytes_small" --generate 300 --metrics "$out/bytes_small.jsonl" --routing-trace "$out/bytes_small.routing.jsonl"
echo
echo "-- the run as a picture: python3 tools/plot_run.py $out/bytes_small.jsonl --routing $out/bytes_small.routing.jsonl -o $out/run.png"
# python3-matplotlib is Debian's: where another python3 comes first on PATH
# (pyenv, a virtual environment), Debian's own /usr/bin/python3 has it
py=
for p in python3 /usr/bin/python3; do
  "$p" -c 'import matplotlib' 2>/dev/null && { py=$p; break; }
done
if [ -n "$py" ]; then
  "$py" tools/plot_run.py "$out/bytes_small.jsonl" --routing "$out/bytes_small.routing.jsonl" -o "$out/run.png"
  echo "picture: $out/run.png"
else
  echo "(no python3 with matplotlib: no picture; apt-get install python3-matplotlib)"
fi

echo
echo "== 4. moec build examples/bytes_attention.moe -o $out/bytes_attention && $out/bytes_attention --generate 300"
"$moec" build examples/bytes_attention.moe -o "$out/bytes_attention"
"$out/bytes_attention" --backend cpu --generate 300 --metrics "$out/bytes_attention.jsonl"
echo
echo "metrics (one JSON object per step): $out/tiny.jsonl, $out/bytes_small.jsonl, $out/bytes_attention.jsonl"
echo "routing trace (one JSON object per step and MoE layer): $out/bytes_small.routing.jsonl"
if [ -n "$py" ]; then echo "picture of the bytes_small run: $out/run.png"; fi

#!/bin/sh
# Installs what moec needs to build and test from Debian's packages, once.
# Called by `make`, `make test` and `make demo` before CMake configures; it does
# nothing (and needs no network) when every package is already there.
# Not root: prints the packages to install and fails, so nothing half-builds.
set -eu

# Debian package names, each with a command or file that proves it is installed.
# Keep this list and the README's "Dependencies" section in step.
need=""
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

have_cmd flex  || need="$need flex"
have_cmd bison || need="$need bison"
have_cmd cmake || need="$need cmake"
have_cmd cc    || need="$need gcc"
have_pkg libopenblas-dev || need="$need libopenblas-dev"   # cpu GEMMs (CBLAS)
have_pkg libopenmpi-dev  || need="$need libopenmpi-dev"    # comm_mpi.c (mpi.h, libmpi)
have_pkg libxxhash-dev   || need="$need libxxhash-dev"     # checkpoints: the files' xxh64 (ckpt_file.c)
have_pkg libjansson-dev  || need="$need libjansson-dev"    # checkpoints: safetensors headers, MANIFEST.json
have_cmd mpirun          || need="$need openmpi-bin"       # mpirun, for the mpi tests
have_cmd bible || need="$need bible-kjv"                    # text of the byte-level examples
have_pkg python3-matplotlib || need="$need python3-matplotlib" # tools/plot_run.py: a run's metrics and routing as a PNG
have_cmd setpriv || need="$need util-linux"                 # cli.moec as root: moec as nobody (Essential in Debian)

# The Python reader of safetensors, for the test that PyTorch's loader reads
# our checkpoints. Optional: that test skips without it.
py_extra() {
  if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import safetensors, numpy' 2>/dev/null; then
    python3 -m pip install -q safetensors numpy >/dev/null 2>&1 ||
      echo "moec: note: could not pip install safetensors numpy; the safetensors read-back test will skip"
  fi
}

if [ -z "$need" ]; then
  py_extra
  sh tools/make-corpus.sh
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "moec: missing packages:$need" >&2
  echo "moec: install them as root:  apt-get update && apt-get install -y$need" >&2
  exit 1
fi

if ! have_cmd apt-get; then
  echo "moec: missing packages:$need, and there is no apt-get here; install them with your system's package manager" >&2
  exit 1
fi

echo "moec: installing missing packages:$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null
echo "moec: installed:$need"
py_extra
sh tools/make-corpus.sh

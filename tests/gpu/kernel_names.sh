#!/bin/sh
# kernel_names.sh SRCDIR — every kernel that the cuda backend loads by
# name (its KERNELS list, moert_k_NAME) is defined, extern "C", in templates/:
# a misspelt or missing one would make the cuda backend fail at start on a
# GPU, which CI does not have. No GPU needed.
set -u
src=$1
names=$(sed -n '/^#define KERNELS(X)/,/^$/p' "$src/runtime/backend_cuda_impl.h" | grep -o 'X([a-z0-9_]*)' | sed 's/X(\(.*\))/\1/')
[ -n "$names" ] || { echo "FAIL: no KERNELS list found in runtime/backend_cuda_impl.h"; exit 1; }
n=0 bad=0
for k in $names; do
  n=$((n + 1))
  if ! grep -q "extern \"C\" __global__ void moert_k_$k(" "$src"/templates/*.cu "$src"/templates/*.cuh; then
    # the bf16 activations, stamped out by MOERT_ACT_BF16(act, ...) in bf16.cu
    act=$(echo "$k" | sed -n 's/^act_\(fwd\|bwd\)_\([a-z]*\)_bf16$/\2/p')
    if [ -z "$act" ] || ! grep -q "^MOERT_ACT_BF16($act, " "$src"/templates/bf16.cu; then
      echo "FAIL: moert_k_$k is in the KERNELS list but no template defines it"
      bad=$((bad + 1))
    fi
  fi
done
[ "$bad" = 0 ] || exit 1
echo "ok: the $n kernels of the KERNELS list are defined in templates/"
# the gate's limits that backend_cuda.c repeats from gating.cu
for c in MOERT_GATE_MAX_GROUPS MOERT_GATE_PART_EXTRA; do
  cu=$(sed -n "s/^#define $c \([0-9]*\).*/\1/p" "$src/templates/gating.cu")
  be=$(grep -o "$c = [0-9]*" "$src/runtime/backend_cuda.c" | sed 's/.* = //')
  if [ -z "$cu" ] || [ "$cu" != "$be" ]; then
    echo "FAIL: $c is '$cu' in templates/gating.cu but '$be' in runtime/backend_cuda.c"
    exit 1
  fi
done
echo "ok: backend_cuda.c's gate limits are gating.cu's"

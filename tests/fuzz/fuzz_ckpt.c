/* fuzz_ckpt.c — libFuzzer target for the checkpoint reader: safetensors,
 * MANIFEST.json and their JSON (runtime/ckpt_*.c). Each input runs through
 * moec_ckpt_fuzz_one (ckpt_check.h): its first byte says whether the rest is
 * a safetensors file parsed in memory ('S'), a MANIFEST.json read from a
 * checkpoint directory ('M') or a model.safetensors read through the
 * directory reader ('D'); accepted or rejected with a message, never a crash,
 * an abort, a leak or a hang.
 *
 * A developer tool, not part of CI. Build it (needs clang with libFuzzer; the
 * rest of the build may use gcc) and run it, seeded by mutate_ckpt's seeds:
 *
 *   cmake --build build --target fuzz-ckpt
 *   mkdir -p build/tests/fuzz/ckpt-work
 *   build/tests/fuzz/fuzz_ckpt -max_total_time=300 -timeout=10 build/tests/fuzz/ckpt-work
 *
 * tests/fuzz/README.md has more. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "ckpt_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void cleanup(void) { moec_ckpt_fuzz_cleanup(); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int ready;
  if (!ready) {
    if (!moec_ckpt_fuzz_init(NULL)) abort();
    atexit(cleanup);
    ready = 1;
  }
  moec_ckpt_fuzz_one(data, size);
  return 0;
}

/* fuzz_frontend.c — libFuzzer target for the front end (lexer, parser, sema,
 * diagnostics printer, spec printer). Each input runs through
 * moec_fuzz_check (fuzz_check.h): no sanitizer report, sane diagnostics, and
 * the print round trip for specs that check clean.
 *
 * A developer tool, not part of CI. Build it (needs clang with libFuzzer; the
 * rest of the build may use gcc) and run it:
 *
 *   cmake --build build --target fuzz-frontend
 *   mkdir -p build/tests/fuzz/work
 *   build/tests/fuzz/fuzz_frontend -dict=build/tests/fuzz/moe.dict \
 *       -max_total_time=300 -timeout=10 -rss_limit_mb=4096 \
 *       build/tests/fuzz/work tests/fuzz/corpus tests/fuzz/corpus/regressions
 *
 * New inputs go to the first folder (work/); the committed corpus is only
 * read. A crash is written as ./crash-<sha1>; minimize it with
 *   build/tests/fuzz/fuzz_frontend -minimize_crash=1 -runs=20000 crash-<sha1>
 * and add the result to tests/fuzz/corpus/regressions/, where the CTest
 * fuzz.mutation runs it on every build. tests/fuzz/README.md has more. */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  moec_fuzz_check(data, size);
  return 0;
}

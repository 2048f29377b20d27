/* fuzz_check.h — the property both front-end fuzzers check on every input
 * (fuzz_frontend.c under libFuzzer, mutate_frontend.c under CTest).
 *
 * For any bytes, the front end must return without a sanitizer report, and:
 *   - it returns a spec exactly when it reported no error, at most
 *     MOEC_MAX_ERRORS errors, every location inside the source;
 *   - the printed diagnostics are UTF-8 with no control byte but `\n` and `\t`
 *     (docs/LANGUAGE.md: non-printable bytes are echoed escaped, never raw);
 *   - a spec that checks clean prints (moec_spec_print) to a normal form that
 *     checks clean with no more warnings than the input had, prints to the
 *     same text again, and has the same summary (the round trip).
 * A violation prints what failed, the input and the normal form to stderr and
 * calls abort(), so libFuzzer and CTest both see a crash. */
#ifndef MOEC_FUZZ_CHECK_H
#define MOEC_FUZZ_CHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct moec_fuzz_result {
  bool clean;    /* a spec came back (and round-tripped) */
  int nerrors;   /* errors reported on the input */
  int nwarnings; /* warnings reported on the input */
} moec_fuzz_result;

/* Runs the whole front end on data[0..size), prints its diagnostics (and, when
 * it checks clean, the spec and its summary) into memory, checks the properties
 * above and frees everything. Aborts on a violation; never returns otherwise
 * with anything allocated. */
moec_fuzz_result moec_fuzz_check(const uint8_t *data, size_t size);

#endif

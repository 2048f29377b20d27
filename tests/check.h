/* check.h — the counting CHECK of the C tests: a failed condition prints
 * file:line and the message on stderr and counts; the test's main reports
 * g_pass and g_fail and exits 1 when g_fail > 0. */
#ifndef MOEC_TESTS_CHECK_H
#define MOEC_TESTS_CHECK_H

#include <stdio.h>

static int g_pass, g_fail;

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (cond) {                                                                                    \
      g_pass++;                                                                                    \
    } else {                                                                                       \
      g_fail++;                                                                                    \
      fprintf(stderr, "%s:%d: FAIL: ", __FILE__, __LINE__);                                        \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

#endif

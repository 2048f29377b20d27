/* testing.h — the runtime's hooks for tests, in one place: settings that
 * only tests make (environment variables named MOEC_TEST_*), read once, so
 * no test behaviour hides in the executor's state or in a module's own
 * getenv. A run without them behaves as if this file did not exist. */
#ifndef MOERT_TESTING_H
#define MOERT_TESTING_H

#include <stdbool.h>

typedef struct moert_test_hooks {
  /* MOEC_TEST_SLOW_VARIANT=r=R,d=D,a2a=A: that MoE variant sleeps 30 ms at
   * each use (the selector tests: it must be avoided). NULL: none. */
  const char *slow_variant;
  /* MOEC_TEST_DEVICE_MEMORY=FREE,TOTAL (bytes): the device memory the
   * run's memory check sees, on any backend (the out-of-memory tests). */
  bool device_memory;
  double device_free, device_total;
  /* MOEC_TEST_STOP_RANK=R,STEP: rank R stops itself (SIGSTOP) at the start of
   * step STEP, as a hung GPU or a stopped process would (the watchdog's
   * tests, --timeout). stop_step 0: none. */
  int stop_rank;
  long long stop_step;
  /* MOEC_TEST_SLEEP_STEP=STEP,SECONDS: every rank sleeps SECONDS at the start
   * of step STEP, outside any collective: a long but healthy step, which the
   * watchdog must let be. sleep_step 0: none. */
  long long sleep_step;
  double sleep_s;
} moert_test_hooks;

/* The hooks of this process (read from the environment at the first call). */
const moert_test_hooks *moert_testing(void);

#endif

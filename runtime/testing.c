/* testing.c — the runtime's hooks for tests; see testing.h. */
#include "testing.h"

#include <stdio.h>
#include <stdlib.h>

const moert_test_hooks *moert_testing(void) {
  static moert_test_hooks h;
  static bool read;
  if (!read) {
    h.slow_variant = getenv("MOEC_TEST_SLOW_VARIANT");
    const char *mem = getenv("MOEC_TEST_DEVICE_MEMORY");
    h.device_memory = mem && sscanf(mem, "%lf,%lf", &h.device_free, &h.device_total) == 2;
    const char *stop = getenv("MOEC_TEST_STOP_RANK");
    if (!stop || sscanf(stop, "%d,%lld", &h.stop_rank, &h.stop_step) != 2) h.stop_step = 0;
    const char *nap = getenv("MOEC_TEST_SLEEP_STEP");
    if (!nap || sscanf(nap, "%lld,%lf", &h.sleep_step, &h.sleep_s) != 2) h.sleep_step = 0;
    read = true;
  }
  return &h;
}

/* status.c — failure records; see status.h. */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

bool moert_fail_at(moert_status *st, const char *file, int line, const char *fmt, ...) {
  if (st->failed) return false;
  st->failed = true;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(st->msg, sizeof st->msg, fmt, ap);
  va_end(ap);
  snprintf(st->trace, sizeof st->trace, "%s:%d", file, line);
  return false;
}

bool moert_trace_at(moert_status *st, const char *file, int line) {
  size_t n = strlen(st->trace);
  if (n < sizeof st->trace - 1)
    snprintf(st->trace + n, sizeof st->trace - n, " <- %s:%d", file, line);
  return false;
}

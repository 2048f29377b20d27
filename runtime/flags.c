/* flags.c — the usage lines and the number parsing of flags.h. */
#include "flags.h"

#include <errno.h>
#include <stdlib.h>

void moert_flags_print(FILE *out, const moert_flag_info *info, int n, int width) {
  for (int i = 0; i < n; i++) {
    char left[64];
    snprintf(left, sizeof left, "--%s%s%s", info[i].name, *info[i].meta ? " " : "", info[i].meta);
    fprintf(out, "  %-*s %s\n", width, left, info[i].help);
  }
}

bool moert_parse_int(const char *s, int64_t lo, int64_t hi, int64_t *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi) return false;
  *out = v;
  return true;
}

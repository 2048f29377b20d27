/* flags.h — a command line's long options from one list
 *   #define FLAGS(X) X(ID, "name", takes_arg, "META", "help") ...
 *   MOERT_FLAGS(FLAGS)
 * defines enum { FLAG_ID, ..., FLAG__COUNT }, long_opts[] for getopt_long
 * (which returns MOERT_FLAG_BASE + FLAG_ID, clear of its own '?' and ':')
 * and flag_info[] (name, meta, help) for the usage text, which
 * moert_flags_print writes. Used by the moec-built binaries' driver.c and
 * by bench/gpu/a2a_bench.c. */
#ifndef MOERT_FLAGS_H
#define MOERT_FLAGS_H

#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define MOERT_FLAG_BASE 1000

typedef struct moert_flag_info {
  const char *name, *meta, *help;
} moert_flag_info;

#define MOERT_FLAG_ENUM_(id, name, arg, meta, help) FLAG_##id,
#define MOERT_FLAG_OPT_(id, name, arg, meta, help)                                                 \
  {name, arg ? required_argument : no_argument, NULL, MOERT_FLAG_BASE + FLAG_##id},
#define MOERT_FLAG_INFO_(id, name, arg, meta, help) {name, meta, help},
#define MOERT_FLAGS(LIST)                                                                          \
  enum { LIST(MOERT_FLAG_ENUM_) FLAG__COUNT };                                                     \
  static const struct option long_opts[] = {LIST(MOERT_FLAG_OPT_){NULL, 0, NULL, 0}};              \
  static const moert_flag_info flag_info[] = {LIST(MOERT_FLAG_INFO_)};

/* One line an option: "  --name META" padded to width, then its help. */
void moert_flags_print(FILE *out, const moert_flag_info *info, int n, int width);
/* A whole decimal number in [lo, hi] (no sign games, no trailing text). */
bool moert_parse_int(const char *s, int64_t lo, int64_t hi, int64_t *out);

#endif
